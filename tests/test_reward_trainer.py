"""Reward-model trainer on the tiny model: data building, learning, isolation, save/load."""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_demo.config import GateConfig, LoraSettings, load_settings
from rlhf_demo.modeling import load_model
from rlhf_demo.modeling.adapters import AdapterError, attach_new_adapter, is_adapter_parameter
from rlhf_demo.reward import RewardConfig, RewardMetrics, RewardModel, build_examples, train_reward_model
from rlhf_demo.reward.data import preferred_answers
from rlhf_demo.reward.losses import example_key
from rlhf_demo.reward.model import NORMALIZER_FILE, PROBE_FILE, chat_text
from rlhf_demo.reward.trainer import ProbeData, cross_validate

# ── synthetic feedback ───────────────────────────────────────────────────────────────

TOPICS = ["paris", "rome", "cats", "rain", "music", "python", "tea", "chess", "the sea", "bread", "trains", "stars"]
ASKS = ["tell me about", "what do you think of", "describe", "any facts on", "explain"]
OPENERS = ["Sure", "Well", "Of course", "Hello", "Thanks for asking"]
FILLERS = ["it is nice", "one two three", "yes because", "short answer"]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def answer(rng: random.Random, topic: str, good: bool) -> str:
    """The learnable rule: preferred answers say "great", the others never do."""
    opener, filler = rng.choice(OPENERS), rng.choice(FILLERS)
    word = "great" if good else rng.choice(["fine", "okay"])
    if rng.random() < 0.5:
        return f"{opener}, {topic} is {word}, {filler}."
    return f"{opener}! {filler}, {topic}: {word}."


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt = user(f"{rng.choice(ASKS)} {topic} ({i})")
        pairs.append({"prompt": prompt, "chosen": answer(rng, topic, True), "rejected": answer(rng, topic, False)})
    return pairs


def synthetic_thumbs(n_prompts: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    thumbs = []
    for i in range(n_prompts):
        topic = rng.choice(TOPICS)
        prompt = user(f"thumbs on {topic} #{i}")
        thumbs.append({"prompt": prompt, "completion": answer(rng, topic, True), "label": True})
        thumbs.append({"prompt": prompt, "completion": answer(rng, topic, False), "label": False})
    return thumbs


# ── dataset building (pure) ──────────────────────────────────────────────────────────


def test_build_examples_dedups_by_key_and_majority():
    p, q = user("hi"), user("bye")
    pairs = [
        {"prompt": p, "chosen": "A", "rejected": "B"},
        {"prompt": p, "chosen": "A", "rejected": "B"},  # duplicate vote
        {"prompt": p, "chosen": "B", "rejected": "A"},  # minority: A>B wins 2:1
        {"prompt": q, "chosen": "C", "rejected": "D"},
        {"prompt": q, "chosen": "D", "rejected": "C"},  # 1:1 tie -> no pair
        {"prompt": q, "chosen": "E", "rejected": "E"},  # same text -> no pair
    ]
    thumbs = [
        {"prompt": q, "completion": "X", "label": True},
        {"prompt": q, "completion": "X", "label": False},  # balanced -> dropped
        {"prompt": q, "completion": "Y", "label": 1},
        {"prompt": q, "completion": "Y", "label": 1},  # duplicate
    ]
    pair_ex, thumb_ex = build_examples(pairs, thumbs)
    assert [(e["chosen"], e["rejected"], e["votes"], e["source"]) for e in pair_ex] == [("A", "B", 1, "ab")]
    assert pair_ex[0]["key"] == example_key(p, "A", "B")
    assert [(e["completion"], e["label"], e["votes"]) for e in thumb_ex] == [("Y", True, 2)]


def test_thumbs_on_one_prompt_form_capped_pairs():
    p, other = user("q"), user("other")
    thumbs = [{"prompt": p, "completion": f"up{i}", "label": True} for i in range(3)]
    thumbs += [{"prompt": p, "completion": f"down{i}", "label": False} for i in range(3)]
    thumbs += [{"prompt": other, "completion": "lonely up", "label": True}]  # no 👎 there: no pair
    explicit = [{"prompt": p, "chosen": "up0", "rejected": "down0"}]  # already an A/B pair
    pair_ex, thumb_ex = build_examples(explicit, thumbs, max_pairs_per_prompt=4)
    assert len(thumb_ex) == 7
    derived = [(e["chosen"], e["rejected"]) for e in pair_ex if e["source"] == "thumbs"]
    # diagonal order (i + j): u0d0 (already A/B), u0d1, u1d0, u0d2 | cap 4 | u1d1, ...
    assert derived == [("up0", "down1"), ("up1", "down0"), ("up0", "down2")]
    assert all(c.startswith("up") and r.startswith("down") for c, r in derived)
    assert sum(e["source"] == "ab" for e in pair_ex) == 1


def test_preferred_answers_are_the_winners_and_the_thumbs_up_once_each():
    p, q = user("p"), user("q")
    pairs = [
        {"prompt": p, "chosen": "A", "rejected": "B", "chosen_finished": False},
        {"prompt": p, "chosen": "B", "rejected": "A"},
        {"prompt": p, "chosen": "A", "rejected": "B"},  # net A over B
        {"prompt": q, "chosen": "C", "rejected": "D"},
        {"prompt": q, "chosen": "D", "rejected": "C"},  # a 1:1 tie: neither won
    ]
    thumbs = [
        {"prompt": p, "completion": "A", "label": True},  # already a winner: once
        {"prompt": q, "completion": "up", "label": True},
        {"prompt": q, "completion": "down", "label": False},  # forms an up x down pair: adds nothing
        {"prompt": q, "completion": "   ", "label": True},  # nothing to learn from
    ]
    answers = preferred_answers(*build_examples(pairs, thumbs))
    assert sorted((a["completion"], a["finished"]) for a in answers) == [("A", False), ("up", True)]
    assert {a["group"] for a in answers} == {example_key(p), example_key(q)}


def test_examples_keep_whether_each_answer_was_cut_off():
    p = user("q")
    pairs = [{"prompt": p, "chosen": "ended.", "rejected": "cut off mid", "chosen_finished": True, "rejected_finished": False}]
    thumbs = [
        {"prompt": p, "completion": "also cut", "label": False, "finished": False},
        {"prompt": p, "completion": "fine.", "label": True},
    ]
    pair_ex, thumb_ex = build_examples(pairs, thumbs)
    ab = next(e for e in pair_ex if e["source"] == "ab")
    assert (ab["chosen_finished"], ab["rejected_finished"]) == (True, False)
    assert {e["completion"]: e["finished"] for e in thumb_ex} == {"also cut": False, "fine.": True}  # default: ended
    derived = next(e for e in pair_ex if e["source"] == "thumbs")
    assert (derived["chosen"], derived["chosen_finished"], derived["rejected"], derived["rejected_finished"]) == (
        "fine.",
        True,
        "also cut",
        False,
    )


# ── training on the tiny model ───────────────────────────────────────────────────────

FAST = RewardConfig(batch_size=16, max_length=64)
FAST_GATE = GateConfig()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hidden size 64 gains nothing from threads, and on a busy 2-core box OpenMP
    spin-waiting made these tests 3-5x slower; the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_tiny(tiny_model_dir: Path, data_dir: Path, **kw):
    return load_model(load_settings(env={}, model=str(tiny_model_dir), data_dir=data_dir, **kw))


def snapshot(model) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, parameter, copy of its value): survives PEFT renaming wrapped modules."""
    return [(n, p, p.detach().clone()) for n, p in model.named_parameters()]


def assert_unchanged(saved) -> None:
    for n, p, old in saved:
        assert torch.equal(p, old), n


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One base with a trainable "policy" adapter; a reward model fitted beside it."""
    loaded = load_tiny(tiny_model_dir, tmp_path_factory.mktemp("rm"), quantization="fp32")
    base = loaded.model
    peft = attach_new_adapter(base, "policy", LoraSettings())
    with torch.no_grad():  # a non-trivial policy (fresh LoRA B is 0)
        for n, p in peft.named_parameters():
            if is_adapter_parameter(n, "policy"):
                p.normal_(std=0.05)
    policy_flags = {n: p.requires_grad for n, p in peft.named_parameters()}
    peft.train()
    before = snapshot(peft)
    calls: list[tuple[int, int]] = []
    pairs, thumbs = synthetic_pairs(200), synthetic_thumbs(30)
    rm, metrics = train_reward_model(
        peft, loaded.tokenizer, pairs, thumbs, FAST, progress=lambda done, total, m: calls.append((done, total))
    )
    return SimpleNamespace(
        loaded=loaded,
        base=base,
        peft=peft,
        before=before,
        policy_flags=policy_flags,
        calls=calls,
        rm=rm,
        metrics=metrics,
        pairs=pairs,
        thumbs=thumbs,
    )


def test_learns_a_synthetic_preference(trained):
    m = trained.metrics
    assert isinstance(m, RewardMetrics)
    assert m.pairs >= 200 and m.thumbs == 60 and m.pairs_from_thumbs > 0
    # every pair judged once by a probe fitted without its prompt; thumbs by ranking, as many
    # judgements as disjoint (👍, 👎) combinations (each prompt here has one of each)
    assert m.judged == m.pairs + m.thumbs // 2
    assert m.pairwise_accuracy >= 0.85 and m.thumb_accuracy >= 0.7 and m.mean_margin > 0, m
    assert m.agreement >= 0.85 and 0.5 < m.agreement_lower_bound < m.agreement, m
    assert trained.calls and trained.calls[-1] == (m.answers, m.answers) and m.answers_left_out == 0
    stored = json.loads(json.dumps(m.as_dict(), allow_nan=False))  # plain numbers, None where undefined
    assert stored == dataclasses.asdict(m) and stored["votes_used"] == 0
    assert m.accuracies() == {
        "pairwise_accuracy": m.pairwise_accuracy,
        "thumb_accuracy": m.thumb_accuracy,
        "agreement": m.agreement,
    }
    # new answers, never voted on, follow the rule
    rng = random.Random(9)
    good = trained.rm.score([user("describe tea")] * 20, [answer(rng, "tea", True) for _ in range(20)])
    bad = trained.rm.score([user("describe tea")] * 20, [answer(rng, "tea", False) for _ in range(20)])
    assert (good > bad).float().mean() >= 0.9
    # normalizer: training answers come out ~N(0, 1)
    prompts, texts = [p["prompt"] for p in trained.pairs[:40]] * 2, [p["chosen"] for p in trained.pairs[:40]]
    texts += [p["rejected"] for p in trained.pairs[:40]]
    normalized = trained.rm.score(prompts, texts)
    assert normalized.dtype == torch.float32 and normalized.shape == (80,)
    assert abs(normalized.mean().item()) < 0.5 and 0.5 < normalized.std().item() < 1.5
    raw = trained.rm.score(prompts, texts, normalized=False)
    torch.testing.assert_close(normalized, (raw - m.reward_mean) / m.reward_std)


def test_thumbs_that_only_teach_the_base_rate_are_not_trusted(trained):
    """Two 👍 among 40 thumbs: "always 👎" is 95 % right by sign, but says nothing about which
    answer is better. Judged by ranking, such a probe rests on 2 comparisons, which cannot
    carry the trust that forty would."""
    rng = random.Random(5)
    thumbs = [{"prompt": user(f"q {i}"), "completion": answer(rng, "tea", i < 2), "label": i < 2} for i in range(40)]
    _, m = train_reward_model(trained.peft, trained.loaded.tokenizer, [], thumbs, FAST)
    assert m.judged == 2 and m.agreement_lower_bound < 0.6, m  # at most what 2 of 2 right earns


def thumbs_only(labels: list[bool], seed: int = 0, signal: float = 3.0, dims: int = 8) -> ProbeData:
    """Feature rows of one thumb per prompt (as a visitor rates chat answers): dimension 0
    carries the label, the others are noise; the prompts, and so the folds, differ per seed."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor([1.0 if up else -1.0 for up in labels])
    x = torch.randn(len(labels), dims, generator=gen)
    x[:, 0] += signal * y
    groups = [f"prompt {seed}-{i}" for i in range(len(labels))]
    return ProbeData(torch.zeros(0, dims), torch.zeros(0, dims), [], x, y, groups, x)


def test_ten_thumbs_on_ten_prompts_give_five_judgements():
    """Ten chat answers rated once each (a live room's first cycle): within one fold there is
    rarely both a 👍 and a 👎, so per-fold rankings gave 1-3 judgements and the first cycle's
    trust was a coin toss. Each 👍 ranked against one 👎, both prompts left out of the fit:
    5 disjoint judgements."""
    labels = [True, False] * 5
    m = cross_validate(thumbs_only(labels), FAST)
    assert m["judged"] == 5 and m["thumb_accuracy"] >= 0.8, m
    assert m["agreement_lower_bound"] > FAST_GATE.min_reward_agreement, m
    noise = cross_validate(thumbs_only(labels, signal=0.0), FAST)  # nothing to learn: not trusted
    assert noise["judged"] == 5 and noise["agreement_lower_bound"] < FAST_GATE.min_reward_agreement, noise


def test_the_thumbs_check_is_not_biased_against_few_votes():
    """On labels with no rule the check must read chance, not less: ranking out-of-fold
    scores pooled over folds read 0.35 here (each fold's probe is fitted on the opposite
    balance of the labels it scores), which holds back a room whose votes do teach.
    Leave-pair-out reads 0.51; 100 draws of 5 judgements put the mean within ±0.022 (SE)."""
    labels = [True, False] * 5 + [True]
    accuracies = [
        cross_validate(thumbs_only(labels, seed=seed, signal=0.0, dims=64), FAST)["thumb_accuracy"] for seed in range(100)
    ]
    assert 0.45 < statistics.fmean(accuracies) < 0.6, statistics.fmean(accuracies)


def test_votes_without_a_rule_are_not_trusted(trained):
    """Labels drawn at random: cross-validation must say the probe predicts nothing, so the
    worker does not spend PPO on it (GateConfig.min_reward_agreement)."""
    rng = random.Random(3)
    pairs = []
    for p in synthetic_pairs(200, seed=11):
        if rng.random() < 0.5:
            p = {**p, "chosen": p["rejected"], "rejected": p["chosen"]}
        pairs.append(p)
    _, m = train_reward_model(trained.peft, trained.loaded.tokenizer, pairs, [], FAST)
    assert m.judged == m.pairs >= 190
    assert abs(m.agreement - 0.5) < 0.1 and m.agreement_lower_bound < 0.5, m


def test_reward_model_sees_whether_an_answer_was_cut_off(tiny_model_dir, tmp_path):
    """A rater who dislikes answers cut at the length limit: the texts alone carry no sign of
    it (chosen and rejected come from the same random words), only the missing end-of-turn
    does."""
    loaded = load_tiny(tiny_model_dir, tmp_path, quantization="fp32")
    tok = loaded.tokenizer
    cut = chat_text(tok, user("q"), "some words", finished=False)
    assert cut.endswith("some words") and chat_text(tok, user("q"), "some words").startswith(cut)
    rng = random.Random(0)
    words = "red green blue sky sea tree stone river cloud".split()

    def answer() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))

    pairs = [
        {
            "prompt": user(f"question {i}"),
            "chosen": answer(),
            "rejected": answer(),
            "chosen_finished": True,
            "rejected_finished": False,
        }
        for i in range(160)
    ]
    rm, metrics = train_reward_model(loaded.model, tok, pairs, [], FAST)
    assert metrics.pairwise_accuracy >= 0.8, metrics
    texts = [answer() for _ in range(20)]
    ended = rm.score([user("new")] * 20, texts, finished=[True] * 20)
    cut_off = rm.score([user("new")] * 20, texts, finished=[False] * 20)
    assert (ended > cut_off).float().mean() >= 0.8


def test_reads_with_the_base_and_gives_the_policy_back_as_found(trained):
    """PPO calls ``score`` between its own steps with the policy adapter active and
    trainable: the reward must not depend on the policy's weights, and the policy must come
    back with its adapter, flags and train mode."""
    peft, rm = trained.peft, trained.rm
    assert_unchanged(trained.before)  # fitting touched no weight, base or policy
    assert rm.model is peft and peft.active_adapters == ["policy"]
    prompts, texts = [user("hi"), user("tell me about rain")], ["great!", "rain is fine"]
    first = rm.score(prompts, texts)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if is_adapter_parameter(n, "policy"):
                p.add_(0.5)
    try:
        assert torch.equal(rm.score(prompts, texts), first)  # the policy moved, the reward did not
    finally:
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if is_adapter_parameter(n, "policy"):
                    p.sub_(0.5)
    assert peft.training and peft.active_adapters == ["policy"]
    assert {n: p.requires_grad for n, p in peft.named_parameters()} == trained.policy_flags
    with peft.disable_adapter():  # the same numbers as reading the bare base
        bare = rm.score(prompts, texts)
    torch.testing.assert_close(bare, first)


def test_save_load_round_trip_gives_identical_scores(trained, tmp_path, tiny_model_dir):
    rm, tok = trained.rm, trained.loaded.tokenizer
    folder = rm.save(tmp_path / "rm-v1")
    assert {f.name for f in folder.iterdir()} == {PROBE_FILE, NORMALIZER_FILE}
    assert not list(tmp_path.glob(".*"))  # no temp folder left behind
    with pytest.raises(AdapterError):
        rm.save(folder)  # versions are immutable
    prompts = [p["prompt"] for p in trained.pairs[:12]]
    texts = [p["chosen"] for p in trained.pairs[:12]]
    expected = rm.score(prompts, texts)
    copy = RewardModel.load(rm.model, tok, folder)
    assert (copy.mean, copy.std, copy.layer) == (rm.mean, rm.std, rm.layer)
    assert torch.equal(copy.score(prompts, texts), expected)
    other = load_tiny(tiny_model_dir, tmp_path / "other", quantization="fp32")  # a fresh process's bare base
    fresh = RewardModel.load(other.model, other.tokenizer, folder)
    torch.testing.assert_close(fresh.score(prompts, texts), expected, rtol=0, atol=1e-5)
    with pytest.raises(AdapterError, match="not a reward model folder"):
        RewardModel.load(other.model, other.tokenizer, tmp_path / "other")


def test_time_budget_and_empty_feedback(trained):
    tok = trained.loaded.tokenizer
    with pytest.raises(TimeoutError, match="time budget"):
        train_reward_model(trained.peft, tok, trained.pairs[:40], [], dataclasses.replace(FAST, max_seconds=0.0))
    with pytest.raises(ValueError, match="no usable feedback"):
        train_reward_model(trained.peft, tok, [], [], FAST)


def test_trains_on_an_nf4_base(tiny_model_dir, tmp_path):
    """bitsandbytes NF4 storage, bfloat16 compute (the CUDA recipe), here on the CPU."""
    try:
        loaded = load_tiny(tiny_model_dir, tmp_path, quantization="nf4", compute_dtype="bfloat16", device="cpu")
    except Exception as exc:  # noqa: BLE001 - a bitsandbytes build without CPU 4-bit
        pytest.skip(f"NF4 unavailable here: {exc}")
    ids = loaded.tokenizer("hello great", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = loaded.model.eval()(ids).logits
    rm, m = train_reward_model(loaded.model, loaded.tokenizer, synthetic_pairs(120, seed=7), [], FAST)
    assert m.pairwise_accuracy >= 0.8, m
    assert rm.weight.dtype == torch.float32 and torch.isfinite(rm.weight).all()
    with torch.no_grad():  # the quantized base stays exactly as it was
        assert torch.equal(loaded.model(ids).logits, base_logits)


@pytest.mark.parametrize("layer", [0, 1, 2, "depth"])
def test_hidden_state_at_equals_the_full_forwards(trained, layer):
    """The probe reads its layer without running the layers above it: same numbers, and a
    forward that stops early leaves no hook behind."""
    from rlhf_demo.reward.model import hidden_state_at

    model = trained.base
    layer = model.config.num_hidden_layers if layer == "depth" else layer
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    blocks = model.get_base_model().get_decoder().layers if hasattr(model, "get_base_model") else model.get_decoder().layers
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[layer]
        hooks = [len(block._forward_hooks) for block in blocks]  # transformers keeps its own recorders
        early = hidden_state_at(model, layer, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(early, full)
    assert [len(block._forward_hooks) for block in blocks] == hooks
