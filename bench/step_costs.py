"""Where one stream's decode step goes: ms per token of each layer of the serving stack, in one
run, interleaved (a CPU shared with other work drifts, so read the ratios).

* forward, DynamicCache: the base's own forward with a growing KV cache, no generate, no LoRA;
* forward, StaticCache: the same with transformers' preallocated cache (eager);
* forward, engine kernels: the DynamicCache loop on the engine's one-row kernels
  (``matmul_kernels``: bfloat16 off oneDNN; the same as the first for float32);
* plain generate: ``model.generate`` on the bare base (the goal's baseline);
* LoRA active: the engine-kernels loop through the server's PEFT model, the adapter active;
* LoRA adapter_names: the same, PEFT's per-row mixed-adapter path (``adapter_names=[slot]``);
* engine stream: ``PolicyServer.stream`` of one request (engine, fast path, streaming text);
* twin forward: the same architecture 64 wide (weights ~nothing to read): what a step costs
  in Python, dispatch and small ops alone. forward minus twin ≈ reading the weights.

Then per step, one row, SmolLM2's vocabulary: the engine's sampling (greedy; T 0.7 top-p 0.9)
and one host sync (``.tolist()``). ``--compile`` also times ``torch.compile`` of the
StaticCache forward: its compile time and its steady ms per token.

    python bench/step_costs.py                      # SmolLM2 fp32
    python bench/step_costs.py --precision bf16     # bfloat16 weights and compute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache  # noqa: E402

from rlhf_demo.config import DEFAULT_MODEL, load_settings  # noqa: E402
from rlhf_demo.modeling import load_model  # noqa: E402
from rlhf_demo.modeling.precision import matmul_kernels  # noqa: E402
from rlhf_demo.runtime import Runtime  # noqa: E402
from rlhf_demo.serving import Sampling  # noqa: E402
from rlhf_demo.serving.engine import Engine, _draw  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
COMPUTE = {"fp32": "float32", "bf16": "bfloat16"}


@torch.inference_mode()
def forward_loop(model, ids, tokens: int, cache=None, forward=None, kernels: bool = False, **kwargs) -> float:
    """ms per decode step of a greedy loop over the model's forward (the prefill not counted)."""
    cache = DynamicCache() if cache is None else cache
    forward = forward or model
    x = ids["input_ids"] % model.config.vocab_size
    length = x.shape[1]
    out = model(input_ids=x, position_ids=torch.arange(length)[None], past_key_values=cache, logits_to_keep=1, **kwargs)
    started = time.perf_counter()
    for step in range(tokens - 1):
        position = torch.tensor([length + step])
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        with matmul_kernels(model, 1 if kernels else 2):
            out = forward(
                input_ids=next_ids,
                position_ids=position[None],
                cache_position=position,
                past_key_values=cache,
                logits_to_keep=1,
                **kwargs,
            )
    return 1000 * (time.perf_counter() - started) / (tokens - 1)


@torch.inference_mode()
def plain_generate(model, ids, tokens: int) -> float:
    """ms per token of ``generate`` (prefill included, as the engine's figure)."""
    started = time.perf_counter()
    model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return 1000 * (time.perf_counter() - started) / tokens


def engine_stream(runtime: Runtime, tokens: int) -> float:
    started = time.perf_counter()
    for _ in runtime.server.stream(PROMPT, sampling=Sampling(0.0, 1.0, tokens)):
        pass
    return 1000 * (time.perf_counter() - started) / tokens


def twin(model) -> torch.nn.Module:
    """The same architecture and layer count, 64 wide with a small vocabulary: its step is the
    framework's per-step cost (Python, dispatch, small ops) without the weight reads."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.hidden_size = config.intermediate_size = config.head_dim = 64
    config.num_attention_heads = config.num_key_value_heads = 1
    config.vocab_size = 512
    return AutoModelForCausalLM.from_config(config, dtype=model.dtype).eval()


@torch.inference_mode()
def per_step_micro(vocab: int, repeats: int = 200) -> dict[str, float]:
    """ms per step of one row's sampling and of one host sync, on logits of SmolLM2's size."""
    logits = torch.randn(1, vocab) * 4
    parts = {
        "sample greedy (argmax)": lambda: Engine._sample(logits, [Sampling(0.0, 1.0, 1)]),
        "sample T 0.7 top-p 0.9": lambda: _draw(logits, 0.7, 0.9),
        "host sync (.tolist())": lambda: logits[:, :1].tolist(),
    }
    figures = {}
    for name, run in parts.items():
        run()
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        figures[name] = 1000 * (time.perf_counter() - started) / repeats
    return figures


def compiled(model, ids, tokens: int) -> tuple[float, float]:
    """(seconds to compile the StaticCache decode forward, ms per token once compiled)."""
    forward = torch.compile(model.forward, dynamic=False)
    cache = lambda: StaticCache(config=model.config, max_cache_len=ids["input_ids"].shape[1] + tokens)  # noqa: E731
    started = time.perf_counter()
    forward_loop(model, ids, 2, cache(), forward)
    compile_s = time.perf_counter() - started
    return compile_s, forward_loop(model, ids, tokens, cache(), forward)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--precision", choices=tuple(COMPUTE), default="fp32")
    parser.add_argument("--data-dir", default="data", help="reuses the converted offline model")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes on 2 vCPUs)")
    args = parser.parse_args()
    precision = dict(quantization=args.precision, compute_dtype=COMPUTE[args.precision])
    settings = load_settings(model=args.model, data_dir=args.data_dir, **precision)
    bare = load_model(settings)
    bare.model.generation_config.eos_token_id = None
    small = twin(bare.model)
    with tempfile.TemporaryDirectory() as scratch:
        runtime = Runtime(load_settings(model=args.model, data_dir=scratch, **precision), load_model(settings))
        runtime.server._eos = lambda: frozenset()  # fixed-length decode
        served = runtime.server.model
        version, slot = runtime.server.pool.hold(None)
        ids = bare.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        static = lambda: StaticCache(config=bare.model.config, max_cache_len=ids["input_ids"].shape[1] + args.tokens)  # noqa: E731
        parts = {
            "forward, DynamicCache": lambda: forward_loop(bare.model, ids, args.tokens),
            "forward, StaticCache": lambda: forward_loop(bare.model, ids, args.tokens, static()),
            "forward, engine kernels": lambda: forward_loop(bare.model, ids, args.tokens, kernels=True),
            "plain generate": lambda: plain_generate(bare.model, ids, args.tokens),
            "LoRA active": lambda: forward_loop(served, ids, args.tokens, kernels=True),
            "LoRA adapter_names": lambda: forward_loop(served, ids, args.tokens, kernels=True, adapter_names=[slot]),
            "engine stream": lambda: engine_stream(runtime, args.tokens),
            "twin forward": lambda: forward_loop(small, ids, args.tokens),
        }
        times: dict[str, list[float]] = {name: [] for name in parts}
        for _ in range(args.repeats):
            for name, run in parts.items():
                if name.startswith("LoRA"):
                    served.set_adapter(slot, inference_mode=True)  # what the engine's fast path does
                times[name].append(run())
        runtime.server.pool.release(version)
        runtime.close()
    weights = sum(p.numel() * p.element_size() for p in bare.model.parameters())
    print(
        f"\nmodel {args.model}, {args.precision}, {args.tokens} tokens greedy, median of {args.repeats}, cpu ({torch.get_num_threads()} threads)"
    )
    for name, values in times.items():
        print(f"{name:>24}: {statistics.median(values):6.1f} ms/token   ({', '.join(f'{v:.1f}' for v in values)})")
    reads = statistics.median(times["forward, DynamicCache"]) - statistics.median(times["twin forward"])
    print(
        f"{'weights':>24}: {weights / 1e6:.0f} MB; forward - twin = {reads:.1f} ms -> {weights / max(reads, 1e-3) / 1e6:.1f} GB/s"
    )
    for name, ms in per_step_micro(bare.model.config.vocab_size).items():
        print(f"{name:>24}: {ms:6.2f} ms/step")
    if args.compile:
        compile_s, ms = compiled(bare.model, ids, args.tokens)
        print(f"{'compiled StaticCache':>24}: {ms:6.1f} ms/token after {compile_s:.0f} s of compiling")


if __name__ == "__main__":
    main()
