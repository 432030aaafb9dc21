"""Where one stream's decode step goes: ms per token of each layer of the serving stack, in one
run, interleaved (a CPU shared with other work drifts).

* bare forward: the base's own forward with a KV cache, no generate, no LoRA;
* plain generate: ``model.generate`` on the bare base (the goal's baseline);
* LoRA active: the same forward loop through the server's PEFT model, the adapter active;
* LoRA adapter_names: the same, PEFT's per-row mixed-adapter path (``adapter_names=[slot]``);
* LoRA generate: ``model.generate`` through the server's PEFT model, the adapter active;
* engine: ``PolicyServer.stream`` of one request (engine, fast path, streaming text).

Greedy, EOS off, ``--tokens`` per run, median of ``--repeats``.

    python bench/step_costs.py                     # SmolLM2 fp32
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
from transformers import DynamicCache  # noqa: E402

from rlhf_demo.config import DEFAULT_MODEL, load_settings  # noqa: E402
from rlhf_demo.modeling import load_model  # noqa: E402
from rlhf_demo.runtime import Runtime  # noqa: E402
from rlhf_demo.serving import Sampling  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


@torch.inference_mode()
def forward_loop(model, ids, tokens: int, **kwargs) -> float:
    """ms per decode step of a greedy loop over the model's forward (the prefill not counted)."""
    cache, x = DynamicCache(), ids["input_ids"]
    mask = torch.ones_like(x)
    out = model(input_ids=x, attention_mask=mask, position_ids=mask.cumsum(-1) - 1, past_key_values=cache, logits_to_keep=1, **kwargs)
    started = time.perf_counter()
    for _ in range(tokens - 1):
        positions = mask.sum(-1, keepdim=True)
        mask = torch.cat([mask, mask[:, :1]], dim=-1)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=next_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1, **kwargs)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data-dir", default="data", help="reuses the converted offline model")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    settings = load_settings(model=args.model, data_dir=args.data_dir, quantization="fp32")
    bare = load_model(settings)
    bare.model.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as scratch:
        runtime = Runtime(load_settings(model=args.model, data_dir=scratch, quantization="fp32"), load_model(settings))
        runtime.server._eos = lambda: frozenset()  # fixed-length decode
        served = runtime.server.model
        version, slot = runtime.server.pool.hold(None)
        ids = bare.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        parts = {
            "bare forward": lambda: forward_loop(bare.model, ids, args.tokens),
            "plain generate": lambda: plain_generate(bare.model, ids, args.tokens),
            "LoRA active": lambda: forward_loop(served, ids, args.tokens),
            "LoRA adapter_names": lambda: forward_loop(served, ids, args.tokens, adapter_names=[slot]),
            "LoRA generate": lambda: plain_generate(served, ids, args.tokens),
            "engine stream": lambda: engine_stream(runtime, args.tokens),
        }
        times: dict[str, list[float]] = {name: [] for name in parts}
        for _ in range(args.repeats):
            for name, run in parts.items():
                if name.startswith("LoRA"):
                    served.set_adapter(slot, inference_mode=True)  # what the engine's fast path does
                times[name].append(run())
        runtime.server.pool.release(version)
        runtime.close()
    print(f"\nmodel {args.model}, fp32, {args.tokens} tokens greedy, median of {args.repeats}, cpu ({torch.get_num_threads()} threads)")
    for name, values in times.items():
        print(f"{name:>20}: {statistics.median(values):6.1f} ms/token")


if __name__ == "__main__":
    main()
