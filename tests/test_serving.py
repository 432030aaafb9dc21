"""PolicyServer: streaming, A/B mixed batches, hot-swap safety, refusal of bad adapters."""

from __future__ import annotations

import threading

import pytest
from conftest import write_random_adapter

from rlhf_demo.modeling.adapters import AdapterError
from rlhf_demo.serving import BASE_VERSION, Generation, Sampling

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(server, version: str | None = None, n: int = 12) -> Generation:
    return server.generate(PROMPT, version, sampling=Sampling(0.0, 1.0, n))


def test_stream_yields_growing_text_then_result(runtime):
    items = list(runtime.server.stream(PROMPT, sampling=Sampling(0.0, 1.0, 16)))
    texts, result = items[:-1], items[-1]
    assert isinstance(result, Generation)
    assert len(texts) >= 3, "tokens must arrive incrementally, not in one piece"
    assert all(isinstance(t, str) for t in texts)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert result.version == "v0" and result.completion_tokens > 0
    assert result.prompt == PROMPT and result.prompt_tokens > 0


def test_swap_changes_the_answer(runtime, tiny_loaded, settings):
    before = greedy(runtime.server)
    runtime.server.load_version("v1", write_random_adapter(tiny_loaded, settings, "v1", seed=1))
    runtime.server.swap_to("v1")
    after = greedy(runtime.server)
    assert after.version == "v1"
    assert after.text != before.text


def test_identity_v0_equals_base(runtime):
    assert greedy(runtime.server, "v0").text == greedy(runtime.server, BASE_VERSION).text


def test_mixed_adapter_pair_equals_per_adapter_generation(runtime, tiny_loaded, settings):
    runtime.server.load_version("v1", write_random_adapter(tiny_loaded, settings, "v1", seed=2))
    a, b = runtime.server.generate_pair(PROMPT, ("v1", BASE_VERSION), sampling=Sampling(0.0, 1.0, 12))
    assert (a.version, b.version) == ("v1", BASE_VERSION)
    assert a.text == greedy(runtime.server, "v1").text
    assert b.text == greedy(runtime.server, BASE_VERSION).text
    assert a.text != b.text


def test_streamed_pair_grows_and_ends_with_the_batched_pair(runtime, tiny_loaded, settings):
    runtime.server.load_version("v1", write_random_adapter(tiny_loaded, settings, "v1", seed=2))
    items = list(runtime.server.stream_pair(PROMPT, ("v1", BASE_VERSION), sampling=Sampling(0.0, 1.0, 12)))
    progress, final = items[:-1], items[-1]
    assert len(progress) >= 3, "both answers must arrive incrementally"
    assert all(isinstance(t, tuple) and len(t) == 2 for t in progress)
    for side in (0, 1):
        assert all(b[side].startswith(a[side]) for a, b in zip(progress, progress[1:], strict=False))
    a, b = final
    assert (a.version, b.version) == ("v1", BASE_VERSION)
    expected = runtime.server.generate_pair(PROMPT, ("v1", BASE_VERSION), sampling=Sampling(0.0, 1.0, 12))
    assert (a.text, b.text) == (expected[0].text, expected[1].text)
    assert progress[-1] == (a.text, b.text)


def test_should_stop_ends_the_answer_early_and_still_returns_it(runtime):
    stop = threading.Event()
    items = []
    for item in runtime.server.stream(PROMPT, sampling=Sampling(0.0, 1.0, 40), should_stop=stop.is_set):
        items.append(item)
        stop.set()  # the visitor presses Stop once the first words are shown
    result = items[-1]
    assert isinstance(result, Generation) and result.finish_reason == "cancelled"
    assert 0 < result.completion_tokens < 40
    assert runtime.server.generate(PROMPT, sampling=Sampling(0.0, 1.0, 40)).finish_reason != "cancelled"
    *_, at_once = runtime.server.stream(PROMPT, sampling=Sampling(0.0, 1.0, 40), should_stop=lambda: True)
    assert at_once.finish_reason == "cancelled" and at_once.completion_tokens == 1


def test_swaps_during_concurrent_generations_never_mix_adapters(runtime, tiny_loaded, settings):
    server = runtime.server
    server.load_version("v1", write_random_adapter(tiny_loaded, settings, "v1", seed=3))
    expected = {v: greedy(server, v, n=24).text for v in ("v0", "v1")}
    assert expected["v0"] != expected["v1"]
    results: list[Generation] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(4):
                results.append(greedy(server, None, n=24))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    flips = 0
    while any(t.is_alive() for t in threads):
        server.swap_to("v1" if server.active == "v0" else "v0")
        flips += 1
        threading.Event().wait(0.005)
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 16 and flips > 1
    assert {r.version for r in results} <= {"v0", "v1"}
    for r in results:
        assert r.text == expected[r.version], "an answer mixed two adapters"


def test_corrupt_adapter_is_refused_and_serving_goes_on(runtime, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="corrupt"):
        runtime.server.load_version("v9", bad)
    with pytest.raises(AdapterError):
        runtime.server.swap_to("v9")
    assert runtime.server.active == "v0"
    assert greedy(runtime.server).version == "v0"


def test_incompatible_adapter_is_refused(runtime, tmp_path, tiny_loaded, settings):
    import dataclasses

    wrong = dataclasses.replace(settings, lora=dataclasses.replace(settings.lora, r=4))
    folder = write_random_adapter(tiny_loaded, wrong, "v5", seed=5)
    # Corrupt the shapes: swap the config's rank so PEFT builds r=8 modules for r=4 tensors.
    config = folder / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 4', '"r": 8'))
    with pytest.raises(AdapterError):
        runtime.server.load_version("v5", folder)
    assert "v5" not in runtime.server.loaded_versions
    assert greedy(runtime.server).version == "v0"


def test_sampling_is_clamped_to_bounds(settings):
    s = Sampling.clamp(settings.sampling, temperature=99, top_p=0, max_new_tokens=10**6)
    assert s.temperature == settings.sampling.max_temperature
    assert s.top_p == settings.sampling.min_top_p
    assert s.max_new_tokens == settings.sampling.max_max_new_tokens
    assert Sampling.clamp(settings.sampling, temperature=0).greedy


def test_unload_keeps_active_and_in_use(runtime, tiny_loaded, settings):
    for i in (1, 2, 3):
        runtime.server.load_version(f"v{i}", write_random_adapter(tiny_loaded, settings, f"v{i}", seed=i))
    runtime.server.swap_to("v1")
    dropped = runtime.server.unload_unused(keep=1)
    assert "v1" not in dropped and "v1" in runtime.server.loaded_versions
    assert greedy(runtime.server).version == "v1"


def test_swap_copies_into_a_reserved_slot_without_waiting_for_generation(runtime, tiny_loaded, settings):
    """A new version lands while a generation holds the lock: the swap takes no lock at all."""
    server = runtime.server
    folder = write_random_adapter(tiny_loaded, settings, "v1", seed=11)
    done = threading.Event()
    with server.pool.lock:  # as if a long generation were running
        loader = threading.Thread(target=lambda: (server.load_version("v1", folder), done.set()))
        loader.start()
        assert done.wait(30), "load_version waited for the generation lock"
    loader.join()
    assert server.last_load_mode == "hotswap" and server.last_load_ms == 0.0
    server.swap_to("v1")
    assert greedy(server).version == "v1"


def test_reused_slot_answers_exactly_like_a_fresh_load(runtime, tiny_loaded, settings):
    """Evicted versions free their slot; weights copied into a used slot leave nothing behind."""
    server = runtime.server
    folders = {f"v{i}": write_random_adapter(tiny_loaded, settings, f"v{i}", seed=20 + i) for i in range(1, 7)}
    server.load_version("v1", folders["v1"])
    first = greedy(server, "v1", n=16).text
    for version in ("v2", "v3", "v4", "v5", "v6"):  # more versions than slots: v1 is evicted
        server.load_version(version, folders[version])
        server.swap_to(version)
    assert "v1" not in server.loaded_versions
    assert len(server.model.peft_config) == server.pool.max_slots, "no new modules were built"
    server.load_version("v1", folders["v1"])
    assert server.last_load_mode == "hotswap"
    assert greedy(server, "v1", n=16).text == first
    assert len({greedy(server, v, n=16).text for v in server.loaded_versions}) == len(server.loaded_versions)


def test_adapter_of_another_lora_shape_gets_its_own_slot(runtime, tiny_loaded, settings):
    import dataclasses

    other = dataclasses.replace(settings, lora=dataclasses.replace(settings.lora, r=4, alpha=8))
    folder = write_random_adapter(tiny_loaded, other, "v7", seed=7)
    server = runtime.server
    server.load_version("v7", folder)
    assert server.last_load_mode == "load"
    assert len(server.model.peft_config) == server.pool.max_slots + 1
    server.swap_to("v7")
    answer = greedy(server).text
    assert answer != greedy(server, "v0").text
    server.swap_to("v0")
    odd_slot = server.pool._slot_of["v7"]
    assert server.unload_unused(keep=1) == ["v7"]
    assert len(server.model.peft_config) == server.pool.max_slots, "the extra slot is deleted once unused"
    assert odd_slot not in server.model.peft_config, "the odd-shaped slot goes, not a standard one"
    server.load_version("v8", write_random_adapter(tiny_loaded, settings, "v8", seed=8))
    assert server.last_load_mode == "hotswap"


def test_swap_on_an_nf4_base_never_writes_the_base_weights(tiny_model_dir, tmp_path):
    """On CPU, bitsandbytes repacks NF4 weights on the first forward and ``state_dict()``
    unpacks them again: a swap that called it would write the base beside a generation."""
    import torch

    from rlhf_demo.config import load_settings
    from rlhf_demo.modeling import load_model
    from rlhf_demo.runtime import Runtime

    settings = load_settings(
        env={}, model=str(tiny_model_dir), data_dir=tmp_path / "data", quantization="nf4", compute_dtype="float32"
    )
    runtime = Runtime(settings)
    try:
        server = runtime.server
        base = greedy(server, BASE_VERSION, n=8).text  # the first forward packs the CPU weights
        quantized = [m for m in server.model.modules() if type(m).__name__ == "Linear4bit"]
        assert quantized, "the base is not NF4"
        before = [(m.weight.data.clone(), m.weight.data.data_ptr()) for m in quantized]
        writer = load_model(settings, role="train")  # the worker's own fp32 base writes the adapter
        folder = write_random_adapter(writer, settings, "v1", seed=31)
        server.load_version("v1", folder)
        assert server.last_load_mode == "hotswap"
        for m, (data, ptr) in zip(quantized, before, strict=True):
            assert m.weight.data.data_ptr() == ptr and torch.equal(m.weight.data, data)
        server.swap_to("v1")
        assert greedy(server, n=8).text != base
        assert greedy(server, BASE_VERSION, n=8).text == base
    finally:
        runtime.close()


def test_concurrent_loads_of_one_version_take_one_slot(runtime, tiny_loaded, settings):
    server = runtime.server
    folder = write_random_adapter(tiny_loaded, settings, "v1", seed=41)
    threads = [threading.Thread(target=server.load_version, args=("v1", folder)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.loaded_versions.count("v1") == 1
    assert sum(held == "v1" for held in server.pool._slots.values()) == 1, "a second slot was filled with v1 and leaked"


def test_an_answer_ends_at_any_eos_id_of_the_generation_config(runtime, tiny_loaded):
    """One EOS rule for serving and PPO (modeling.loading.eos_token_ids): chat models list
    their end-of-turn token in the generation config beside the tokenizer's EOS."""
    full = greedy(runtime.server, n=12)
    assert full.finish_reason == "length"
    tok, model = tiny_loaded.tokenizer, runtime.server.model
    _, ids = runtime.server.encode(PROMPT)
    with model.disable_adapter():  # v0 is the identity: the base's greedy tokens are the answer's
        written = model.generate(**ids, do_sample=False, max_new_tokens=12)[0, ids["input_ids"].shape[1] :].tolist()
    model.generation_config.eos_token_id = [tok.eos_token_id, written[3]]
    cut = greedy(runtime.server, n=12)
    assert cut.finish_reason == "stop" and full.text.startswith(cut.text) and len(cut.text) < len(full.text)
