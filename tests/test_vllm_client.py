"""The vLLM engine's client against an in-process stand-in of vLLM's API (fast; the real server
is tests/test_vllm_engine.py): requests carry our prompt tokens, version, sampling and EOS
rule; n samples of one prompt are one request; Stop aborts; a restarted server is re-fed."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import wait_until
from fake_vllm import FakeVllm
from transformers import AutoTokenizer

from rlhf_demo.config import SamplingBounds
from rlhf_demo.modeling.adapters import AdapterError
from rlhf_demo.serving import BASE_VERSION, Generation, PolicyServer, Sampling
from rlhf_demo.serving.interface import EngineError, ServingEngine
from rlhf_demo.serving.vllm_engine import TOO_LONG, UNREACHABLE, VllmEngine

HELLO = [{"role": "user", "content": "Hello there"}]
EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def fake(tokenizer):
    answers = {
        name: tokenizer.encode(text, add_special_tokens=False)
        for name, text in [("base", " plain answer"), ("v1", " one one"), ("v2", " two two two")]
    }
    server = FakeVllm(answers, eos=EOS)
    yield server
    server.close()


@pytest.fixture
def engine(fake, tokenizer, tmp_path):
    engine = VllmEngine(fake.url, tokenizer, frozenset({EOS}), SamplingBounds())
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        engine.load_version(version, tmp_path / version)
    yield engine
    engine.close()


def test_both_engines_are_a_serving_engine(engine, tiny_loaded, settings):
    assert isinstance(engine, ServingEngine)
    assert isinstance(PolicyServer(tiny_loaded, settings.sampling), ServingEngine)


def test_a_stream_sends_our_prompt_tokens_and_settings_and_returns_our_generation(engine, fake, tokenizer):
    items = list(engine.stream(HELLO, None, Sampling(0.0, 0.9, 40)))
    result = items[-1]
    assert isinstance(result, Generation) and all(isinstance(i, str) for i in items[:-1])
    body = fake.requests[-1]
    _, ids = engine.encode(HELLO)
    assert body["prompt"] == ids["input_ids"][0].tolist() and body["model"] == "base"
    assert (body["temperature"], body["max_tokens"], body["n"], body["stop_token_ids"], body["ignore_eos"]) == (
        0.0,
        40,
        1,
        [EOS],
        False,
    )
    assert result.token_ids == tuple(fake.answers["base"])  # the EOS is not part of the answer
    assert result.text == "plain answer" and result.finish_reason == "stop" and result.version == BASE_VERSION
    assert (result.prompt_tokens, result.completion_tokens) == (len(body["prompt"]), len(fake.answers["base"]))
    assert items[-2] == "plain answer"


def test_the_active_version_and_a_named_one_are_sent_by_name(engine, fake):
    engine.swap_to("v1")
    assert engine.generate(HELLO).version == "v1" and fake.requests[-1]["model"] == "v1"
    assert engine.generate(HELLO, "v2").text == "two two two"
    cut = engine.generate(HELLO, "v2", Sampling(0.7, 0.9, 2))
    assert cut.finish_reason == "length" and cut.completion_tokens == 2
    with pytest.raises(AdapterError, match="not loaded"):
        engine.swap_to("v9")


def test_n_samples_of_one_prompt_are_one_request_with_n(engine, fake):
    results = engine.generate_many([HELLO] * 4, "v1", Sampling(0.7, 0.9, 20))
    assert len(fake.requests) == 1 and fake.requests[0]["n"] == 4
    assert [r.text for r in results] == ["one one"] * 4
    other = [{"role": "user", "content": "Something else"}]
    results = engine.generate_many([HELLO, other, HELLO], "v2")
    assert sorted(r["n"] for r in fake.requests[1:]) == [1, 2]  # sent at once, in any order
    assert [r.prompt[-1]["content"] for r in results] == ["Hello there", "Something else", "Hello there"]


def test_a_pair_of_versions_streams_both_in_the_callers_order(engine, fake):
    *progress, results = engine.stream_pair(HELLO, ("v2", "v1"))
    assert [r.version for r in results] == ["v2", "v1"] and progress[-1] == ("two two two", "one one")
    *_, same = engine.stream_pair(HELLO, ("v1", "v1"))
    assert fake.requests[-1]["n"] == 2 and [r.text for r in same] == ["one one", "one one"]
    *_, three = engine.stream_pair(HELLO, ("v1", "v2", "v1"))  # k candidates
    assert [r.version for r in three] == ["v1", "v2", "v1"]


def test_stop_ends_the_answer_and_vllm_sees_the_stream_closed(engine, fake, tokenizer):
    fake.answers["v1"] = tokenizer.encode(" word" * 200, add_special_tokens=False)
    fake.delay_s = 0.01
    seen = []
    for item in engine.stream(HELLO, "v1", Sampling(0.7, 0.9, 300), should_stop=lambda: len(seen) >= 3):
        seen.append(item)
    result = seen[-1]
    assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < 200
    wait_until(lambda: fake.aborted == 1, what="the server to see the stream closed")
    assert engine._in_use["v1"] == 0  # noqa: SLF001 - the pin is released


def test_a_restarted_server_gets_the_version_again(engine, fake, tmp_path):
    engine.swap_to("v1")
    fake.restart()
    assert engine.generate(HELLO).text == "one one"
    assert fake.adapters == {"v1": str((tmp_path / "v1").resolve())}


def test_unload_keeps_the_active_and_in_use_versions(engine, fake, tmp_path):
    engine.swap_to("v2")
    stream = engine.stream(HELLO, "v1")
    next(stream)  # v1 is in use
    assert engine.unload_unused(0) == []
    stream.close()
    assert engine.unload_unused(0) == ["v1"] and list(fake.adapters) == ["v2"] and engine.loaded_versions == ["v2"]


def test_refusals_and_outages_are_our_own_messages(engine, fake, tmp_path):
    fake.refuse.add("v3")
    with pytest.raises(AdapterError, match="vLLM refused adapter 'v3': .*bad rank"):
        engine.load_version("v3", tmp_path)
    fake.max_prompt = 3
    with pytest.raises(EngineError) as refused:
        engine.generate(HELLO)
    assert str(refused.value) == TOO_LONG
    fake.close()
    with pytest.raises(EngineError) as gone:
        engine.generate(HELLO)
    assert str(gone.value) == UNREACHABLE


def test_the_runtime_serves_the_registry_through_vllm_and_marks_a_refused_version_broken(settings, tiny_loaded, fake, tmp_path):
    from rlhf_demo.runtime import Runtime

    runtime = Runtime(dataclasses.replace(settings, engine="vllm", engine_url=fake.url), tiny_loaded)
    try:
        assert isinstance(runtime.server, VllmEngine) and runtime.server.active == "v0" and "v0" in fake.adapters
        fake.answers["v0"] = fake.answers["base"]
        fake.refuse.add("v5")
        runtime.store.register_version("v5", str(tmp_path), None, "active", {})
        assert runtime.sync_registry() == "v0"
        assert "v5" in runtime.status.refused and runtime.store.active_version() == "v0"
    finally:
        runtime.close()


def test_the_engine_is_chosen_by_flag_or_environment_and_vllm_needs_a_url():
    from rlhf_demo.cli import serve_parser, settings_from
    from rlhf_demo.config import load_settings

    args = serve_parser().parse_args(["--engine", "vllm", "--engine-url", "http://127.0.0.1:8123"])
    assert (settings_from(args).engine, settings_from(args).engine_url) == ("vllm", "http://127.0.0.1:8123")
    assert load_settings(env={}).engine == "embedded"
    with pytest.raises(ValueError, match="engine_url"):
        load_settings(env={"RLHF_DEMO_ENGINE": "vllm"})
    with pytest.raises(ValueError, match="engine must be one of"):
        load_settings(env={"RLHF_DEMO_ENGINE": "tgi"})


def test_an_app_started_without_its_vllm_server_says_so(settings, tiny_loaded):
    from rlhf_demo.runtime import Runtime, StartupError

    with pytest.raises(StartupError, match="no vLLM server answers at http://127.0.0.1:9"):
        Runtime(dataclasses.replace(settings, engine="vllm", engine_url="http://127.0.0.1:9"), tiny_loaded)
