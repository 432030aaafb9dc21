"""Hot-swap under a steady chat load: publish new versions while API clients chat.

Measures, per published version: the swap's own duration (adapter load while holding the
generation lock, plus the pointer switch), the time from the registry row (publish) to the
first answer written by the new version, and failed requests over the whole run. The
adapters are published with the worker's own ``publish()`` (random non-zero LoRA weights,
so the answers visibly change). Loopback only, bounded in count and time.

    python bench/hotswap.py                                   # SmolLM2 (offline GGUF), fp32
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


def publish_random_version(runtime: Runtime, worker_model, seed: int) -> str:
    """What the worker does after a passed gate, with a random candidate instead of PPO."""
    import torch

    from rlhf_demo.modeling.adapters import attach_new_adapter
    from rlhf_demo.worker.publish import publish

    model = attach_new_adapter(worker_model, "policy", runtime.settings.lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.policy." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    version = publish(runtime.store, model, "policy", runtime.settings.adapters_dir, runtime.store.active_version(), {"bench": True})
    model.delete_adapter("policy")
    return version


def run(model: str, versions: int, clients: int, max_new_tokens: int, data_dir: Path, poll_s: float = 0.5) -> dict:
    from gradio_client import Client

    from rlhf_demo.modeling import load_model

    settings = load_settings(env={}, model=model, data_dir=data_dir, quantization="fp32", poll_seconds=poll_s)
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
                tag = message_text(chat[-1]["content"]).rsplit("written by adapter ", 1)[-1].split("<")[0]
                answers.append((time.time(), tag))
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                failures.append(repr(exc))

    threads = [threading.Thread(target=chat_forever, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3)
    results = []
    for n in range(versions):
        version = publish_random_version(runtime, worker_model, seed=n)
        published_at = time.time()  # the registry row is the commit point
        deadline = published_at + 600
        while time.time() < deadline and len(failures) < 10 and not any(v == version and t > published_at for t, v in answers):
            time.sleep(0.05)
        first = min((t for t, v in answers if v == version and t > published_at), default=float("nan"))
        swap = next((s for s in reversed(runtime.status.swaps) if s["version"] == version), {})
        results.append({"version": version, "swap_load_ms": swap.get("load_ms"), "swap_total_ms": swap.get("total_ms"), "publish_to_first_answer_s": first - published_at})
    stop.set()
    for t in threads:
        t.join(timeout=300)
    demo.close()
    runtime.close()
    return {"model": model, "clients": clients, "requests": requests[0], "failed": len(failures), "failures": failures[:5], "swaps": results}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--data-dir", help="reuse a data dir (keeps the converted offline model); default: a temp dir")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(args.data_dir) if args.data_dir else Path(scratch)
        r = run(args.model, args.versions, args.clients, args.max_new_tokens, data_dir)
    print(f"\nmodel {r['model']}, {r['clients']} chatting clients, {r['requests']} requests, failed {r['failed']}")
    print(f"{'version':<8} {'swap load ms':>12} {'swap total ms':>14} {'publish→first answer s':>23}")
    for s in r["swaps"]:
        print(f"{s['version']:<8} {s['swap_load_ms'] or 0:>12.1f} {s['swap_total_ms'] or 0:>14.1f} {s['publish_to_first_answer_s']:>23.2f}")
    loads = [s["swap_load_ms"] for s in r["swaps"] if s["swap_load_ms"] is not None]
    if loads:
        print(f"median swap (load under lock) {statistics.median(loads):.1f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
