"""Does transformers' own continuous batching fit here? (why rlhf_demo.serving has its own engine)

Measures, on one loaded SmolLM2 in float32: plain ``generate`` of one prompt, then
``generate_batch`` (paged attention, the library's continuous batching) of 8 prompts, both
greedy with EOS off; then asks the library's ``ContinuousBatchingManager`` for a request with
PEFT per-row ``adapter_names`` (what every chat and Compare row needs) and reports what happens.

    python bench/library_cb.py [--tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

MODEL = "data/models/SmolLM2-135M-Instruct-from-gguf"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    n = args.tokens
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"Write a short story about robot number {i}."}],
            add_generation_prompt=True,
            return_dict=False,
        )
        for i in range(8)
    ]
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id or 0)
    ids = torch.tensor([prompts[0]])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    plain = n / (time.perf_counter() - start)
    print(f"plain generate, 1 prompt: {plain:.1f} tok/s")
    model.set_attn_implementation("paged|sdpa")
    start = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=config, progress_bar=False)
    elapsed = time.perf_counter() - start
    made = sum(len(r.generated_tokens) for r in results.values())
    print(f"generate_batch, 8 prompts: {made / elapsed:.1f} tok/s aggregate = {made / elapsed / plain:.2f}x one plain stream")
    print("  first row equals plain generate:", list(results.values())[0].generated_tokens[:n] == out[0, ids.shape[1] :].tolist())

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    manager = peft_model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        request = manager.add_request(prompts[0], max_new_tokens=4, adapter_names=["a"])
        result = manager.get_result(request_id=request, timeout=120)
        print(f"per-row adapter_names: status {getattr(result, 'status', None)}, error {getattr(result, 'error', None)!r}"[:400])
    finally:
        manager.stop(block=True)


if __name__ == "__main__":
    main()
