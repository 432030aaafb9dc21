"""Reward-model training: a LoRA adapter + scalar head on the shared base, fit to votes.

The reward of an answer is ``head(h)`` where ``h`` is the last hidden state (after the
final norm) at the last real token of ``chat_template(prompt + [assistant: answer])``,
computed with the reward adapter active. Training minimises Bradley-Terry on A/B pairs
plus ``thumb_weight`` times the logistic loss on thumbs; only the reward adapter's LoRA
matrices and the head receive gradients, so one base (fp32 or NF4) serves every role.

Data flow::

    store.preference_pairs(), store.thumb_examples()
        -> build_examples()          dedup, majority vote, 👍 x 👎 on one prompt -> pairs
        -> split_holdout()           by prompt hash: stable as data grows, no shared text
        -> train_reward_model()      AdamW, clip 1.0, linear decay, time budget
        -> (RewardModel, metrics)    held-out accuracy, margin, normalizer, loss curve

Losses, metrics, the normalizer and the hash split come from
:mod:`rlhf_demo.reward.losses`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rlhf_demo.config import LoraSettings, RewardConfig
from rlhf_demo.modeling.adapters import (
    AdapterError,
    attach_new_adapter,
    check_adapter_folder,
    save_adapter,
)
from rlhf_demo.modeling.heads import ScalarHead, hidden_size, last_token_hidden
from rlhf_demo.modeling.quantized import keep_4bit_differentiable
from rlhf_demo.reward.losses import (
    bradley_terry_loss,
    example_key,
    fit_normalizer,
    holdout_split,
    mean_margin,
    normalize_scores,
    pairwise_accuracy,
    thumb_accuracy,
    thumb_loss,
)

log = logging.getLogger(__name__)

NORMALIZER_FILE = "normalizer.json"
Progress = Callable[[int, int, dict[str, float]], None]


# ── configuration ────────────────────────────────────────────────────────────────────


# ── dataset building (pure) ──────────────────────────────────────────────────────────


def build_examples(
    pairs: Sequence[dict[str, Any]],
    thumbs: Sequence[dict[str, Any]],
    max_pairs_per_prompt: int = 4,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Turn the store's rows into ``(pair_examples, thumb_examples)``, oldest first.

    pairs: ``{"prompt", "chosen", "rejected", ...}`` (``FeedbackStore.preference_pairs``).
    thumbs: ``{"prompt", "completion", "label", ...}`` (``FeedbackStore.thumb_examples``);
    ``label > 0`` (True, 1) is 👍, anything else (False, 0, -1) is 👎.

    * Duplicates merge by :func:`example_key` and a majority vote: a pair voted A>B
      twice and B>A once is one A>B example; a 1:1 split (a tie) is dropped, and so is
      an answer with as many 👍 as 👎. Identical chosen/rejected texts are dropped.
    * 👍 and 👎 answers to the same prompt also form pairs (each 👍 x 👎 combination,
      at most ``max_pairs_per_prompt`` per prompt, spread so every answer appears early);
      a combination that is already an A/B pair is not added twice.

    Pair examples: ``{"prompt", "chosen", "rejected", "key", "group", "source", "votes"}``
    with source ``"ab"`` or ``"thumbs"``; thumb examples: ``{"prompt", "completion",
    "label" (bool), "key", "group", "votes"}``. ``group`` is the prompt's key (the unit
    of :func:`split_holdout`).
    """
    # A/B votes: net votes per unordered pair, in the orientation first seen.
    ab: dict[str, dict[str, Any]] = {}
    for row in pairs:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if chosen == rejected:
            continue
        key = example_key(prompt, chosen, rejected)
        entry = ab.setdefault(key, {"prompt": prompt, "a": chosen, "b": rejected, "net": 0})
        entry["net"] += 1 if chosen == entry["a"] else -1
    pair_examples = [
        _pair(e["prompt"], e["a"], e["b"], key, "ab", e["net"])
        if e["net"] > 0
        else _pair(e["prompt"], e["b"], e["a"], key, "ab", -e["net"])
        for key, e in ab.items()
        if e["net"] != 0
    ]

    # Thumbs: net 👍 minus 👎 per (prompt, answer).
    rated: dict[str, dict[str, Any]] = {}
    for row in thumbs:
        if row.get("label") is None:
            continue
        key = example_key(row["prompt"], row["completion"])
        entry = rated.setdefault(key, {"prompt": row["prompt"], "text": row["completion"], "net": 0})
        entry["net"] += 1 if row["label"] > 0 else -1
    thumb_examples = [
        {
            "prompt": e["prompt"],
            "completion": e["text"],
            "label": e["net"] > 0,
            "key": key,
            "group": example_key(e["prompt"]),
            "votes": abs(e["net"]),
        }
        for key, e in rated.items()
        if e["net"] != 0
    ]

    # 👍 x 👎 on the same prompt -> pairs, diagonal order (u0d0, u0d1, u1d0, u1d1, ...).
    by_prompt: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for ex in thumb_examples:
        ups, downs = by_prompt.setdefault(ex["group"], ([], []))
        (ups if ex["label"] else downs).append(ex)
    seen = set(ab)
    for ups, downs in by_prompt.values():
        combos = sorted(itertools.product(range(len(ups)), range(len(downs))), key=lambda ij: (ij[0] + ij[1], ij[0]))
        for i, j in combos[: max(0, max_pairs_per_prompt)]:
            up, down = ups[i], downs[j]
            key = example_key(up["prompt"], up["completion"], down["completion"])
            if key not in seen:
                seen.add(key)
                pair_examples.append(_pair(up["prompt"], up["completion"], down["completion"], key, "thumbs", 1))
    return pair_examples, thumb_examples


def _pair(prompt: Any, chosen: str, rejected: str, key: str, source: str, votes: int) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "key": key,
        "group": example_key(prompt),
        "source": source,
        "votes": votes,
    }


def split_holdout(
    examples: Sequence[dict[str, Any]], fraction: float = 0.15
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, holdout)`` by :func:`holdout_split` of each example's prompt key.

    Whole prompts go to one side, so no answer text is trained on and also evaluated
    (A/B answers recur in several pairs, thumbs reappear inside 👍 x 👎 pairs). The side
    depends on the prompt alone: adding data never moves an old example.
    """
    train: list[dict[str, Any]] = []
    holdout: list[dict[str, Any]] = []
    for ex in examples:
        group = ex.get("group") or example_key(ex["prompt"])
        (holdout if holdout_split(group, fraction) else train).append(ex)
    return train, holdout


# ── the reward model ─────────────────────────────────────────────────────────────────


def chat_text(tokenizer: Any, prompt: list[dict[str, str]], completion: str) -> str:
    """The text the reward model reads: the chat template of the prompt plus the answer."""
    messages = list(prompt) + [{"role": "assistant", "content": completion}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def is_lora_param(param_name: str, adapter: str) -> bool:
    """True for PEFT parameter names like ``...q_proj.lora_A.<adapter>.weight``."""
    parts = param_name.split(".")
    return any(p.startswith("lora_") for p in parts) and adapter in parts


@contextmanager
def _adapter_active(model: Any, name: str) -> Iterator[None]:
    """Run the block with adapter ``name`` active, then restore the previous adapter(s).

    PEFT's ``set_adapter`` also flips ``requires_grad`` (on for the new adapter, off for
    the others); here every flag is kept as it was, so scoring in the middle of PPO
    neither freezes the policy nor makes the reward adapter trainable.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    previous = list(model.active_adapters)
    model.set_adapter(name)
    for p, flag in flags:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        if previous and previous != [name] and all(a in model.peft_config for a in previous):
            if len(previous) == 1:
                model.set_adapter(previous[0])
            else:
                model.base_model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


class RewardModel:
    """The shared base ``PeftModel`` with adapter ``name`` + a :class:`ScalarHead` +
    the ``(mean, std)`` normalizer that turns raw scores into ~N(0, 1) for PPO.

    Holds no copy of the base: ``model`` is the process's one PeftModel, on which other
    adapters (the policy) may live too. Scoring switches to the reward adapter and back.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        head: ScalarHead,
        name: str = "reward",
        mean: float = 0.0,
        std: float = 1.0,
        max_length: int = RewardConfig.max_length,
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
        max_length: int = RewardConfig.max_length,
    ) -> RewardModel:
        """A fresh adapter (B = 0) and head; replaces an adapter of the same name.

        ``model`` may be the bare base (it gets wrapped) or the shared PeftModel; use
        the returned ``.model`` from then on.
        """
        _drop_adapter(model, name)
        model = attach_new_adapter(model, name, lora_settings or LoraSettings())
        return cls(model, tokenizer, ScalarHead(hidden_size(model)), name, max_length=max_length)

    @classmethod
    def load(
        cls,
        model: Any,
        tokenizer: Any,
        folder: Path,
        name: str = "reward",
        max_length: int = RewardConfig.max_length,
    ) -> RewardModel:
        """Load a folder written by :meth:`save` onto the shared base as adapter ``name``
        (replacing one of that name). A bare base is wrapped by ``PeftModel``; use the
        returned ``.model`` from then on."""
        from peft import PeftConfig, PeftModel

        folder = Path(folder)
        check_adapter_folder(folder)
        if isinstance(model, PeftModel):
            _drop_adapter(model, name)
            # add, then load over it: also works when ``name`` was the only adapter.
            model.add_adapter(name, PeftConfig.from_pretrained(str(folder)))
            model.load_adapter(str(folder), adapter_name=name, is_trainable=True)
        else:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=True)
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

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What training updates: this adapter's LoRA matrices and the head."""
        lora = [p for n, p in self.model.named_parameters() if is_lora_param(n, self.name)]
        return lora + list(self.head.parameters())

    def encode(self, prompts: Sequence[list[dict[str, str]]], completions: Sequence[str]) -> list[list[int]]:
        """Token ids per answer, cut to the last ``max_length`` tokens."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return []
        texts = [chat_text(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(x[-self.max_length :]) for x in ids]

    def forward_ids(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Raw scores (N,) float32 of pre-tokenized sequences, with grad if enabled.

        Right padding: every real token keeps its position and, under the causal mask,
        never sees a pad, so a score does not depend on what else is in the batch.
        """
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
        with _adapter_active(self.model, self.name):
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

    def raw_scores(self, prompts: Sequence[list[dict[str, str]]], completions: Sequence[str]) -> torch.Tensor:
        """Unnormalized scores (N,) in one batch, with grad (for training)."""
        return self.forward_ids(self.encode(prompts, completions))

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[list[dict[str, str]]],
        completions: Sequence[str],
        normalized: bool = True,
        batch_size: int = 8,
    ) -> torch.Tensor:
        """Scores (N,) float32 on the CPU, in eval mode, in batches of similar length;
        ``normalized``: ``(raw - mean) / std`` with the fitted normalizer."""
        ids = self.encode(prompts, completions)
        out = torch.zeros(len(ids), dtype=torch.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), max(1, batch_size)):
                chunk = order[start : start + batch_size]
                out[chunk] = self.forward_ids([ids[i] for i in chunk]).float().cpu()
        finally:
            self.model.train(was_training)
        return normalize_scores(out, self.mean, self.std) if normalized else out


def _drop_adapter(model: Any, name: str) -> None:
    from peft import PeftModel

    if isinstance(model, PeftModel) and name in model.peft_config:
        model.delete_adapter(name)


@contextmanager
def _borrowed(model: Any) -> Iterator[Callable[[Any, Sequence[torch.nn.Parameter]], None]]:
    """Lend ``model`` to the trainer and give it back: train/eval mode as found, adapter
    ``requires_grad`` flags as found, the base frozen (it never trains). Adapters created
    meanwhile (a new reward adapter) end frozen: the reward model is a fixed function
    for PPO until the next reward phase.

    Yields ``train_only(model, params)``: gradients into ``params`` only, dropout off.
    """
    before = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    holder = [model]

    def train_only(current: Any, params: Sequence[torch.nn.Parameter]) -> None:
        holder[0] = current  # the PeftModel that wraps ``model`` (or ``model`` itself)
        wanted = {id(p) for p in params}
        for p in current.parameters():
            p.requires_grad_(id(p) in wanted)
        current.eval()  # detail: dropout off (TRL's disable_dropout); eval does it everywhere

    try:
        yield train_only
    finally:
        holder[0].train(was_training)
        for n, p in holder[0].named_parameters():
            p.requires_grad_("lora_" in n and before.get(id(p), False))


# ── training ─────────────────────────────────────────────────────────────────────────


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _batches(n: int, size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + size] for i in range(0, n, size)]


def evaluate(
    rm: RewardModel,
    pair_examples: Sequence[dict[str, Any]],
    thumb_examples: Sequence[dict[str, Any]],
    batch_size: int = 16,
) -> dict[str, float | None]:
    """Pairwise accuracy and mean margin on pairs, sign accuracy on thumbs (raw scores);
    None where there is nothing to measure."""
    n = len(pair_examples)
    prompts = [ex["prompt"] for ex in pair_examples] * 2
    texts = [ex["chosen"] for ex in pair_examples] + [ex["rejected"] for ex in pair_examples]
    r = rm.score(prompts, texts, normalized=False, batch_size=batch_size)
    t = rm.score(
        [ex["prompt"] for ex in thumb_examples],
        [ex["completion"] for ex in thumb_examples],
        normalized=False,
        batch_size=batch_size,
    )
    labels = torch.tensor([bool(ex["label"]) for ex in thumb_examples], dtype=torch.bool)
    return {
        "pairwise_accuracy": _nan_to_none(pairwise_accuracy(r[:n], r[n:])),
        "mean_margin": _nan_to_none(mean_margin(r[:n], r[n:])),
        "thumb_accuracy": _nan_to_none(thumb_accuracy(t, labels)),
    }


def _reference_answers(
    pair_examples: Sequence[dict[str, Any]], thumb_examples: Sequence[dict[str, Any]], cap: int
) -> tuple[list[Any], list[str]]:
    """Distinct (prompt, answer) of the training data, at most ``cap``, chosen by key
    order (deterministic, no RNG)."""
    answers: dict[str, tuple[Any, str]] = {}
    for ex in pair_examples:
        for text in (ex["chosen"], ex["rejected"]):
            answers.setdefault(example_key(ex["prompt"], text), (ex["prompt"], text))
    for ex in thumb_examples:
        answers.setdefault(ex["key"], (ex["prompt"], ex["completion"]))
    picked = [answers[k] for k in sorted(answers)[: max(0, cap)]]
    return [p for p, _ in picked], [t for _, t in picked]


def _fit(
    rm: RewardModel,
    train_pairs: Sequence[dict[str, Any]],
    train_thumbs: Sequence[dict[str, Any]],
    config: RewardConfig,
    deadline: float | None,
    progress: Progress | None,
) -> tuple[list[float], bool]:
    """The optimisation loop; returns ``(loss per step, stopped by the time budget)``."""
    generator = torch.Generator().manual_seed(config.seed)  # shuffling order
    # Tokenize once; steps only pad and forward.
    chosen_ids = rm.encode([ex["prompt"] for ex in train_pairs], [ex["chosen"] for ex in train_pairs])
    rejected_ids = rm.encode([ex["prompt"] for ex in train_pairs], [ex["rejected"] for ex in train_pairs])
    thumb_ids = rm.encode([ex["prompt"] for ex in train_thumbs], [ex["completion"] for ex in train_thumbs])
    thumb_labels = torch.tensor([bool(ex["label"]) for ex in train_thumbs], dtype=torch.bool)

    bs = config.batch_size
    # Each step takes one batch of pairs AND one of thumbs (while they last), so the
    # step loss is the weighted sum of both objectives.
    steps_per_epoch = max(math.ceil(len(chosen_ids) / bs), math.ceil(len(thumb_ids) / bs))
    total = steps_per_epoch * config.epochs
    params = rm.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    # linear decay to 0 over the planned steps (the transformers/TRL default schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(1, total)))

    curve: list[float] = []
    for _epoch in range(config.epochs):
        pair_batches = _batches(len(chosen_ids), bs, generator)
        thumb_batches = _batches(len(thumb_ids), bs, generator)
        for i in range(steps_per_epoch):
            if deadline is not None and time.monotonic() >= deadline:
                return curve, True
            pb = pair_batches[i] if i < len(pair_batches) else []
            tb = thumb_batches[i] if i < len(thumb_batches) else []
            optimizer.zero_grad(set_to_none=True)  # at the start, so grads stay inspectable
            # one forward over [chosen; rejected; thumbs]
            r = rm.forward_ids([chosen_ids[j] for j in pb] + [rejected_ids[j] for j in pb] + [thumb_ids[j] for j in tb])
            r_chosen, r_rejected, r_thumbs = r[: len(pb)], r[len(pb) : 2 * len(pb)], r[2 * len(pb) :]
            loss = r.new_zeros(())
            metrics: dict[str, float] = {}
            if pb:
                # Bradley-Terry on pairs (+ TRL's optional centering term)
                bt = bradley_terry_loss(r_chosen, r_rejected, config.center_rewards_coefficient)
                loss = loss + bt
                metrics["bt_loss"] = bt.item()
                metrics["batch_accuracy"] = pairwise_accuracy(r_chosen, r_rejected)
            if tb:
                # logistic loss on thumbs, -log sigmoid(y * r)
                tl = thumb_loss(r_thumbs, thumb_labels[tb].to(r_thumbs.device))
                loss = loss + config.thumb_weight * tl
                metrics["thumb_loss"] = tl.item()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)  # clip 1.0
            optimizer.step()
            scheduler.step()
            curve.append(loss.item())
            metrics.update(loss=curve[-1], grad_norm=float(grad_norm), lr=float(scheduler.get_last_lr()[0]))
            if progress is not None:
                progress(len(curve), total, metrics)
    return curve, False


def train_reward_model(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    thumbs: Sequence[dict[str, Any]],
    config: RewardConfig | None = None,
    lora_settings: LoraSettings | None = None,
    warm_start: Path | None = None,
    *,
    progress: Progress | None = None,
) -> tuple[RewardModel, dict[str, Any]]:
    """Fit the reward adapter + head to the votes; return it and its metrics.

    ``model``: the process's base, bare or already a PeftModel (use the returned
    ``RewardModel.model`` afterwards). ``pairs`` / ``thumbs``: the store's rows.
    ``warm_start``: a folder from :meth:`RewardModel.save` to continue from; else a
    fresh adapter and head. ``progress(step, total, metrics)`` is called after every
    optimizer step. The model is given back as found (active adapter, ``requires_grad``
    flags, train/eval mode); the reward adapter ends frozen.

    Metrics (plain numbers, None where the held-out split is empty): held-out
    ``pairwise_accuracy``, ``mean_margin``, ``thumb_accuracy``; example counts;
    ``steps``, ``seconds``, ``timed_out``; ``loss_curve``; ``reward_mean``/``reward_std``.
    """
    config = config or RewardConfig()
    started = time.monotonic()
    deadline = None if config.max_seconds is None else started + config.max_seconds

    pair_examples, thumb_examples = build_examples(pairs, thumbs, config.max_thumb_pairs_per_prompt)
    if not pair_examples and not thumb_examples:
        raise ValueError("no usable feedback: need at least one decisive A/B vote or thumb")
    train_pairs, holdout_pairs = split_holdout(pair_examples, config.holdout_fraction)
    train_thumbs, holdout_thumbs = split_holdout(thumb_examples, config.holdout_fraction)

    with _borrowed(model) as train_only:
        torch.manual_seed(config.seed)  # adapter (LoRA A) and head init
        if warm_start is not None:
            rm = RewardModel.load(model, tokenizer, Path(warm_start), config.adapter_name, config.max_length)
        else:
            rm = RewardModel.new(model, tokenizer, lora_settings, config.adapter_name, config.max_length)
        train_only(rm.model, rm.trainable_parameters())
        used_thumbs = train_thumbs if config.thumb_weight > 0 else []
        curve, timed_out = _fit(rm, train_pairs, used_thumbs, config, deadline, progress)

    # Normalizer: raw scores of the training answers, so PPO sees ~N(0, 1).
    eval_bs = 2 * config.batch_size
    ref_prompts, ref_texts = _reference_answers(train_pairs, train_thumbs, config.normalizer_samples)
    rm.mean, rm.std = fit_normalizer(rm.score(ref_prompts, ref_texts, normalized=False, batch_size=eval_bs))

    metrics: dict[str, Any] = {
        **evaluate(rm, holdout_pairs, holdout_thumbs, batch_size=eval_bs),
        "train_pairs": len(train_pairs),
        "train_thumbs": len(train_thumbs),
        "holdout_pairs": len(holdout_pairs),
        "holdout_thumbs": len(holdout_thumbs),
        "pairs_from_thumbs": sum(ex["source"] == "thumbs" for ex in pair_examples),
        "steps": len(curve),
        "timed_out": timed_out,
        "seconds": time.monotonic() - started,
        "final_loss": curve[-1] if curve else None,
        "loss_curve": curve,
        "reward_mean": rm.mean,
        "reward_std": rm.std,
        "normalizer_samples": len(ref_texts),
        "warm_start": None if warm_start is None else str(warm_start),
    }
    log.info(
        "reward model: %d steps in %.1fs, held-out pair accuracy %s, thumb accuracy %s",
        len(curve),
        metrics["seconds"],
        metrics["pairwise_accuracy"],
        metrics["thumb_accuracy"],
    )
    return rm, metrics


__all__ = [
    "RewardConfig",
    "RewardModel",
    "build_examples",
    "chat_text",
    "evaluate",
    "split_holdout",
    "train_reward_model",
]
