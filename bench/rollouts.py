"""Rollout speed: PPO's ``sample()`` (through the generation engine) vs the batched
``model.generate`` it replaced, in one run on one model with the policy LoRA active.

A PPO step's batch (``--batch`` answers, ``--per-prompt`` to each prompt of bench/prompts) at
the PPO sampling settings, up to ``--tokens`` new tokens; the two samplers alternate, each
repeat from the same seed. Prints per sampler: seconds per batch (median), answer tokens, the
fraction that ended with EOS, and ``rollouts: engine X.XX× generate`` last.

    python bench/rollouts.py                                  # SmolLM2 fp32, 32 answers x 40 tokens
    python bench/rollouts.py --tokens 160 --json out.json
    python bench/rollouts.py --model tiny --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from bench.learning_votes import load_prompts, messages  # noqa: E402
from rlhf_demo.config import DEFAULT_MODEL, PPOConfig, load_settings  # noqa: E402
from rlhf_demo.modeling import load_model  # noqa: E402
from rlhf_demo.modeling.adapters import attach_new_adapter, use_adapter  # noqa: E402
from rlhf_demo.modeling.loading import eos_token_ids, pad_token_id  # noqa: E402
from rlhf_demo.ppo.trainer import sample, truncate_at_eos  # noqa: E402


def sampling_config(config: PPOConfig, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """The old path's ``generate`` settings: sample from exactly ``softmax(logits / temperature)``
    (restricted by ``top_p`` only): the model's own defaults must not leak in."""
    return GenerationConfig(
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        # detail: no top-k (HF's default is 50), no repetition penalty: the policy
        # samples from the same distribution whose log-probs PPO optimises (TRL).
        top_k=0,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )


@torch.no_grad()
def generate_sample(model, tokenizer, prompts, config: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler before the engine: one batched ``generate``, every row decoded until the
    last one ends. Returns (response mask, has_eos) as ``sample`` would."""
    eos_ids, pad_id = eos_token_ids(model, tokenizer), pad_token_id(model, tokenizer)
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    output = model.generate(**enc, generation_config=sampling_config(config, eos_ids, pad_id))
    _, mask, has_eos = truncate_at_eos(output[:, enc["input_ids"].shape[1] :], eos_ids, pad_id)
    return mask, has_eos


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data-dir", default="data", help="reuses the converted offline model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    settings = load_settings(model=args.model, data_dir=args.data_dir, quantization="fp32")
    loaded = load_model(settings)
    model = attach_new_adapter(loaded.model, "policy", settings.lora)
    config = dataclasses.replace(PPOConfig(), max_new_tokens=args.tokens)
    prompts = [messages(p) for p in load_prompts()[: args.batch // args.per_prompt] for _ in range(args.per_prompt)]
    samplers = {
        "engine": lambda: sample(model, loaded.tokenizer, prompts, config),
        "generate": lambda: generate_sample(model, loaded.tokenizer, prompts, config),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in samplers}
    with use_adapter(model, "policy"):
        for repeat in range(args.repeats):
            for name, run in samplers.items():
                torch.manual_seed(repeat)
                started = time.perf_counter()
                out = run()
                seconds = time.perf_counter() - started
                mask, has_eos = (out.response_mask, out.has_eos) if name == "engine" else out
                runs[name].append({"seconds": seconds, "tokens": int(mask.sum()), "eos": float(has_eos.float().mean())})
    result = {
        "model": args.model,
        "device": f"cpu ({torch.get_num_threads()} threads)" if not torch.cuda.is_available() else "cuda",
        "batch": len(prompts),
        "max_new_tokens": args.tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "runs": runs,
        "median_s": {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()},
    }
    result["engine_vs_generate"] = result["median_s"]["generate"] / result["median_s"]["engine"]
    print(
        f"\nmodel {args.model}, {len(prompts)} answers x up to {args.tokens} tokens, T={config.temperature}, {result['device']}"
    )
    for name, rs in runs.items():
        tokens = statistics.mean(r["tokens"] for r in rs)
        eos = statistics.mean(r["eos"] for r in rs)
        print(f"{name:>9}: {result['median_s'][name]:6.2f} s per batch, {tokens:6.0f} answer tokens, {eos:4.0%} ended with EOS")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"rollouts: engine {result['engine_vs_generate']:.2f}× generate")


if __name__ == "__main__":
    main()
