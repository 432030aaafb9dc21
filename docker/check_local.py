"""Check a running app + vLLM pair (docker/run-local.sh): vLLM writes the app's chat answers,
and a version the worker publishes into the shared /data reaches vLLM and answers the next chat.

    python3 docker/check_local.py APP_URL VLLM_URL APP_CONTAINER
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
from gradio_client import Client

# The worker's publish step, run in the app container against its own store and /data: a
# random LoRA on the worker's base stands in for a trained policy.
PUBLISH = """
import torch
from rlhf_demo.config import load_settings
from rlhf_demo.modeling.adapters import attach_new_adapter
from rlhf_demo.modeling.loading import load_model
from rlhf_demo.store import FeedbackStore
from rlhf_demo.worker.publish import publish
settings = load_settings(quantization="fp32")
policy = attach_new_adapter(load_model(settings).model, "policy", settings.lora)
generator = torch.Generator().manual_seed(5)
with torch.no_grad():
    for name, param in policy.named_parameters():
        if "lora_B.policy." in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
print(publish(FeedbackStore(settings.db_path), policy, "policy", settings.adapters_dir, "v0", {"gate": {"passed": True}}))
"""


def generated_tokens(vllm: str) -> float:
    """vLLM's own count of the tokens it generated."""
    text = httpx.get(f"{vllm}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", text, re.M))


def served(vllm: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm}/v1/models", timeout=10).json()["data"]}


def chat(client: Client, vllm: str, message: str) -> str:
    """One chat answer through the app's API; fails unless vLLM's token count grew."""
    before = generated_tokens(vllm)
    started = time.monotonic()
    history, _ = client.predict(message, [], 0.7, 0.9, 24, api_name="/chat")
    content = history[-1]["content"]  # a string, or Gradio's list of typed parts
    answer = content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
    grew = generated_tokens(vllm) - before
    print(f"chat {message!r}: {time.monotonic() - started:.1f} s, vLLM generated +{grew:.0f} tokens: {answer!r}")
    assert grew > 0, "vLLM generated nothing for this answer"
    return answer


def main(app: str, vllm: str, container: str) -> None:
    client = Client(app, verbose=False)
    print("vLLM serves", sorted(served(vllm)))
    assert "written by adapter v0" in chat(client, vllm, "What is the capital of France?")
    started = time.monotonic()
    out = subprocess.run(["docker", "exec", container, "python", "-c", PUBLISH], capture_output=True, text=True, check=True)
    print(f"published {out.stdout.split()[-1]} in the app container ({time.monotonic() - started:.0f} s)")
    started = time.monotonic()
    while "v1" not in served(vllm):
        assert time.monotonic() - started < 120, "the app did not load v1 into vLLM in 120 s"
        time.sleep(1)
    print(f"vLLM serves {sorted(served(vllm))} {time.monotonic() - started:.0f} s after the publish")
    assert "written by adapter v1" in chat(client, vllm, "And of Italy?")


if __name__ == "__main__":
    main(*sys.argv[1:4])
