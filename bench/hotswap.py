"""Hot-swap under a steady chat load: publish new versions while API clients chat.

Measures, per published version: how long the swap held the generation lock (what a chat
request can be blocked by), the whole load (read, check, copy into a slot: runs beside the
chat), the time from the registry row (publish) to the first answer written by the new
version, and failed requests over the whole run. Baseline, same run and same load: PEFT
``load_adapter`` of the same folders under the generation lock (what serving did before the
slot pool). The adapters are published with the worker's own ``publish()`` (random non-zero
LoRA weights, so the answers visibly change). Loopback only, bounded in count and time.

    python bench/hotswap.py                                   # SmolLM2 (offline GGUF), auto precision
    python bench/hotswap.py --model tiny --versions 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_demo.config import DEFAULT_MODEL, load_settings  # noqa: E402
from rlhf_demo.runtime import Runtime  # noqa: E402
from rlhf_demo.ui.app import launch_local  # noqa: E402
from rlhf_demo.ui.handlers import message_text  # noqa: E402
from rlhf_demo.ui.handlers.chat import read_version_tag  # noqa: E402


def publish_random_version(runtime: Runtime, worker_model, seed: int) -> tuple[str, object]:
    """What the worker does after a passed gate, with a random candidate instead of PPO;
    returns the version and the worker's (now PEFT-wrapped) model for the next call."""
    import torch

    from rlhf_demo.modeling.adapters import attach_new_adapter
    from rlhf_demo.worker.publish import publish

    model = attach_new_adapter(worker_model, "policy", runtime.settings.lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.policy." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    version = publish(
        runtime.store, model, "policy", runtime.settings.adapters_dir, runtime.store.active_version(), {"bench": True}
    )
    model.delete_adapter("policy")
    return version, model


def baseline_load_ms(runtime: Runtime, folder: str) -> float:
    """PEFT ``load_adapter`` (builds the LoRA modules) under the generation lock, then removed."""
    server = runtime.server
    with server.pool.lock:
        started = time.perf_counter()
        server.model.load_adapter(folder, adapter_name="baseline", is_trainable=False)
        elapsed = 1000 * (time.perf_counter() - started)
        server.model.delete_adapter("baseline")
    return elapsed


def run(
    model: str, versions: int, clients: int, max_new_tokens: int, data_dir: Path, quantization: str = "auto", poll_s: float = 0.5
) -> dict:
    from gradio_client import Client

    from rlhf_demo.modeling import load_model

    settings = load_settings(env={}, model=model, data_dir=data_dir, quantization=quantization, registry_poll_seconds=poll_s)
    runtime = Runtime(settings)
    runtime.start_polling()
    worker_model = load_model(settings).model  # the worker's own base, as in production
    demo, url = launch_local(runtime)
    stop = threading.Event()
    answers: list[tuple[float, str]] = []  # (finished at, version tag)
    failures: list[str] = []
    requests = [0]

    def chat_forever(i: int) -> None:
        client = Client(url, verbose=False)
        while not stop.is_set():
            try:
                requests[0] += 1
                chat, _ = client.predict(f"Client {i}: tell me something.", [], 0.7, 0.9, max_new_tokens, api_name="/chat")
                tag = read_version_tag(message_text(chat[-1]["content"]))[1] or "?"
                answers.append((time.time(), tag))
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                failures.append(repr(exc))

    threads = [threading.Thread(target=chat_forever, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3)
    results = []
    for n in range(versions):
        version, worker_model = publish_random_version(runtime, worker_model, seed=n)
        published_at = time.time()  # the registry row is the commit point
        deadline = published_at + 600
        while time.time() < deadline and len(failures) < 10 and not any(v == version and t > published_at for t, v in answers):
            time.sleep(0.05)
        first = min((t for t, v in answers if v == version and t > published_at), default=float("nan"))
        swap = next((s for s in reversed(runtime.status.swaps) if s["version"] == version), {})
        results.append(
            {
                "version": version,
                "mode": swap.get("mode"),
                "swap_load_ms": swap.get("load_ms"),
                "swap_prepare_ms": swap.get("prepare_ms"),
                "swap_total_ms": swap.get("total_ms"),
                "publish_to_first_answer_s": first - published_at,
            }
        )
    folders = {row["version"]: row["path"] for row in runtime.store.list_versions()}
    for result in results:  # the old way, same folders, chat still running
        result["baseline_load_ms"] = baseline_load_ms(runtime, folders[result["version"]])
    stop.set()
    for t in threads:
        t.join(timeout=300)
    demo.close()
    runtime.close()
    return {
        "model": runtime.loaded.describe(),
        "clients": clients,
        "requests": requests[0],
        "failed": len(failures),
        "failures": failures[:5],
        "swaps": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--quantization", default="auto", help="auto (what serving uses), nf4, int8, fp32")
    parser.add_argument("--data-dir", help="reuse a data dir (keeps the converted offline model); default: a temp dir")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(args.data_dir) if args.data_dir else Path(scratch)
        r = run(args.model, args.versions, args.clients, args.max_new_tokens, data_dir, args.quantization)
    print(f"\nmodel {r['model']}, {r['clients']} chatting clients, {r['requests']} requests, failed {r['failed']}")
    header = ("version", "mode", "lock ms", "whole load ms", "baseline lock ms", "publish→first answer s")
    print(f"{header[0]:<8} {header[1]:<8} {header[2]:>8} {header[3]:>14} {header[4]:>17} {header[5]:>23}")
    for s in r["swaps"]:
        print(
            f"{s['version']:<8} {s['mode'] or '?':<8} {s['swap_load_ms'] or 0:>8.1f} {s['swap_prepare_ms'] or 0:>14.1f}"
            f" {s['baseline_load_ms']:>17.1f} {s['publish_to_first_answer_s']:>23.2f}"
        )
    locked = [s["swap_load_ms"] for s in r["swaps"] if s["swap_load_ms"] is not None]
    baseline = [s["baseline_load_ms"] for s in r["swaps"]]
    if locked:
        print(
            f"median time the swap held the generation lock: {statistics.median(locked):.1f} ms "
            f"(baseline load_adapter: {statistics.median(baseline):.1f} ms)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
