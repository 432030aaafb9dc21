"""Reward-model trainer on the tiny model: data building, learning, isolation, save/load."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_demo.config import LoraSettings, load_settings
from rlhf_demo.modeling import load_model
from rlhf_demo.modeling.adapters import ADAPTER_CONFIG, AdapterError, attach_new_adapter, is_adapter_parameter, use_adapter
from rlhf_demo.modeling.heads import HEAD_FILE
from rlhf_demo.reward import RewardConfig, RewardMetrics, RewardModel, build_examples, split_holdout, train_reward_model
from rlhf_demo.reward.losses import example_key
from rlhf_demo.reward.model import NORMALIZER_FILE, chat_text

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


def test_examples_keep_whether_each_answer_was_cut_off():
    p = user("q")
    pairs = [{"prompt": p, "chosen": "ended.", "rejected": "cut off mid", "chosen_finished": True, "rejected_finished": False}]
    thumbs = [{"prompt": p, "completion": "also cut", "label": False, "finished": False}, {"prompt": p, "completion": "fine.", "label": True}]
    pair_ex, thumb_ex = build_examples(pairs, thumbs)
    ab = next(e for e in pair_ex if e["source"] == "ab")
    assert (ab["chosen_finished"], ab["rejected_finished"]) == (True, False)
    assert {e["completion"]: e["finished"] for e in thumb_ex} == {"also cut": False, "fine.": True}  # default: ended
    derived = next(e for e in pair_ex if e["source"] == "thumbs")
    assert (derived["chosen"], derived["chosen_finished"], derived["rejected"], derived["rejected_finished"]) == ("fine.", True, "also cut", False)


def test_split_holdout_is_stable_as_data_grows():
    old_pairs, old_thumbs = build_examples(synthetic_pairs(120, seed=3), synthetic_thumbs(20, seed=4))
    new_pairs, new_thumbs = build_examples(
        synthetic_pairs(120, seed=3) + synthetic_pairs(200, seed=5), synthetic_thumbs(20, seed=4) + synthetic_thumbs(40, seed=6)
    )
    for old, new in ((old_pairs, new_pairs), (old_thumbs, new_thumbs)):
        old_train, old_hold = split_holdout(old)
        new_train, new_hold = split_holdout(new)
        assert 0 < len(old_hold) < len(old)
        assert {e["key"] for e in old_hold} <= {e["key"] for e in new_hold}  # nobody moves
        assert {e["key"] for e in old_train} <= {e["key"] for e in new_train}
        assert len(new_hold) / len(new) == pytest.approx(0.15, abs=0.08)
    # whole prompts on one side: no answer text is both trained on and evaluated
    train, hold = split_holdout(new_pairs + new_thumbs)
    assert not {e["group"] for e in train} & {e["group"] for e in hold}


# ── training on the tiny model ───────────────────────────────────────────────────────

# Tiny random model: a high LR and a few epochs learn the rule in ~2 s (seed fixed).
FAST = RewardConfig(learning_rate=5e-3, epochs=4, batch_size=16, max_length=64, seed=0, normalizer_samples=256)


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
    """One base with a "policy" adapter; a reward model trained beside it."""
    loaded = load_tiny(tiny_model_dir, tmp_path_factory.mktemp("rm"), quantization="fp32")
    base = loaded.model
    base_tensors = {n: p for n, p in base.named_parameters()}
    peft = attach_new_adapter(base, "policy", LoraSettings())
    with torch.no_grad():  # a non-trivial policy (fresh LoRA B is 0)
        for n, p in peft.named_parameters():
            if is_adapter_parameter(n, "policy"):
                p.normal_(std=0.02)
    policy_flags = {n: p.requires_grad for n, p in peft.named_parameters()}
    before = snapshot(peft)
    grads_at_step_1: list[str] = []

    def progress(step, total, metrics):
        assert 1 <= step <= total and math.isfinite(metrics["loss"])
        if step == 1:
            grads_at_step_1.extend(n for n, p in peft.named_parameters() if p.grad is not None)

    pairs, thumbs = synthetic_pairs(200), synthetic_thumbs(30)
    rm, metrics = train_reward_model(peft, loaded.tokenizer, pairs, thumbs, FAST, LoraSettings(), progress=progress)
    return SimpleNamespace(
        loaded=loaded,
        base=base,
        base_tensors=base_tensors,
        peft=peft,
        before=before,
        policy_flags=policy_flags,
        grads_at_step_1=grads_at_step_1,
        rm=rm,
        metrics=metrics,
        pairs=pairs,
        thumbs=thumbs,
    )


def test_learns_a_synthetic_preference(trained):
    m = trained.metrics
    assert isinstance(m, RewardMetrics)
    assert m.holdout_pairs >= 15 and m.train_pairs >= 150
    assert m.pairwise_accuracy >= 0.9, m
    assert m.mean_margin > 0
    assert m.holdout_thumbs > 0 and m.thumb_accuracy >= 0.75, m
    assert m.pairs_from_thumbs > 0
    assert m.steps == len(m.loss_curve) > 0 and not m.timed_out
    assert m.final_loss < m.loss_curve[0]
    stored = json.loads(json.dumps(m.as_dict(), allow_nan=False))  # plain numbers, None where undefined
    assert stored == dataclasses.asdict(m) and stored["votes_used"] == 0 and stored["warm_start"] is None
    assert m.accuracies() == {"pairwise_accuracy": m.pairwise_accuracy, "thumb_accuracy": m.thumb_accuracy}
    # normalizer: training answers come out ~N(0, 1)
    prompts, texts = [p["prompt"] for p in trained.pairs[:40]] * 2, [p["chosen"] for p in trained.pairs[:40]]
    texts += [p["rejected"] for p in trained.pairs[:40]]
    normalized = trained.rm.score(prompts, texts)
    assert normalized.dtype == torch.float32 and normalized.shape == (80,)
    assert abs(normalized.mean().item()) < 0.5 and 0.5 < normalized.std().item() < 1.5
    raw = trained.rm.score(prompts, texts, normalized=False)
    torch.testing.assert_close(normalized, (raw - m.reward_mean) / m.reward_std)


def test_reward_model_sees_whether_an_answer_was_cut_off(tiny_model_dir, tmp_path):
    """A rater who dislikes answers cut at the length limit: the texts alone carry no sign of
    it (chosen and rejected come from the same random words), only the missing end-of-turn
    does. Before the reward model read that, this preference could not be learned at all."""
    loaded = load_tiny(tiny_model_dir, tmp_path, quantization="fp32")
    tok = loaded.tokenizer
    cut = chat_text(tok, user("q"), "some words", finished=False)
    assert cut.endswith("some words") and chat_text(tok, user("q"), "some words").startswith(cut)
    rng = random.Random(0)
    words = "red green blue sky sea tree stone river cloud".split()

    def answer() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))

    pairs = [
        {"prompt": user(f"question {i}"), "chosen": answer(), "rejected": answer(), "chosen_finished": True, "rejected_finished": False}
        for i in range(160)
    ]
    rm, metrics = train_reward_model(loaded.model, tok, pairs, [], FAST, LoraSettings())
    assert metrics.holdout_pairs >= 10 and metrics.pairwise_accuracy >= 0.9, metrics
    texts = [answer() for _ in range(20)]
    ended = rm.score([user("new")] * 20, texts, finished=[True] * 20)
    cut_off = rm.score([user("new")] * 20, texts, finished=[False] * 20)
    assert (ended > cut_off).float().mean() >= 0.9


def test_gradients_reach_only_reward_lora_and_head(trained):
    names = trained.grads_at_step_1
    assert names and all(is_adapter_parameter(n, "reward") for n in names), names
    assert len(names) == sum(is_adapter_parameter(n, "reward") for n, _ in trained.peft.named_parameters())
    # base and policy weights are untouched, bit for bit
    assert_unchanged(trained.before)

    def given_back_as_found() -> None:  # policy active (for PEFT's wrapper too), its flags kept, reward frozen
        assert trained.peft.active_adapters == ["policy"] and trained.peft.active_adapter == "policy"
        for n, p in trained.peft.named_parameters():
            assert p.requires_grad == trained.policy_flags.get(n, False), n

    given_back_as_found()
    assert any(trained.policy_flags.values())  # the policy is trainable: scoring must not freeze it
    rm = trained.rm
    rm.score([user("hi")], ["great!"])  # as PPO's reward_fn does between its steps
    given_back_as_found()
    with pytest.raises(AdapterError, match="not active"):  # never scores with the policy by mistake
        rm.raw_scores([user("hi")], ["great!"])
    # a training forward: gradients into the reward LoRA and the head only
    try:
        with use_adapter(rm.model, rm.name, trainable=True):
            rm.raw_scores([user("hi")], ["great!"]).sum().backward()
        got = {n for n, p in trained.peft.named_parameters() if p.grad is not None}
        assert got and all(is_adapter_parameter(n, "reward") for n in got)
        assert all(p.grad is not None for p in rm.head.parameters())
    finally:
        trained.peft.zero_grad(set_to_none=True)
        rm.head.zero_grad(set_to_none=True)
    given_back_as_found()


def test_process_holds_one_base(trained):
    rm = trained.rm
    assert rm.model is trained.peft and rm.model.get_base_model() is trained.base
    wrapped = {p.data_ptr(): p for p in rm.model.parameters()}
    for n, p in trained.base_tensors.items():  # the same tensors, not copies
        assert wrapped.get(p.data_ptr()) is p, n
    non_lora = [p for n, p in rm.model.named_parameters() if "lora_" not in n]
    assert len(non_lora) == len(trained.base_tensors)
    assert rm.head.linear.weight.device == trained.base.get_input_embeddings().weight.device


def test_save_load_round_trip_gives_identical_scores(trained, tmp_path, tiny_model_dir):
    rm, tok = trained.rm, trained.loaded.tokenizer
    folder = rm.save(tmp_path / "rm-v1")
    assert {ADAPTER_CONFIG, HEAD_FILE, NORMALIZER_FILE} <= {f.name for f in folder.iterdir()}
    assert not list(tmp_path.glob(".*"))  # no temp folder left behind
    with pytest.raises(AdapterError):
        rm.save(folder)  # versions are immutable
    prompts = [p["prompt"] for p in trained.pairs[:12]]
    texts = [p["chosen"] for p in trained.pairs[:12]]
    expected = rm.score(prompts, texts)

    copy = RewardModel.load(rm.model, tok, folder, name="reward_copy")  # beside the original
    assert copy.model is rm.model and (copy.mean, copy.std) == (rm.mean, rm.std)
    assert torch.equal(copy.score(prompts, texts), expected)
    again = RewardModel.load(rm.model, tok, folder, name="reward_copy")  # replaces its namesake
    assert torch.equal(again.score(prompts, texts), expected)
    assert trained.peft.active_adapters == ["policy"]

    other = load_tiny(tiny_model_dir, tmp_path / "other", quantization="fp32")  # a fresh process's base
    fresh = RewardModel.load(other.model, other.tokenizer, folder)  # bare base -> PeftModel
    assert fresh.model.get_base_model() is other.model
    assert not any(p.requires_grad for p in fresh.model.parameters())  # PEFT froze the base, load the adapter
    torch.testing.assert_close(fresh.score(prompts, texts), expected, rtol=0, atol=1e-5)


def test_warm_start_continues_from_saved_weights(trained, tmp_path):
    rm, tok = trained.rm, trained.loaded.tokenizer
    folder = rm.save(tmp_path / "rm-v1")
    pairs = trained.pairs[:64]
    prompts, texts = [p["prompt"] for p in pairs[:8]], [p["rejected"] for p in pairs[:8]]
    cfg = RewardConfig(
        learning_rate=5e-3, epochs=0, batch_size=16, max_length=64, adapter_name="reward_warm", normalizer_samples=32
    )
    same, m0 = train_reward_model(rm.model, tok, pairs, [], cfg, warm_start=folder)
    assert m0.steps == 0 and m0.warm_start == str(folder)
    assert torch.equal(same.score(prompts, texts, normalized=False), rm.score(prompts, texts, normalized=False))
    # one more epoch starts where the first run ended, not from scratch
    cfg = dataclasses.replace(cfg, epochs=1)
    _, m1 = train_reward_model(rm.model, tok, pairs, [], cfg, warm_start=folder)
    assert m1.steps > 0 and m1.loss_curve[0] < 0.5 * trained.metrics.loss_curve[0]
    assert trained.peft.active_adapters == ["policy"]


def test_time_budget_and_empty_feedback(trained):
    tok = trained.loaded.tokenizer
    cfg = RewardConfig(max_seconds=0.0, adapter_name="reward_budget", max_length=64)
    _, m = train_reward_model(trained.peft, tok, trained.pairs[:40], [], cfg)
    assert m.steps == 0 and m.timed_out and m.thumb_accuracy is None
    with pytest.raises(ValueError, match="no usable feedback"):
        train_reward_model(trained.peft, tok, [], [], cfg)


@pytest.mark.filterwarnings("error:.*autograd kernel was not registered")  # grads through bnb's inference kernel
def test_trains_on_an_nf4_base(tiny_model_dir, tmp_path):
    """bitsandbytes NF4 storage, bfloat16 compute (the CUDA recipe), here on the CPU,
    after an eval forward (which lets bitsandbytes repack CPU weights for inference)."""
    try:
        loaded = load_tiny(tiny_model_dir, tmp_path, quantization="nf4", compute_dtype="bfloat16", device="cpu")
    except Exception as exc:  # noqa: BLE001 - a bitsandbytes build without CPU 4-bit
        pytest.skip(f"NF4 unavailable here: {exc}")
    ids = loaded.tokenizer("hello great", return_tensors="pt").input_ids
    with torch.no_grad():
        loaded.model.eval()(ids)  # as serving / rollouts would
    pairs = synthetic_pairs(32, seed=7)
    cfg = RewardConfig(learning_rate=5e-3, epochs=2, batch_size=16, max_length=64, holdout_fraction=0.0, normalizer_samples=32)
    rm, m = train_reward_model(loaded.model, loaded.tokenizer, pairs, [], cfg)
    assert m.steps == 4 and m.final_loss < m.loss_curve[0]
    assert all(math.isfinite(x) for x in m.loss_curve) and m.pairwise_accuracy is None
    assert rm.head.linear.weight.dtype == torch.float32
    assert not any(p.requires_grad for n, p in rm.model.named_parameters() if "lora_" not in n)
    # the quantized base stays exactly as it was through another training run
    with torch.no_grad(), rm.model.disable_adapter():
        base_logits = rm.model(ids).logits
    train_reward_model(rm.model, loaded.tokenizer, pairs, [], dataclasses.replace(cfg, epochs=1, adapter_name="reward2"))
    with torch.no_grad(), rm.model.disable_adapter():
        assert torch.equal(rm.model(ids).logits, base_logits)
