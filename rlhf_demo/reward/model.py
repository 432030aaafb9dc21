"""The reward model: a linear probe on the frozen base's answer features, and its normalizer.

The reward of an answer is ``w · z + b`` where ``z`` is the standardised mean, over the
answer's tokens, of the base's hidden state at one middle-to-late layer (``layer``, by
default two thirds of the depth), read from ``chat_template(prompt + [assistant: answer])``
with every adapter switched off.

Why a probe and not a fine-tuned adapter: a few hundred live votes are far too few to
fine-tune even a LoRA, and the last token's state (what a classic reward head reads) says
little about a property spread over the answer. On the same 200 simulated votes the mean
of layer 20 of SmolLM2-135M ordered held-out answer pairs like the rater 0.65–0.95 of the
time across eight raters, where the LoRA + last-token reward model managed 0.55–0.64
(docs/learning.md). A probe also fits in a second, so every cycle refits on all votes and
can afford cross-validation to say how far it can be trusted.

The base is shared with every other role (policy, served version); the probe owns only its
weights, so one base (fp32 or NF4) serves them all, and scoring in the middle of PPO leaves
the policy's adapters, ``requires_grad`` flags and train/eval mode as they were.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_demo.config import RewardConfig
from rlhf_demo.modeling.adapters import AdapterError, use_base
from rlhf_demo.reward.losses import normalize_scores

PROBE_FILE = "probe.safetensors"
NORMALIZER_FILE = "normalizer.json"
MAX_LENGTH = RewardConfig.max_length  # tokens a scored sequence keeps (its end)
"""Default tokens per sequence (``RewardConfig.max_length``)."""


def chat_text(tokenizer: Any, prompt: list[dict[str, str]], completion: str, finished: bool = True) -> str:
    """The text the reward model reads: the chat template of the prompt plus the answer.

    An answer cut off at the length limit (``finished=False``) is read as the policy wrote
    it, without the end-of-turn marker that the template would add: whether an answer
    ended is part of what a rater saw, and the reward model must be able to see it too."""
    if not finished:
        return prompt_text(tokenizer, prompt) + completion
    messages = list(prompt) + [{"role": "assistant", "content": completion}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def prompt_text(tokenizer: Any, prompt: list[dict[str, str]]) -> str:
    """The chat template of the prompt up to where the assistant's answer starts."""
    return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)


def default_layer(model: Any) -> int:
    """Two thirds of the base's depth: the layer whose answer-mean a linear probe reads best
    (measured on SmolLM2-135M: layer 20 of 30 beat 10 and 30; docs/learning.md)."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.get_text_config().num_hidden_layers
    return max(1, round(2 * int(layers) / 3))


class _Reached(Exception):
    """Raised by the hook of :func:`hidden_state_at`: the layer the probe reads has run."""


def hidden_state_at(model: Any, layer: int, **inputs: Any) -> torch.Tensor:
    """``model(**inputs).hidden_states[layer]`` without running the layers above it (nor the
    LM head): a third of the reading's cost at layer 20 of 30. The decoder layer below
    ``layer`` hands its output to a hook that ends the forward; the embeddings (0) and the
    last, normed state (the depth) are read from a full forward."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = lm.get_decoder().layers
    if not 0 < layer < len(blocks):
        return model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states[layer]
    reached: list[torch.Tensor] = []

    def stop(_module: Any, _args: Any, output: Any) -> None:
        reached.append(output[0] if isinstance(output, tuple) else output)
        raise _Reached

    handle = blocks[layer - 1].register_forward_hook(stop)
    try:
        model(**inputs, use_cache=False)
    except _Reached:
        return reached[0]
    finally:
        handle.remove()
    raise RuntimeError(f"decoder layer {layer - 1} never ran")


class RewardModel:
    """The shared base + probe weights (``weight``, ``bias`` over standardised features with
    ``feature_mean`` / ``feature_std``) + the ``(mean, std)`` normalizer that turns raw scores
    into ~N(0, 1) for PPO. Holds no copy of the base and no adapter of its own.

    ``members`` / ``member_bias``: the ensemble, bootstrap refits of the probe. The main
    probe (fitted on all votes, checked by cross-validation) is the mean PPO and best-of-n
    use; the members' spread is what Compare explores."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        layer: int,
        weight: torch.Tensor,
        bias: float = 0.0,
        feature_mean: torch.Tensor | None = None,
        feature_std: torch.Tensor | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        max_length: int = MAX_LENGTH,
        members: torch.Tensor | None = None,
        member_bias: torch.Tensor | None = None,
        trusted: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layer = int(layer)
        self.weight = weight.detach().float().cpu()
        self.bias = float(bias)
        size = self.weight.shape[0]
        self.feature_mean = torch.zeros(size) if feature_mean is None else feature_mean.detach().float().cpu()
        self.feature_std = torch.ones(size) if feature_std is None else feature_std.detach().float().cpu()
        self.mean = float(mean)
        self.std = float(std)
        self.max_length = int(max_length)
        self.device = model.get_input_embeddings().weight.device
        # the ensemble: bootstrap probes on the same standardised features (rows: members)
        self.members = torch.zeros(0, size) if members is None else members.detach().float().cpu().reshape(-1, size)
        self.member_bias = (
            torch.zeros(len(self.members)) if member_bias is None else member_bias.detach().float().cpu().reshape(-1)
        )
        self.trusted = bool(trusted)
        """Whether the worker's trust gate passed this model (cross-validated agreement)."""

    # persistence -------------------------------------------------------------------

    @classmethod
    def load(cls, model: Any, tokenizer: Any, folder: Path, max_length: int = MAX_LENGTH) -> RewardModel:
        """A folder written by :meth:`save`, on the process's base."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / PROBE_FILE).is_file() or not (folder / NORMALIZER_FILE).is_file():
            raise AdapterError(f"{folder} is not a reward model folder (needs {PROBE_FILE} and {NORMALIZER_FILE})")
        tensors = load_file(str(folder / PROBE_FILE))
        meta = json.loads((folder / NORMALIZER_FILE).read_text())
        return cls(
            model,
            tokenizer,
            int(meta["layer"]),
            tensors["weight"],
            float(meta["bias"]),
            tensors["feature_mean"],
            tensors["feature_std"],
            float(meta["mean"]),
            float(meta["std"]),
            max_length,
            tensors.get("members"),
            tensors.get("member_bias"),
            bool(meta.get("trusted", False)),
        )

    def save(self, folder: Path) -> Path:
        """Write ``probe.safetensors`` + ``normalizer.json`` to ``folder``, whole or not at
        all (temp folder, then rename). An existing folder is refused."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if folder.exists():
            raise AdapterError(f"reward model folder {folder} already exists; versions are immutable")
        tmp = folder.with_name(f".{folder.name}.rm-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            tensors = {"weight": self.weight, "feature_mean": self.feature_mean, "feature_std": self.feature_std}
            if len(self.members):
                tensors.update(members=self.members, member_bias=self.member_bias)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / PROBE_FILE))
            meta = {"layer": self.layer, "bias": self.bias, "mean": self.mean, "std": self.std, "trusted": self.trusted}
            (tmp / NORMALIZER_FILE).write_text(json.dumps(meta))
            tmp.replace(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    # features ----------------------------------------------------------------------

    def encode(
        self, prompts: Sequence[list[dict[str, str]]], completions: Sequence[str], finished: Sequence[bool] | None = None
    ) -> list[tuple[list[int], int]]:
        """``(token ids, index of the answer's first token)`` per answer, cut to the last
        ``max_length`` tokens (the prompt's start goes first, so the answer is kept).
        ``finished[i]`` False: answer ``i`` was cut at the length limit (see :func:`chat_text`)."""
        finished = [True] * len(completions) if finished is None else list(finished)
        if not len(prompts) == len(completions) == len(finished):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(finished)} finished flags")
        if not prompts:
            return []
        texts = [chat_text(self.tokenizer, p, c, f) for p, c, f in zip(prompts, completions, finished, strict=True)]
        heads = [prompt_text(self.tokenizer, p) for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        starts = [len(x) for x in self.tokenizer(heads, add_special_tokens=False)["input_ids"]]
        out = []
        for x, start in zip(ids, starts, strict=True):
            cut = max(0, len(x) - self.max_length)
            # an empty answer has no tokens of its own: its features are the whole sequence's
            out.append((list(x[cut:]), min(max(0, start - cut), len(x) - cut - 1)))
        return out

    @torch.no_grad()
    def features(
        self,
        prompts: Sequence[list[dict[str, str]]],
        completions: Sequence[str],
        finished: Sequence[bool] | None = None,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """(N, H) float32 on the CPU: the mean over each answer's tokens of the base's hidden
        state at ``layer``, every adapter off. Batches of similar length, right padding (a
        real token never sees a pad under the causal mask, so a row does not depend on its
        batch); the model's train/eval mode is given back as found."""
        encoded = self.encode(prompts, completions, finished)
        out = torch.zeros(len(encoded), self.weight.shape[0])
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        was_training = self.model.training
        self.model.eval()
        try:
            with use_base(self.model):
                for first in range(0, len(order), max(1, batch_size)):
                    chunk = order[first : first + batch_size]
                    width = max(len(encoded[i][0]) for i in chunk)
                    input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                    mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    answer = torch.zeros((len(chunk), width))
                    for row, i in enumerate(chunk):
                        ids, start = encoded[i]
                        input_ids[row, : len(ids)] = torch.as_tensor(ids)
                        mask[row, : len(ids)] = 1
                        answer[row, start : len(ids)] = 1.0
                    hidden = hidden_state_at(
                        self.model, self.layer, input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
                    )
                    answer = answer.to(hidden.device)
                    pooled = (hidden.float() * answer[..., None]).sum(1) / answer.sum(1, keepdim=True)
                    out[chunk] = pooled.cpu()
        finally:
            self.model.train(was_training)
        return out

    # scoring -----------------------------------------------------------------------

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        """Raw scores (N,) of precomputed :meth:`features`."""
        return ((features - self.feature_mean) / self.feature_std) @ self.weight + self.bias

    def member_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Raw scores (M, N) of precomputed :meth:`features` by each ensemble member, on the
        main probe's scale; (0, N) without an ensemble."""
        if not len(self.members):
            return torch.zeros(0, len(features))
        return (((features - self.feature_mean) / self.feature_std) @ self.members.T + self.member_bias).T

    def score(
        self,
        prompts: Sequence[list[dict[str, str]]],
        completions: Sequence[str],
        normalized: bool = True,
        batch_size: int = 16,
        finished: Sequence[bool] | None = None,
    ) -> torch.Tensor:
        """Scores (N,) float32 on the CPU; ``normalized``: ``(raw - mean) / std`` with the
        fitted normalizer. The model is given back as found, so PPO can call this between
        its own steps."""
        raw = self.score_features(self.features(prompts, completions, finished, batch_size))
        return normalize_scores(raw, self.mean, self.std) if normalized else raw


__all__ = ["MAX_LENGTH", "NORMALIZER_FILE", "PROBE_FILE", "RewardModel", "chat_text", "default_layer", "prompt_text"]
