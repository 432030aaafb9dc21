"""A tiny random-init Llama with a locally trained tokenizer: the offline model for tests.

It has the same shape of interfaces as the real model (chat template, EOS, padding), so
every code path runs in seconds without weights from the hub. It writes nonsense; the UI
says so whenever it is served.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_demo.modeling.once import build_folder_once

# The same ChatML template SmolLM2-Instruct uses, so prompts look alike in tests and prod.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "Reinforcement learning from human feedback trains a reward model from preferences.",
    "Short answers are good. Long answers can be great too, if they are clear.",
    "Thanks for asking: here is a short, friendly and useful answer!",
    "user assistant system question answer yes no maybe because therefore",
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9",
    "Wow, amazing, great, awesome, wonderful, fantastic! Sure, of course.",
]
MARKER = "rlhf_demo_tiny.json"


def build_tiny_model(target: Path, seed: int = 0) -> Path:
    """Write the tiny model folder once (idempotent) and return its path."""
    target = Path(target)
    if (target / MARKER).exists():
        return target
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.2,  # peaked logits, so greedy text varies with the weights
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"seed": seed, "note": "random-init test model"}))

    return build_folder_once(target, MARKER, save)
