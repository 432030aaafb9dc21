"""Which answers visitors see: Compare's pair (double Thompson sampling over the reward
ensemble, two plain samples before the first ensemble, ``passive`` as before) and
best-of-n chat answers, on the rules alone and through the serving runtime."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from rlhf_demo.config import SelectionSettings, device_defaults
from rlhf_demo.reward import train_reward_model
from rlhf_demo.reward.model import RewardModel
from rlhf_demo.selection import Pick, Reading, Round, best_answer, choose_pair, compare_round, thompson_pair
from rlhf_demo.ui.handlers import ChatState, Handlers

TEXTS = ["a", "b", "c", "d", "e"]


def test_thompson_pair_shows_the_answers_the_ensemble_disagrees_on():
    # every member ranks 0 and 1 low; half the members favour 2, the other half 3; 4 is
    # settled-middling: the informative pair is (2, 3), whatever the draws
    members = torch.tensor([[-3.0, -3.0, 2.0, 1.0, 0.0]] * 4 + [[-3.0, -3.0, 1.0, 2.0, 0.0]] * 4)
    pairs = {tuple(sorted(thompson_pair(members, TEXTS, random.Random(seed)))) for seed in range(50)}
    assert pairs == {(2, 3)}


def test_thompson_pair_when_all_members_agree_takes_the_least_settled_partner():
    base = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0])
    spread = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -2.0, 0.0]])  # members split only on 3
    members = base + spread.repeat(3, 1)
    for seed in range(20):
        assert thompson_pair(members, TEXTS, random.Random(seed)) == (0, 3)


def test_thompson_pair_never_shows_the_same_text_twice():
    members = torch.tensor([[2.0, 2.0, 0.0], [2.0, 2.0, 0.0], [2.0, 1.9, 0.0]])
    for seed in range(20):
        i, j = thompson_pair(members, ["same", "same", "other"], random.Random(seed))
        assert {i, j} != {0, 1}


def test_choose_pair_explores_with_any_ensemble_in_random_order():
    members = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    reading = Reading(torch.eye(4), torch.zeros(4), members, trusted=False)
    orders = {choose_pair(reading, TEXTS[:4], random.Random(seed)) for seed in range(20)}
    assert orders == {(2, 3), (3, 2)}  # the first draw's favourite is not always shown as A


# ── the ensemble ─────────────────────────────────────────────────────────────────────


def votes(n: int) -> list[dict]:
    rng = random.Random(0)
    return [
        {
            "prompt": [{"role": "user", "content": f"tell me about {i}"}],
            "chosen": f"{rng.choice(['Sure', 'Well'])}, it is great {i}.",
            "rejected": f"{rng.choice(['Sure', 'Well'])}, it is okay {i}.",
        }
        for i in range(n)
    ]


def test_ensemble_members_are_fitted_saved_and_loaded(tiny_loaded, tmp_path):
    rm, _ = train_reward_model(tiny_loaded.model, tiny_loaded.tokenizer, votes(24), [])
    assert rm.members.shape == (8, rm.weight.shape[0]) and len(rm.member_bias) == 8
    assert not torch.allclose(rm.members[0], rm.members[1])  # bootstrap resamples differ
    rm.trusted = True
    again = RewardModel.load(tiny_loaded.model, tiny_loaded.tokenizer, rm.save(tmp_path / "run-1"))
    assert again.trusted and torch.equal(again.members, rm.members) and torch.equal(again.member_bias, rm.member_bias)
    features = rm.features([[{"role": "user", "content": "hi"}]] * 2, ["it is great", "it is okay"])
    assert again.member_scores(features).shape == (8, 2)


# ── through the serving runtime ──────────────────────────────────────────────────────


def test_passive_is_two_samples_as_before(runtime):
    server, prompt = runtime.server, [{"role": "user", "content": "Say hi"}]
    sampling = server.sampling(max_new_tokens=8)
    torch.manual_seed(3)
    before = server.generate_pair(prompt, (server.active, server.active), sampling)
    torch.manual_seed(3)
    *_, round_ = compare_round(server, runtime.judge, prompt, sampling, SelectionSettings(rule="passive"), random.Random(0))
    assert isinstance(round_, Round) and round_.rule == "passive" and round_.candidates == 2
    assert [g.text for g in round_.pair] == [g.text for g in before]


def test_dts_round_is_two_plain_samples_until_an_ensemble_exists_then_chooses_among_candidates(runtime):
    server, prompt = runtime.server, [{"role": "user", "content": "Hi"}]
    sampling, config = server.sampling(max_new_tokens=8), SelectionSettings(candidates=5)
    *_, before = compare_round(server, runtime.judge, prompt, sampling, config, random.Random(0))
    assert before.rule == "passive" and before.candidates == 2
    save_trusted_model(runtime, torch.ones(runtime.judge.model().weight.shape[0]))
    stream = list(compare_round(server, runtime.judge, prompt, sampling, config, random.Random(0)))
    assert all("Writing 5 candidate" in a for a, _ in stream[:-1])  # progress while candidates are written
    round_ = stream[-1]
    assert round_.rule == "dts" and round_.candidates == 5 and len(round_.pair) == 2


def save_trusted_model(runtime, weight: torch.Tensor) -> None:
    model = runtime.judge.model()
    members = torch.stack([weight, weight])
    RewardModel(
        model.model, model.tokenizer, model.layer, weight, members=members, member_bias=torch.zeros(2), trusted=True
    ).save(runtime.settings.data_dir / "reward" / "run-1")


def test_best_of_n_serves_the_trusted_models_pick(runtime):
    server, prompt = runtime.server, [{"role": "user", "content": "Hi"}]
    sampling = server.sampling(max_new_tokens=8)
    *_, plain = best_answer(server, runtime.judge, prompt, sampling, best_of=4)
    assert isinstance(plain, Pick) and plain.picked_from == 1  # no trusted model yet: one sample
    weight = torch.randn(runtime.judge.model().weight.shape[0], generator=torch.Generator().manual_seed(0))
    save_trusted_model(runtime, weight)
    torch.manual_seed(5)
    *_, pick = best_answer(server, runtime.judge, prompt, sampling, best_of=4)
    torch.manual_seed(5)
    *_, candidates = server.stream_samples(prompt, 4, None, sampling)
    scores = runtime.judge.read(candidates).scores
    assert pick.picked_from == 4 and pick.generation.text == candidates[int(scores.argmax())].text


@pytest.mark.parametrize("best_of", [1, 3])
def test_chat_says_how_many_samples_an_answer_was_picked_from(runtime, best_of):
    runtime.settings = dataclasses.replace(runtime.settings, selection=SelectionSettings(best_of=best_of))
    save_trusted_model(runtime, torch.ones(runtime.judge.model().weight.shape[0]))
    *_, final = Handlers(runtime).chat("session-1", "Hello", [], ChatState(), 0.7, 0.9, 8)
    assert ("picked from 3" in final[-1]["content"]) == (best_of == 3)


def test_chat_on_the_devices_defaults_picks_from_its_best_of(runtime):
    """Left unset, best-of-n and the engine's batch are the device's measured defaults (a
    CPU here: 4 and 32), and a chat answer is picked from that many samples."""
    assert runtime.server.engine.max_batch == device_defaults(runtime.loaded.device).max_batch == 32
    save_trusted_model(runtime, torch.ones(runtime.judge.model().weight.shape[0]))
    *_, final = Handlers(runtime).chat("session-1", "Hello", [], ChatState(), 0.7, 0.9, 8)
    assert "picked from 4" in final[-1]["content"]


def test_serving_process_reads_the_ensemble_the_worker_saved_with_its_verdict(runtime, settings):
    from rlhf_demo.modeling import load_model
    from rlhf_demo.worker.cycle import run_cycle
    from rlhf_demo.worker.gate import GateConfig

    store = runtime.store
    for i in range(12):
        prompt = [{"role": "user", "content": f"question number {i}?"}]
        ids = [
            store.log_response(
                visitor_id=f"s{i % 3}",
                prompt=prompt,
                text=t,
                adapter_version="v0",
                sampling={},
                prompt_tokens=5,
                completion_tokens=3,
                latency_s=0.1,
            )
            for t in (f"great answer {i}", f"poor {i}")
        ]
        store.prefer(visitor_id=f"s{i % 3}", response_a_id=ids[0], response_b_id=ids[1], outcome="A", source="two_samples")
    training = settings.training
    small = dataclasses.replace(
        settings,
        training=dataclasses.replace(
            training,
            ppo=dataclasses.replace(
                training.ppo, steps=1, batch_size=4, mini_batch_size=2, samples_per_prompt=2, max_new_tokens=4
            ),
        ),
    )
    summary = run_cycle(
        small, store, load_model(settings), gate_config=GateConfig(prompts=2, samples_per_prompt=2, min_improvement=float("inf"))
    )
    rm = runtime.judge.model()
    assert runtime.judge.newest().name == f"run-{store.list_runs(limit=1)[0]['id']}"
    assert len(rm.members) == settings.training.reward.ensemble
    assert rm.trusted == ("ppo" in summary)  # PPO ran exactly when the trust gate passed
