"""The generation engine: requests share decode steps, yet each answer is exactly its own.

Concurrency is made deterministic with ``should_stop``: the engine's decode thread calls it
after every token of that request, so a callback that waits on an event holds the batch at a
known step while the test submits a neighbour.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import wait_until, write_random_adapter

from rlhf_demo.modeling.adapters import use_adapter
from rlhf_demo.serving import BASE_VERSION, Generation, PromptRefused, Sampling
from rlhf_demo.serving.engine import Engine
from rlhf_demo.serving.prompts import PromptBudget

SHORT = [{"role": "user", "content": "Hi!"}]
LONG = [{"role": "user", "content": "Tell me, in as many words as you like, what the capital of France is and why."}]


def greedy(n: int) -> Sampling:
    return Sampling(temperature=0.0, top_p=1.0, max_new_tokens=n)


def alone(server, messages, version, n: int = 20) -> Generation:
    return server.generate(messages, version, greedy(n))


def finish(stream) -> Generation:
    *_, result = stream
    assert isinstance(result, Generation)
    return result


class Gate:
    """A ``should_stop`` that holds the engine after the request's first token until opened."""

    def __init__(self) -> None:
        self.reached, self.opened = threading.Event(), threading.Event()

    def __call__(self) -> bool:
        self.reached.set()
        assert self.opened.wait(30), "the test never opened the gate"
        return False


def pinned(server, count: int) -> None:
    """Wait until ``count`` requests hold their version (submitted to the engine)."""
    wait_until(lambda: sum(server.pool._in_use.values()) == count, timeout=30, what=f"{count} requests submitted")


def consume(results: dict, key: str, stream) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.update({key: finish(stream)}))
    thread.start()
    return thread


@pytest.fixture
def two_versions(runtime, tiny_loaded, settings):
    server = runtime.server
    server.load_version("v1", write_random_adapter(tiny_loaded, settings, "v1", seed=11))
    server.load_version("v2", write_random_adapter(tiny_loaded, settings, "v2", seed=12))
    return server


def test_a_request_joining_a_running_batch_changes_neither_answer(two_versions):
    server = two_versions
    expected_a, expected_b = alone(server, LONG, "v1"), alone(server, SHORT, "v2")
    assert expected_a.text != expected_b.text
    steps_before = server.engine.steps
    gate = Gate()
    results: dict[str, Generation] = {}
    runner = consume(results, "a", server.stream(LONG, "v1", greedy(20), should_stop=gate))
    assert gate.reached.wait(30)  # a is in the batch, one token written
    joiner = consume(results, "b", server.stream(SHORT, "v2", greedy(20)))  # another prompt length: left padding
    pinned(server, 2)
    gate.opened.set()
    runner.join(60)
    joiner.join(60)
    a, b = results["a"], results["b"]
    assert (a.text, a.version, a.completion_tokens) == (expected_a.text, "v1", expected_a.completion_tokens)
    assert (b.text, b.version, b.completion_tokens) == (expected_b.text, "v2", expected_b.completion_tokens)
    shared = a.completion_tokens + b.completion_tokens - (server.engine.steps - steps_before)
    assert shared > 1, "the two answers never shared a decode step"


def test_generate_many_decodes_together_and_equals_each_alone(two_versions):
    server = two_versions
    prompts = [SHORT, LONG, [{"role": "user", "content": "Name three colours."}]]
    expected = [alone(server, p, "v1") for p in prompts]
    together = server.generate_many(prompts, "v1", greedy(20))
    assert [(g.text, g.token_ids) for g in together] == [(g.text, g.token_ids) for g in expected]
    assert all(g.token_ids and g.prompt_tokens for g in together)


@pytest.mark.parametrize("call", ["generate_many", "stream_samples"])
def test_the_rows_of_one_call_enter_the_engine_together_on_a_busy_machine(two_versions, monkeypatch, call):
    """A call's rows are admitted in one prefill even when the decode thread wakes between
    them (a loaded CI machine): otherwise the batch, and so the sampled tokens and even greedy
    ones, depend on timing. Here every hold after the first is slowed to make that certain."""
    server, prefills = two_versions, []
    hold, prefill = server.pool.hold, server.engine._prefill
    calls = iter(range(100))

    def slow_hold(version):
        if next(calls):
            time.sleep(0.3)
        return hold(version)

    def counting_prefill(rows):
        prefills.append(len(rows))
        return prefill(rows)

    monkeypatch.setattr(server.pool, "hold", slow_hold)
    monkeypatch.setattr(server.engine, "_prefill", counting_prefill)
    if call == "generate_many":
        server.generate_many([SHORT, LONG, SHORT], "v1", greedy(6))
    else:
        *_, done = server.stream_samples(SHORT, 3, "v1", greedy(6))
        assert len(done) == 3
    assert prefills == [3]


def test_one_adapter_batches_skip_the_per_row_path_with_the_same_tokens(two_versions, monkeypatch):
    """A batch whose rows share one adapter runs it as PEFT's active adapter (no ``adapter_names``):
    its greedy tokens equal the per-row path's (a pair on two versions) and plain ``generate``'s."""
    server = two_versions
    model = server.model
    forward, routes = model.forward, []

    def seen(*a, **k):  # each forward: did it take the per-row path, over how many rows
        routes.append(("adapter_names" in k, k["input_ids"].shape[0]))
        return forward(*a, **k)

    monkeypatch.setattr(model, "forward", seen)
    fast = alone(server, LONG, "v1")
    pair = server.generate_pair(LONG, ("v1", "v1"), greedy(20))
    assert routes and not any(per_row for per_row, _ in routes), "a one-adapter batch took the per-row path"
    routes.clear()
    mixed, other = server.generate_pair(LONG, ("v1", "v2"), greedy(20))
    # Every step the two versions share takes the per-row path; a row decoding alone (admitted
    # before the other, or after the other ended, as on a busy machine) may take the plain one.
    shared = [per_row for per_row, rows in routes if rows > 1]
    assert shared and all(shared), "a step shared by two adapters took the one-adapter path"
    _, ids = server.encode(LONG)
    _, slot = server.pool.hold("v1")
    try:
        with server.pool.lock, use_adapter(model, slot), torch.inference_mode():  # the engine waits meanwhile
            written = model.generate(**ids, do_sample=False, max_new_tokens=20, eos_token_id=sorted(server._eos()))
    finally:
        server.pool.release("v1")
    plain = [t for t in written[0, ids["input_ids"].shape[1] :].tolist() if t not in server._eos()]
    assert fast.token_ids == pair[0].token_ids == pair[1].token_ids == mixed.token_ids == tuple(plain)
    assert other.token_ids != fast.token_ids


def test_sampling_draws_from_softmax_over_temperature_within_top_p():
    """Exactly the distribution PPO scores: softmax(logits / T) cut to the top-p nucleus, no top-k;
    rows with other settings in the same batch (greedy, another T or top-p) keep theirs."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(6000, 1)
    warm, nucleus = Sampling(0.5, 1.0, 1), Sampling(1.0, 0.7, 1)
    tokens = Engine._sample(logits, [warm] * 3000 + [nucleus] * 2000 + [greedy(1)] * 1000)
    alike = Engine._sample(logits[:3000], [warm] * 3000)  # one group: the whole batch in one draw

    def frequencies(drawn: torch.Tensor) -> torch.Tensor:
        return torch.bincount(drawn, minlength=4).float() / len(drawn)

    expected = torch.softmax(logits[0] / 0.5, dim=-1)
    assert torch.allclose(frequencies(tokens[:3000]), expected, atol=0.03)
    assert torch.allclose(frequencies(alike), expected, atol=0.03)
    # T = 1: [.64, .24, .09, .03]; top-p 0.7 keeps the two largest, renormalised
    assert torch.allclose(frequencies(tokens[3000:5000]), torch.tensor([0.731, 0.269, 0.0, 0.0]), atol=0.03)
    assert (tokens[5000:] == 0).all()


def test_a_nucleus_wider_than_the_quick_cut_is_still_exact():
    """A flat distribution: the nucleus holds hundreds of tokens; none outside it is ever drawn."""
    torch.manual_seed(0)
    logits = -0.001 * torch.arange(2000.0)  # token order = likelihood order
    probs = torch.softmax(logits.double(), dim=-1)
    inside = int(((probs.cumsum(0) - probs) < 0.5).sum())  # the top-p rule in float64
    assert inside > 256
    tokens = Engine._sample(logits.repeat(5000, 1), [Sampling(1.0, 0.5, 1)] * 5000)
    assert inside - 20 <= int(tokens.max()) < inside


def test_a_cancelled_stream_stops_without_touching_its_neighbour(two_versions):
    server = two_versions
    expected = alone(server, LONG, "v1", n=30)
    gate = Gate()
    results: dict[str, Generation] = {}
    runner = consume(results, "a", server.stream(LONG, "v1", greedy(30), should_stop=gate))
    assert gate.reached.wait(30)
    left = threading.Event()

    def leave() -> None:  # a client that goes away after the first words
        stream = server.stream(SHORT, "v2", greedy(30))
        next(stream)
        stream.close()
        left.set()

    checks: list[int] = []
    leaver = threading.Thread(target=leave)
    leaver.start()
    stopper = consume(
        results,
        "stopped",
        server.stream(SHORT, BASE_VERSION, greedy(30), should_stop=lambda: checks.append(1) or len(checks) >= 3),
    )
    pinned(server, 3)
    gate.opened.set()
    for thread in (runner, leaver, stopper):
        thread.join(60)
    assert left.is_set()
    cut = results["stopped"]
    assert cut.finish_reason == "cancelled" and cut.completion_tokens == 3
    assert results["a"].text == expected.text and results["a"].finish_reason == expected.finish_reason
    wait_until(lambda: all(count == 0 for count in server.pool._in_use.values()), timeout=30, what="every version released")


def test_hot_swaps_during_a_batched_decode_change_no_running_answer(two_versions, tiny_loaded, settings):
    server = two_versions
    folders = {f"v{i}": write_random_adapter(tiny_loaded, settings, f"v{i}", seed=30 + i) for i in range(3, 8)}
    expected = {"v1": alone(server, LONG, "v1", n=24).text, "v2": alone(server, SHORT, "v2", n=24).text}
    gate = Gate()
    results: dict[str, Generation] = {}
    runners = [consume(results, "v1", server.stream(LONG, "v1", greedy(24), should_stop=gate))]
    assert gate.reached.wait(30)
    runners.append(consume(results, "v2", server.stream(SHORT, "v2", greedy(24))))
    pinned(server, 2)
    for version, folder in folders.items():  # more versions than slots: idle ones are evicted
        server.load_version(version, folder)
        server.swap_to(version)
        assert server.last_load_mode == "hotswap"
    gate.opened.set()
    for runner in runners:
        runner.join(60)
    assert {v: g.text for v, g in results.items()} == expected


def test_a_forged_history_of_many_messages_is_refused_before_tokenizing(runtime, monkeypatch):
    server = runtime.server
    calls = []
    original = server.tokenizer.apply_chat_template
    monkeypatch.setattr(server.tokenizer, "apply_chat_template", lambda *a, **k: calls.append(1) or original(*a, **k))
    forged = [{"role": "assistant", "content": "ok"}] * 1000 + SHORT
    with pytest.raises(PromptRefused, match="messages"):
        server.generate(forged, sampling=greedy(4))
    huge_system = [{"role": "system", "content": "x" * 60_000}, *SHORT]
    with pytest.raises(PromptRefused, match="too long"):
        server.generate(huge_system, sampling=greedy(4))
    assert calls == [], "a refused request reached the tokenizer"


def test_a_long_history_is_trimmed_from_the_oldest_turns_in_few_tokenizer_passes(runtime, monkeypatch):
    server = runtime.server
    server.budget = PromptBudget(max_tokens=200, max_messages=64, max_chars=48_000)
    history = []
    for i in range(30):
        history += [
            {"role": "user", "content": f"question {i} " + "word " * 20},
            {"role": "assistant", "content": f"answer {i} " + "word " * 20},
        ]
    history.append({"role": "user", "content": "the last question"})
    calls = []
    original = server.tokenizer.apply_chat_template
    monkeypatch.setattr(server.tokenizer, "apply_chat_template", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = server.generate(history, sampling=greedy(4))
    assert result.prompt_tokens <= 200
    assert result.prompt[-1] == history[-1] and result.prompt == history[-len(result.prompt) :], "not the newest turns"
    assert len(result.prompt) < len(history)
    assert len(calls) <= 4, f"the conversation was re-tokenized {len(calls)} times"


def test_a_single_message_over_the_token_budget_is_refused(runtime):
    runtime.server.budget = PromptBudget(max_tokens=50)
    with pytest.raises(PromptRefused, match="tokens"):
        runtime.server.generate([{"role": "user", "content": "word " * 200}], sampling=greedy(4))


@pytest.mark.parametrize("max_batch", [2, 16])
def test_the_engine_decodes_at_most_max_batch_answers_a_step(max_batch, tmp_path, tiny_model_dir):
    """``max_batch`` (RLHF_DEMO_MAX_BATCH) is how many answers share a decode step; the rest
    wait for a free row and still get exactly their own answer."""
    from rlhf_demo.config import load_settings
    from rlhf_demo.runtime import Runtime

    settings = load_settings(
        env={"RLHF_DEMO_MAX_BATCH": str(max_batch)}, model=str(tiny_model_dir), data_dir=tmp_path, quantization="fp32"
    )
    runtime = Runtime(settings)
    try:
        server = runtime.server
        prompts = [SHORT, LONG, SHORT, LONG]
        expected = [alone(server, p, BASE_VERSION) for p in prompts]
        steps_before = server.engine.steps
        together = server.generate_many(prompts, BASE_VERSION, greedy(20))
        steps = server.engine.steps - steps_before
        decoded = sum(g.completion_tokens - 1 for g in together)  # the first token comes from the prefill
        assert [g.text for g in together] == [g.text for g in expected]
        assert decoded <= max_batch * steps
        if max_batch >= len(prompts):  # one batch: as many steps as the longest answer needs
            assert steps <= max(g.completion_tokens for g in together), "answers that fit one batch were decoded apart"
    finally:
        runtime.close()


def test_a_max_batch_below_one_is_refused_by_name():
    from rlhf_demo.config import load_settings

    with pytest.raises(ValueError, match="max_batch"):
        load_settings(env={"RLHF_DEMO_MAX_BATCH": "0"})


def test_a_seeded_random_adapter_is_the_same_in_any_test_order(runtime, settings, tiny_loaded):
    """The engine tests' random versions must not depend on the draws of the tests before
    them (PEFT draws LoRA A from torch's global generator): in one order of the suite v1
    answered a prompt with an immediate EOS, in the other it did not."""
    from safetensors.torch import load_file

    def weights(name: str) -> dict:
        folder = write_random_adapter(tiny_loaded, settings, name, seed=3)
        return load_file(str(next(folder.rglob("*.safetensors"))))

    first = weights("a")
    torch.rand(1000)  # another test's draws
    second = weights("b")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
