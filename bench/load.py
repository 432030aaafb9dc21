"""Load: N concurrent gradio_client sessions chat and vote against a local app (loopback only).

Prints p50/p95 latency of chat and vote calls, errors, and checks that every vote sent is a
row in SQLite. Bounded in count and time; talks only to 127.0.0.1.

    python bench/load.py --sessions 20 --turns 2              # tiny model (fast)
    python bench/load.py --model HuggingFaceTB/SmolLM2-135M-Instruct --sessions 20 --turns 1
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_demo.config import load_settings  # noqa: E402
from rlhf_demo.runtime import Runtime  # noqa: E402
from rlhf_demo.ui.app import launch_local  # noqa: E402


def session(url: str, index: int, turns: int, max_new_tokens: int) -> dict:
    """One visitor: chat `turns` times, 👍/👎 each answer, one Compare vote."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    chat: list = []
    timings = {"chat": [], "vote": []}
    votes = 0
    for turn in range(turns):
        t = time.perf_counter()
        chat, _ = client.predict(f"Visitor {index} asks question {turn}", chat, 0.7, 0.9, max_new_tokens, api_name="/chat")
        timings["chat"].append(time.perf_counter() - t)
        t = time.perf_counter()
        client.predict(len(chat) - 1, turn % 2 == 0, api_name="/rate")
        timings["vote"].append(time.perf_counter() - t)
        votes += 1
    client.predict(
        f"Compare for visitor {index}", "Two samples of the active policy", 0.7, 0.9, max_new_tokens, api_name="/compare"
    )
    t = time.perf_counter()
    client.predict(api_name="/vote_A")
    timings["vote"].append(time.perf_counter() - t)
    return {"timings": timings, "thumbs": votes, "pairs": 1}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run(
    model: str,
    sessions: int,
    turns: int,
    max_new_tokens: int,
    data_dir: Path,
    models_dir: Path | None = None,
    concurrency: int | None = None,
) -> dict:
    settings = load_settings(env={}, model=model, data_dir=data_dir, quantization="fp32")
    if concurrency is not None:  # Limits.max_concurrent_generations: events Gradio runs at once
        settings = dataclasses.replace(
            settings, limits=dataclasses.replace(settings.limits, max_concurrent_generations=concurrency)
        )
    if models_dir is not None and not settings.models_dir.exists():  # reuse the converted offline model
        settings.models_dir.symlink_to(models_dir.resolve(), target_is_directory=True)
    runtime = Runtime(settings)
    demo, url = launch_local(runtime)
    started = time.perf_counter()
    errors: list[str] = []
    results = []
    with ThreadPoolExecutor(sessions) as pool:
        futures = [pool.submit(session, url, i, turns, max_new_tokens) for i in range(sessions)]
        for f in futures:
            try:
                results.append(f.result(timeout=900))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(repr(exc))
    wall = time.perf_counter() - started
    counts = runtime.store.counts()
    demo.close()
    runtime.close()
    chat = [x for r in results for x in r["timings"]["chat"]]
    vote = [x for r in results for x in r["timings"]["vote"]]
    sent_thumbs = sum(r["thumbs"] for r in results)
    sent_pairs = sum(r["pairs"] for r in results)
    return {
        "sessions": sessions, "turns": turns, "concurrency": settings.limits.max_concurrent_generations, "wall_s": wall, "errors": errors,
        "chat_p50_s": statistics.median(chat) if chat else None, "chat_p95_s": percentile(chat, 0.95) if chat else None,
        "vote_p50_s": statistics.median(vote) if vote else None, "vote_p95_s": percentile(vote, 0.95) if vote else None,
        "thumbs_sent": sent_thumbs, "thumbs_stored": counts["thumbs_up"] + counts["thumbs_down"],
        "pairs_sent": sent_pairs, "pairs_stored": counts["preferences"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, help="Limits.max_concurrent_generations (default: the library's)")
    parser.add_argument("--models-dir", type=Path, help="a data dir's models/ folder to reuse (skips the GGUF conversion)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        r = run(args.model, args.sessions, args.turns, args.max_new_tokens, Path(scratch), args.models_dir, args.concurrency)
    print(
        f"{r['sessions']} sessions x {r['turns']} turns, model {args.model}, {args.max_new_tokens} new tokens, {r['concurrency']} generations at once, wall {r['wall_s']:.1f} s"
    )
    print(f"chat latency p50 {r['chat_p50_s']:.2f} s, p95 {r['chat_p95_s']:.2f} s")
    print(f"vote latency p50 {r['vote_p50_s'] * 1000:.0f} ms, p95 {r['vote_p95_s'] * 1000:.0f} ms")
    print(
        f"thumbs sent {r['thumbs_sent']} stored {r['thumbs_stored']}; pairs sent {r['pairs_sent']} stored {r['pairs_stored']}; errors {len(r['errors'])}"
    )
    for e in r["errors"][:5]:
        print("  error:", e)


if __name__ == "__main__":
    main()
