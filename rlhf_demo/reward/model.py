"""The reward model: a LoRA adapter + scalar head on the process's one base, and its normalizer.

The reward of an answer is ``head(h)`` where ``h`` is the last hidden state (after the
final norm) at the last real token of ``chat_template(prompt + [assistant: answer])``,
computed with the reward adapter active. Only the adapter and the head are the reward
model's own: the base is shared with every other role (the policy, the served version),
so one base (fp32 or NF4) serves them all.

Adapter switching goes through :func:`rlhf_demo.modeling.adapters.use_adapter`: scoring
in the middle of PPO gives the model back exactly as found (active adapter, every
``requires_grad`` flag, train/eval mode).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_demo.config import LoraSettings, RewardConfig
from rlhf_demo.modeling.adapters import (
    AdapterError,
    adapter_parameters,
    attach_new_adapter,
    check_adapter_folder,
    save_adapter,
    use_adapter,
)
from rlhf_demo.modeling.heads import ScalarHead, hidden_size, last_token_hidden
from rlhf_demo.modeling.quantized import keep_4bit_differentiable
from rlhf_demo.reward.losses import normalize_scores

NORMALIZER_FILE = "normalizer.json"
MAX_LENGTH = RewardConfig.max_length  # tokens a scored sequence keeps (its end)
"""Default tokens per sequence (``RewardConfig.max_length``)."""


def chat_text(tokenizer: Any, prompt: list[dict[str, str]], completion: str, finished: bool = True) -> str:
    """The text the reward model reads: the chat template of the prompt plus the answer.

    An answer cut off at the length limit (``finished=False``) is read as the policy wrote
    it, without the end-of-turn marker that the template would add: whether an answer
    ended is part of what a rater saw, and the reward model must be able to see it too."""
    if not finished:
        return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False) + completion
    messages = list(prompt) + [{"role": "assistant", "content": completion}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


class RewardModel:
    """The shared base ``PeftModel`` with adapter ``name`` + a :class:`ScalarHead` +
    the ``(mean, std)`` normalizer that turns raw scores into ~N(0, 1) for PPO.

    Holds no copy of the base: ``model`` is the process's one PeftModel, on which other
    adapters (the policy) may live too. The reward adapter is frozen outside training;
    :meth:`score` switches to it and back.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        head: ScalarHead,
        name: str = "reward",
        mean: float = 0.0,
        std: float = 1.0,
        max_length: int = MAX_LENGTH,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.mean = float(mean)
        self.std = float(std)
        self.max_length = int(max_length)
        self.device = model.get_input_embeddings().weight.device
        self.head = head.to(self.device)
        keep_4bit_differentiable(model)

    # construction ------------------------------------------------------------------

    @classmethod
    def new(
        cls,
        model: Any,
        tokenizer: Any,
        lora_settings: LoraSettings | None = None,
        name: str = "reward",
        max_length: int = MAX_LENGTH,
    ) -> RewardModel:
        """A fresh adapter (B = 0) and head; replaces an adapter of the same name.

        ``model`` may be the bare base (it gets wrapped) or the shared PeftModel; use
        the returned ``.model`` from then on. The new adapter starts frozen.
        """
        was_training = model.training
        _drop_adapter(model, name)
        model = attach_new_adapter(model, name, lora_settings or LoraSettings())
        _settle(model, name, was_training)
        return cls(model, tokenizer, ScalarHead(hidden_size(model)), name, max_length=max_length)

    @classmethod
    def load(
        cls,
        model: Any,
        tokenizer: Any,
        folder: Path,
        name: str = "reward",
        max_length: int = MAX_LENGTH,
    ) -> RewardModel:
        """Load a folder written by :meth:`save` onto the shared base as adapter ``name``
        (replacing one of that name), frozen. A bare base is wrapped by ``PeftModel``; use
        the returned ``.model`` from then on."""
        from peft import PeftConfig, PeftModel

        folder = Path(folder)
        check_adapter_folder(folder)
        was_training = model.training
        if isinstance(model, PeftModel):
            _drop_adapter(model, name)
            # add, then load over it: also works when ``name`` was the only adapter.
            model.add_adapter(name, PeftConfig.from_pretrained(str(folder)))
            model.load_adapter(str(folder), adapter_name=name, is_trainable=True)
        else:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=True)
        _settle(model, name, was_training)
        normalizer = json.loads((folder / NORMALIZER_FILE).read_text())
        head = ScalarHead.load(folder, hidden_size(model))
        return cls(model, tokenizer, head, name, normalizer["mean"], normalizer["std"], max_length)

    def save(self, folder: Path) -> Path:
        """Write adapter + ``head.safetensors`` + ``normalizer.json`` to ``folder``, whole
        or not at all (temp folder, then rename). An existing folder is refused."""
        folder = Path(folder)
        if folder.exists():
            raise AdapterError(f"reward model folder {folder} already exists; versions are immutable")
        tmp = folder.with_name(f".{folder.name}.rm-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_adapter(self.model, self.name, tmp)  # un-nests PEFT's <name>/ subfolder
            self.head.save(tmp)
            (tmp / NORMALIZER_FILE).write_text(json.dumps({"mean": self.mean, "std": self.std}))
            check_adapter_folder(tmp)
            tmp.replace(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    # scoring -----------------------------------------------------------------------

    def encode(
        self, prompts: Sequence[list[dict[str, str]]], completions: Sequence[str], finished: Sequence[bool] | None = None
    ) -> list[list[int]]:
        """Token ids per answer, cut to the last ``max_length`` tokens (the prompt's start
        goes first, so the answer's last token, where the reward is read, is kept).
        ``finished[i]`` False: answer ``i`` was cut at the length limit (see :func:`chat_text`)."""
        finished = [True] * len(completions) if finished is None else list(finished)
        if not len(prompts) == len(completions) == len(finished):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(finished)} finished flags")
        if not prompts:
            return []
        texts = [chat_text(self.tokenizer, p, c, f) for p, c, f in zip(prompts, completions, finished, strict=True)]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(x[-self.max_length :]) for x in ids]

    def forward_ids(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Raw scores (N,) float32 of pre-tokenized sequences, with grad if enabled.

        The reward adapter must be active: hold ``use_adapter(rm.model, rm.name, ...)``
        (:meth:`score` does; training asks for ``trainable=True``). Switching here, per
        forward, would decide the adapter's ``requires_grad`` behind the caller's back.

        Right padding: every real token keeps its position and, under the causal mask,
        never sees a pad, so a score does not depend on what else is in the batch.
        """
        if list(self.model.active_adapters) != [self.name]:
            raise AdapterError(f"reward adapter {self.name!r} is not active (active: {self.model.active_adapters}); use use_adapter")
        if not ids:
            return torch.zeros(0, device=self.device)
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
            mask[row, : len(x)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,  # the LM head is not needed; skip (T, V) logits
        )
        hidden = out.hidden_states[-1]
        last = last_token_hidden(hidden, mask.to(hidden.device))
        return self.head(last.to(self.device))

    def raw_scores(
        self, prompts: Sequence[list[dict[str, str]]], completions: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """Unnormalized scores (N,) in one batch, with grad (for training; same contract
        as :meth:`forward_ids`)."""
        return self.forward_ids(self.encode(prompts, completions, finished))

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[list[dict[str, str]]],
        completions: Sequence[str],
        normalized: bool = True,
        batch_size: int = 8,
        finished: Sequence[bool] | None = None,
    ) -> torch.Tensor:
        """Scores (N,) float32 on the CPU, in eval mode, in batches of similar length;
        ``normalized``: ``(raw - mean) / std`` with the fitted normalizer. The model is
        given back as found, so PPO can call this between its own steps."""
        ids = self.encode(prompts, completions, finished)
        out = torch.zeros(len(ids), dtype=torch.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding
        with use_adapter(self.model, self.name):
            for start in range(0, len(order), max(1, batch_size)):
                chunk = order[start : start + batch_size]
                out[chunk] = self.forward_ids([ids[i] for i in chunk]).float().cpu()
        return normalize_scores(out, self.mean, self.std) if normalized else out


def _drop_adapter(model: Any, name: str) -> None:
    from peft import PeftModel

    if isinstance(model, PeftModel) and name in model.peft_config:
        model.delete_adapter(name)


def _settle(model: Any, name: str, was_training: bool) -> None:
    """After PEFT added or loaded adapter ``name``: freeze it and put back the train/eval
    mode. Wrapping a bare base leaves the new adapter trainable and the model in train mode;
    the reward model is a fixed function (for PPO) until ``use_adapter(..., trainable=True)``
    trains it."""
    for p in adapter_parameters(model, name).values():
        p.requires_grad_(False)
    model.train(was_training)


__all__ = ["MAX_LENGTH", "NORMALIZER_FILE", "RewardModel", "chat_text"]
