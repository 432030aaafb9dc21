"""PolicyServer: streaming, A/B mixed batches, hot-swap safety, refusal of bad adapters."""

from __future__ import annotations

import threading

import pytest
from conftest import write_random_adapter

from rlhf_demo.modeling.adapters import AdapterError
from rlhf_demo.serving import BASE_VERSION, Generation, Sampling

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(server, version: str | None = None, n: int = 12) -> Generation:
    return server.generate(PROMPT, version, temperature=0, max_new_tokens=n)


def test_stream_yields_growing_text_then_result(runtime):
    items = list(runtime.server.stream(PROMPT, temperature=0, max_new_tokens=16))
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
    runtime.server.activate("v1")
    after = greedy(runtime.server)
    assert after.version == "v1"
    assert after.text != before.text


def test_identity_v0_equals_base(runtime):
    assert greedy(runtime.server, "v0").text == greedy(runtime.server, BASE_VERSION).text


def test_mixed_adapter_pair_equals_per_adapter_generation(runtime, tiny_loaded, settings):
    runtime.server.load_version("v1", write_random_adapter(tiny_loaded, settings, "v1", seed=2))
    a, b = runtime.server.generate_pair(PROMPT, ("v1", BASE_VERSION), temperature=0, max_new_tokens=12)
    assert (a.version, b.version) == ("v1", BASE_VERSION)
    assert a.text == greedy(runtime.server, "v1").text
    assert b.text == greedy(runtime.server, BASE_VERSION).text
    assert a.text != b.text


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
        server.activate("v1" if server.active == "v0" else "v0")
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
        runtime.server.activate("v9")
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
    assert Sampling.clamp(settings.sampling, temperature=0).generate_kwargs()["do_sample"] is False


def test_unload_keeps_active_and_in_use(runtime, tiny_loaded, settings):
    for i in (1, 2, 3):
        runtime.server.load_version(f"v{i}", write_random_adapter(tiny_loaded, settings, f"v{i}", seed=i))
    runtime.server.activate("v1")
    dropped = runtime.server.unload_unused(keep=1)
    assert "v1" not in dropped and "v1" in runtime.server.loaded_versions
    assert greedy(runtime.server).version == "v1"
