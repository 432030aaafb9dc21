"""Hand-computed checks of rlhf_demo.reward.losses."""

import math

import pytest
import torch

from rlhf_demo.reward.losses import (
    bradley_terry_loss,
    example_key,
    fit_normalizer,
    holdout_split,
    mean_margin,
    normalize_scores,
    pairwise_accuracy,
    thumb_loss,
)


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x), written out
    return math.log1p(math.exp(x))


def test_bradley_terry_equal_rewards_is_log2():
    r = torch.tensor([0.0, 1.5, -3.0])
    assert bradley_terry_loss(r, r).item() == pytest.approx(math.log(2))


def test_bradley_terry_hand_case_and_centering():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-2) = log(1 + e^2)
    base = (softplus(-1.0) + softplus(2.0)) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(base)
    # + 0.01 * mean((1 + 0)^2, (0 + 2)^2)
    assert bradley_terry_loss(rc, rr, center_coef=0.01).item() == pytest.approx(base + 0.01 * 2.5)


def test_bradley_terry_gradient_direction():
    rc = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(rc, torch.tensor([0.0])).backward()
    assert rc.grad.item() == pytest.approx(-0.5)  # -sigmoid(0): push chosen up


def test_thumb_loss_neutral_and_symmetric():
    r = torch.tensor([0.7, -1.3, 2.0])
    assert thumb_loss(torch.zeros(3), torch.tensor([1, -1, 1])).item() == pytest.approx(math.log(2))
    up = thumb_loss(r, torch.tensor([1, 1, 1]))
    assert up.item() == pytest.approx(thumb_loss(-r, torch.tensor([-1, -1, -1])).item())
    expected = (softplus(-0.7) + softplus(1.3) + softplus(-2.0)) / 3
    assert up.item() == pytest.approx(expected)


def test_thumb_loss_label_forms_and_weights():
    r = torch.tensor([1.0, -1.0])
    pm = thumb_loss(r, torch.tensor([1, -1]))
    assert thumb_loss(r, torch.tensor([True, False])).item() == pytest.approx(pm.item())
    assert thumb_loss(r, torch.tensor([1, 0])).item() == pytest.approx(pm.item())
    weighted = thumb_loss(r, torch.tensor([1, 1]), weights=torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx((softplus(-1.0) + 3 * softplus(1.0)) / 4)


def test_metrics():
    rc, rr = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 2.0])
    # a tie counts 1/2
    assert pairwise_accuracy(rc, rr) == pytest.approx((1 + 0 + 0.5) / 3)
    assert mean_margin(rc, rr) == pytest.approx((2 - 1 + 0) / 3)
    assert math.isnan(pairwise_accuracy(torch.tensor([]), torch.tensor([])))


def test_normalizer():
    mean, std = fit_normalizer(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert (mean, std) == pytest.approx((2.5, math.sqrt(1.25)))  # population std
    out = normalize_scores(torch.tensor([2.5, 4.0]), mean, std)
    assert torch.allclose(out, torch.tensor([0.0, 1.5 / math.sqrt(1.25)]))
    assert fit_normalizer([3.0]) == (3.0, 1.0)  # single score: shift only
    assert fit_normalizer([2.0, 2.0]) == (2.0, 1.0)  # constant: shift only


def test_example_key_is_stable_and_order_free():
    prompt = [{"role": "user", "content": "Hi"}]
    k = example_key(prompt, "b", "a")
    assert k == example_key(prompt, "a", "b")
    pinned = "97a203a9bb861be71e5a41af11d7e25a5796cf7fadbeb070a20d6a986dfcdcf1"
    assert k == pinned
    assert k != example_key([{"role": "user", "content": "Hi!"}], "a", "b")
    assert k != example_key(prompt, "a")


def test_holdout_split_stable_and_about_15_percent():
    # pinned: the split must never change between versions or processes
    held_40 = [i for i in range(40) if holdout_split(f"key-{i}")]
    assert held_40 == [5, 9, 11, 12, 15, 30, 39]
    keys = [example_key("prompt", f"response {i}") for i in range(2000)]
    held = [holdout_split(k) for k in keys]
    assert held == [holdout_split(k) for k in keys]
    assert 0.12 < sum(held) / 2000 < 0.18
    assert not any(holdout_split(k, fraction=0.0) for k in keys[:50])
    assert all(holdout_split(k, fraction=1.0) for k in keys[:50])
