"""Serving speed: PolicyServer vs plain ``model.generate`` of the same model and precision.

For each precision it measures, in the same run, decode tokens/s and time-to-first-token of
(a) ``model.generate`` on the bare base and (b) ``PolicyServer.stream`` through the active
LoRA adapter, and prints a table with the ratio b/a. Greedy decoding with EOS disabled, so
both sides produce exactly ``--tokens`` tokens.

With ``--concurrency 1,4,8`` it then runs that many streams at once through the engine (each
its own prompt), per level: aggregate tokens/s, time to first token (p50/p95), and prints
``serve: 1 stream X.XX× plain generate; 8 streams Y.YY× one stream`` last. It also runs
``--quantization auto``'s measurement afresh (``auto_choice``: the choice and its figures);
with ``--precisions auto`` the engine serves that choice and plain ``generate`` stays float32
(the goal's baseline).

    python bench/serve.py                      # SmolLM2 (hub, cache or bundled GGUF)
    python bench/serve.py --model tiny --precisions fp32
    python bench/serve.py --precisions fp32 --concurrency 1,4,8 --json out.json
    python bench/serve.py --precisions auto --concurrency 1,4,8 --json out.json
    python bench/serve.py --precisions fp32 --concurrency 1,8 --engine embedded,vllm --engine-url http://127.0.0.1:8123

``--engine embedded,vllm`` runs the concurrency levels through both engines, interleaved, the
vLLM server serving the same model at the same precision (docs/serving.md has its command).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import TextIteratorStreamer  # noqa: E402

from rlhf_demo.config import DEFAULT_MODEL, load_settings  # noqa: E402
from rlhf_demo.modeling import load_model  # noqa: E402
from rlhf_demo.runtime import Runtime  # noqa: E402
from rlhf_demo.serving import Sampling  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
TOPICS = [
    "a robot who learns to paint",
    "a lighthouse keeper",
    "the first snow of winter",
    "a cat that runs a bakery",
    "two rivers that meet",
    "a clock that runs backwards",
    "a map of an unknown island",
    "the last train home",
]
PRECISIONS = {
    "fp32": ("fp32", "float32"),
    "bf16": ("bf16", "bfloat16"),
    "nf4": ("nf4", "float32"),
    "nf4-bf16": ("nf4", "bfloat16"),
}


def auto_choice(args: argparse.Namespace) -> dict:
    """What ``--quantization auto`` decides on this machine now, measured afresh (scratch data dir)."""
    if torch.cuda.is_available():
        return {"quantization": "nf4", "figures": {}, "reason": "CUDA: NF4 with bfloat16 compute, not measured"}
    from rlhf_demo.modeling.loading import locate_model
    from rlhf_demo.modeling.precision import choose_cpu_quantization

    source = locate_model(load_settings(model=args.model, data_dir=args.data_dir))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        choice = choose_cpu_quantization(source.path, Path(scratch))
    seconds = time.perf_counter() - started
    return {"quantization": choice.quantization, "figures": choice.figures, "reason": choice.reason, "seconds": seconds}


def time_plain(loaded, tokens: int) -> tuple[float, float]:
    """(tokens/s, ttft s) of plain generate with a streamer on the bare base model."""
    import threading

    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    ids = loaded.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True)
    kwargs = dict(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=streamer)
    start = time.perf_counter()
    with torch.inference_mode():
        thread = threading.Thread(target=base.generate, kwargs=kwargs)
        thread.start()
        first = None
        for _ in streamer:
            first = first or time.perf_counter()
        thread.join()
    total = time.perf_counter() - start
    return tokens / total, (first or start) - start


def time_server(runtime: Runtime, tokens: int) -> tuple[float, float]:
    start, first, result = time.perf_counter(), None, None
    for item in runtime.server.stream(PROMPT, sampling=Sampling(0.0, 1.0, tokens)):
        first = first or time.perf_counter()  # first yielded text = first decoded token(s)
        result = item
    total = time.perf_counter() - start
    assert result is not None
    return tokens / total, (first or start) - start  # EOS is disabled: exactly `tokens` decoded


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def time_concurrent(runtime: Runtime, streams: int, tokens: int) -> tuple[float, list[float], float | None]:
    """``streams`` visitors at once (each its own prompt): (aggregate tok/s, TTFTs, rows per step)."""
    import threading

    ttfts: list[float] = []
    counts: list[int] = []
    barrier = threading.Barrier(streams + 1)

    def visitor(i: int) -> None:
        prompt = [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]
        barrier.wait()
        start, first, result = time.perf_counter(), None, None
        for item in runtime.server.stream(prompt, sampling=Sampling(0.0, 1.0, tokens)):
            first = first or time.perf_counter()
            result = item
        ttfts.append((first or start) - start)
        counts.append(result.completion_tokens)

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    engine = getattr(runtime.server, "engine", None)  # the embedded engine counts its decode steps
    steps = engine.steps if engine else 0
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    rows_per_step = sum(counts) / max(1, engine.steps - steps) if engine else None
    return sum(counts) / wall, ttfts, rows_per_step


def fixed_length(runtime: Runtime) -> Runtime:
    """No EOS, so every stream decodes exactly --tokens (the vLLM engine then asks for ignore_eos)."""
    if runtime.settings.engine == "vllm":
        runtime.server.eos_ids = frozenset()
    else:
        runtime.server._eos = lambda: frozenset()
    return runtime


def level_rows(runs: list[tuple[float, list[float], float | None]], level: int, engine: str) -> dict:
    ttfts = [t for run in runs for t in run[1]]
    return {
        "engine": engine,
        "streams": level,
        "tok_s": statistics.median(r[0] for r in runs),
        "per_stream_tok_s": statistics.median(r[0] for r in runs) / level,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        "rows_per_step": statistics.median(r[2] for r in runs) if runs[0][2] is not None else None,
    }


def concurrency_levels(args: argparse.Namespace) -> dict:
    """Plain generate and each engine at each concurrency level, interleaved per repeat (a CPU
    shared with other work drifts; interleaving keeps the ratios fair). Plain generate runs on
    its own bare copy of the base: the server's copy gets PEFT's LoRA layers injected."""
    choice = auto_choice(args)
    name = args.precisions.split(",")[0]
    engine_name = choice["quantization"] if name == "auto" else name
    quant, compute = PRECISIONS[engine_name]
    plain_quant, plain_compute = PRECISIONS["fp32" if name == "auto" else name]
    levels = [int(x) for x in args.concurrency.split(",")]
    engines = args.engine.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        bare = load_model(
            load_settings(model=args.model, data_dir=args.data_dir, quantization=plain_quant, compute_dtype=plain_compute)
        )
        bare.model.generation_config.eos_token_id = None
        runtimes = {}
        for engine in engines:
            settings = load_settings(
                model=args.model,
                data_dir=Path(scratch) / engine,
                quantization=quant,
                compute_dtype=compute,
                engine=engine,
                engine_url=args.engine_url,
            )
            loaded = load_model(
                load_settings(model=args.model, data_dir=args.data_dir, quantization=quant, compute_dtype=compute)
            )
            runtimes[engine] = fixed_length(Runtime(settings, loaded))
            time_concurrent(runtimes[engine], 1, 4)
        time_plain(bare, 4)
        plain_runs: list[float] = []
        runs: dict[tuple[str, int], list[tuple[float, list[float], float | None]]] = {(e, n): [] for e in engines for n in levels}
        for _ in range(args.repeats):
            plain_runs.append(time_plain(bare, args.tokens)[0])
            for engine in engines:
                for level in levels:
                    runs[engine, level].append(time_concurrent(runtimes[engine], level, args.tokens))
        for runtime in runtimes.values():
            runtime.close()
    plain = statistics.median(plain_runs)
    rows = [level_rows(runs[e, n], n, e) for e in engines for n in levels]
    top = max(levels)
    result = {"precision": engine_name, "plain_precision": plain_quant, "auto_choice": choice, "model": args.model}
    result |= {"tokens": args.tokens, "repeats": args.repeats, "plain_generate_tok_s": plain, "levels": rows}
    for engine in engines:
        by = {r["streams"]: r for r in rows if r["engine"] == engine}
        one = by.get(1, by[levels[0]])
        prefix = "" if engine == engines[0] else f"{engine}_"
        result[f"{prefix}single_tok_s"] = one["tok_s"]
        result[f"{prefix}single_vs_generate"] = one["tok_s"] / plain
        result[f"{prefix}speedup_at_{top}"] = by[top]["tok_s"] / one["tok_s"]
        result[f"{prefix}ttft_p95_at_{top}_s"] = by[top]["ttft_p95_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--precisions", default="fp32,bf16,nf4,nf4-bf16", help="auto: the measured choice (with --concurrency)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default="data", help="reuses the converted offline model")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--concurrency", help="e.g. 1,4,8: concurrent streams through the engine (first precision only)")
    parser.add_argument("--engine", default="embedded", help="with --concurrency: embedded, vllm or embedded,vllm (interleaved)")
    parser.add_argument("--engine-url", default="", help="the vLLM server for --engine vllm, e.g. http://127.0.0.1:8123")
    args = parser.parse_args()
    if args.concurrency:
        result = concurrency_levels(args)
        device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
        result["device"] = device
        print(
            f"\nmodel {args.model}, {result['precision']}, {args.tokens} tokens greedy per stream, median of {args.repeats}, device {device}"
        )
        auto = result["auto_choice"]
        print(f"auto: {auto['quantization']} ({auto['reason']})")
        print(f"plain generate ({result['plain_precision']}): {result['plain_generate_tok_s']:.1f} tok/s")
        print(f"{'engine':>8} {'streams':>7} {'tok/s':>7} {'per stream':>11} {'rows/step':>10} {'ttft p50':>9} {'ttft p95':>9}")
        for r in result["levels"]:
            print(
                f"{r['engine']:>8} {r['streams']:>7} {r['tok_s']:>7.1f} {r['per_stream_tok_s']:>11.1f} {r['rows_per_step'] or float('nan'):>10.1f} {r['ttft_p50_s']:>8.2f}s {r['ttft_p95_s']:>8.2f}s"
            )
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        top = max(r["streams"] for r in result["levels"])
        print(
            f"serve: 1 stream {result['single_vs_generate']:.2f}× plain generate; {top} streams {result[f'speedup_at_{top}']:.2f}× one stream"
        )
        return
    rows = []
    for name in args.precisions.split(","):
        quant, compute = PRECISIONS[name]
        with tempfile.TemporaryDirectory() as scratch:
            settings = load_settings(model=args.model, data_dir=args.data_dir, quantization=quant, compute_dtype=compute)
            loaded = load_model(settings)
            loaded.model.generation_config.eos_token_id = None  # fixed-length decode on both sides
            time_plain(loaded, 4)  # warm-up
            # plain first: PEFT injects LoRA layers into the base in place once the server loads v0
            plain = [time_plain(loaded, args.tokens) for _ in range(args.repeats)]
            # the server gets its own data dir (fresh DB + v0); the converted model stays shared
            runtime = Runtime(
                load_settings(model=args.model, data_dir=scratch, quantization=quant, compute_dtype=compute), loaded
            )
            time_server(runtime, 4)
            served = [time_server(runtime, args.tokens) for _ in range(args.repeats)]
            runtime.close()
        p_tps, s_tps = statistics.median(x[0] for x in plain), statistics.median(x[0] for x in served)
        p_ttft, s_ttft = statistics.median(x[1] for x in plain), statistics.median(x[1] for x in served)
        rows.append(
            {
                "precision": name,
                "plain_tok_s": p_tps,
                "server_tok_s": s_tps,
                "ratio": s_tps / p_tps,
                "plain_ttft_s": p_ttft,
                "server_ttft_s": s_ttft,
            }
        )
        del loaded, runtime
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nmodel {args.model}, {args.tokens} tokens greedy, median of {args.repeats}, device {device}")
    print(f"{'precision':<10} {'generate tok/s':>15} {'server tok/s':>13} {'ratio':>6} {'ttft plain':>11} {'ttft server':>12}")
    for r in rows:
        print(
            f"{r['precision']:<10} {r['plain_tok_s']:>15.1f} {r['server_tok_s']:>13.1f} {r['ratio']:>6.2f} {r['plain_ttft_s']:>10.3f}s {r['server_ttft_s']:>11.3f}s"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
