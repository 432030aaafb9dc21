"""Rollouts on the shared base: sample answers, score them, and one forward pass over
prompt + response for log-probs, values, entropies and the exact KL to the reference.

Shapes: ``B`` responses, ``P`` prompt length (left padded), ``T`` response length
(right padded after EOS), ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from rlhf_demo.modeling.adapters import use_adapter, use_base
from rlhf_demo.modeling.heads import ScalarHead
from rlhf_demo.modeling.loading import eos_token_ids, pad_token_id
from rlhf_demo.ppo.core import (
    DEFAULT_CHUNK_ROWS,
    PPOConfig,
    entropy_from_logits,
    kl_to_reference,
    logprobs_from_logits,
)
from rlhf_demo.serving.engine import AsIs, Engine, Request
from rlhf_demo.serving.sampling import Sampling

Messages = list[dict[str, str]]
# reward_fn(prompts, completions, finished) -> (B,) scores; finished[i] is False when answer i
# was cut at max_new_tokens (the reward model reads it without an end-of-turn marker).
RewardFn = Callable[[list[Messages], list[str], list[bool]], torch.Tensor]


# ── building blocks (pure functions of tensors and a model) ──────────────────────────


def truncate_at_eos(
    response_ids: torch.Tensor, eos_ids: Iterable[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each generated row (B, T) after its first EOS.

    Returns ``(ids, mask, has_eos)``: ids (B, T') with the EOS kept as the last real
    token and ``pad_id`` after it, mask (B, T') bool, has_eos (B,) bool. A row without
    EOS keeps all its tokens. T' is the longest kept row (trailing all-pad columns go).
    """
    eos = torch.tensor(list(eos_ids), device=response_ids.device)
    is_eos = torch.isin(response_ids, eos)
    has_eos = is_eos.any(dim=1)
    T = response_ids.shape[1]
    first_eos = is_eos.long().argmax(dim=1)  # first maximum: the first EOS
    length = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, T))
    mask = torch.arange(T, device=response_ids.device).unsqueeze(0) < length.unsqueeze(1)
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_id))
    keep = int(length.max()) if T else 0
    return ids[:, :keep], mask[:, :keep], has_eos


def causal_lm(model: Any) -> Any:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (LoRA layers are injected
    in place, so the adapter that is active, or disabled, still applies), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ResponseForward(NamedTuple):
    """What one forward pass over prompt + response gives, each (B, T) and 0 at padding."""

    logprobs: torch.Tensor  # log-probs of the response tokens
    values: torch.Tensor | None  # value-head estimates (with a value head)
    entropy: torch.Tensor | None  # policy entropy (with_entropy)
    kl: torch.Tensor | None  # exact KL to the reference over the vocabulary (given reference_hidden)
    hidden: torch.Tensor | None  # (B, T, H) last hidden states at the response positions (keep_hidden)


def response_forward(
    model: Any,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    value_head: ScalarHead | None = None,
    with_entropy: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    reference_hidden: torch.Tensor | None = None,
    keep_hidden: bool = False,
) -> ResponseForward:
    """One forward pass over prompt + response: log-probs of the response tokens, and
    optionally values, entropies, the exact per-token KL to the reference and the hidden states.

    ``model`` is a causal LM or a PEFT model; whatever adapter state it is in is what
    gets scored. Differentiable when grad is enabled. Logits are computed only for real
    response tokens, ``chunk_rows`` rows at a time (never a (B, L, V) tensor); with
    grad and several chunks, each is checkpointed, so backward keeps one chunk of logits.
    ``reference_hidden`` (B, T, H) is what ``keep_hidden`` returned for the same batch with the
    adapters off: the reference's logits are its rows through the shared (never adapted) lm_head.
    """
    lm = causal_lm(model)
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    # detail: position ids from the attention mask, so left padding does not shift the
    # positions of real tokens (the same ids HF generate used while sampling).
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = lm.get_decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state
    P, T = query_ids.shape[1], response_ids.shape[1]
    # detail: logits at position t predict token t + 1: response token j sits at P + j
    # and is predicted by the hidden state at P + j - 1 (P - 1 is the last prompt token,
    # always real with left padding). The value of that state uses the same position.
    hidden = hidden[:, P - 1 : P + T - 1]
    mask = response_mask.bool()
    rows, labels = hidden[mask], response_ids[mask]  # (N, H), (N,): real tokens only
    ref_rows = reference_hidden[mask] if reference_hidden is not None else None
    if with_entropy and torch.is_grad_enabled():
        raise ValueError("with_entropy is for monitoring: call under torch.no_grad()")
    logprob_rows, kl_rows, entropy_rows = _chunked_terms(
        lm.get_output_embeddings(), rows, labels, ref_rows, temperature, chunk_rows, with_entropy
    )

    def scatter(values: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return out.masked_scatter(mask, torch.cat(values).float()) if values else out

    return ResponseForward(
        logprobs=scatter(logprob_rows),
        values=scatter([value_head(rows)]) if value_head is not None else None,
        entropy=scatter(entropy_rows) if with_entropy else None,
        kl=scatter(kl_rows) if ref_rows is not None else None,
        hidden=torch.zeros_like(hidden).masked_scatter(mask.unsqueeze(-1), rows.detach()) if keep_hidden else None,
    )


def _chunked_terms(
    lm_head: Any,
    rows: torch.Tensor,
    labels: torch.Tensor,
    ref_rows: torch.Tensor | None,
    temperature: float,
    chunk_rows: int,
    with_entropy: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per-chunk log-probs of ``labels`` and, given the reference's rows, the exact KL (and,
    without grad, the entropy) from hidden ``rows`` (N, H), ``chunk_rows`` rows at a time."""

    def chunk_logits(h: torch.Tensor) -> torch.Tensor:
        # detail: divide logits by the sampling temperature, so the log-probs are those
        # of the distribution the tokens were sampled from (TRL, Huang et al.).
        return (lm_head(h) / temperature).unsqueeze(0)  # (1, n, V)

    def chunk_terms(h: torch.Tensor, y: torch.Tensor, h_ref: torch.Tensor | None = None) -> torch.Tensor:
        """(1 or 2, n): the label's log-prob and, given the reference's rows, the exact KL."""
        logits = chunk_logits(h)
        logprob = logprobs_from_logits(logits, y.unsqueeze(0)).squeeze(0)
        if h_ref is None:
            return logprob.unsqueeze(0)
        with torch.no_grad():
            ref_logits = chunk_logits(h_ref)
        return torch.stack([logprob, kl_to_reference(logits, ref_logits).squeeze(0)])

    logprob_rows: list[torch.Tensor] = []
    kl_rows: list[torch.Tensor] = []
    entropy_rows: list[torch.Tensor] = []
    row_chunks = rows.split(chunk_rows)
    ref_chunks = ref_rows.split(chunk_rows) if ref_rows is not None else [None] * len(row_chunks)
    # detail: with several chunks, each is recomputed in backward so one chunk of logits is
    # alive at a time; a single chunk peaks the same either way, and recomputing it would
    # cost two more lm_head passes (policy and reference) per minibatch.
    recompute = len(row_chunks) > 1
    for h, y, h_ref in zip(row_chunks, labels.split(chunk_rows), ref_chunks, strict=True):
        if torch.is_grad_enabled():
            terms = checkpoint(chunk_terms, h, y, h_ref, use_reentrant=False) if recompute else chunk_terms(h, y, h_ref)
            logprob_rows.append(terms[0])
            kl_rows += [terms[1]] if h_ref is not None else []
            continue
        logits = chunk_logits(h)
        logprob_rows.append(logprobs_from_logits(logits, y.unsqueeze(0)).squeeze(0))
        if h_ref is not None:
            kl_rows.append(kl_to_reference(logits, chunk_logits(h_ref)).squeeze(0))
        if with_entropy:
            entropy_rows.append(entropy_from_logits(logits).squeeze(0))
    return logprob_rows, kl_rows, entropy_rows


@dataclass
class Sampled:
    """Answers to chat prompts as tensors: sampled together by the engine (``sample``) and cut
    at their first EOS, or given as text (``encode_answers``)."""

    query_ids: torch.Tensor  # (B, P) chat-templated prompts, left padded
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) bool
    has_eos: torch.Tensor  # (B,) bool
    completions: list[str]


def encode_prompts(tokenizer: Any, prompts: list[Messages], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated prompts ready for their answers: ``(ids, mask)``, each (B, P)."""
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    # detail: left padding, so every prompt ends where its answer starts.
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
    return enc["input_ids"], enc["attention_mask"]


def encode_answers(
    model: Any, tokenizer: Any, prompts: list[Messages], answers: list[str], finished: list[bool], max_new_tokens: int
) -> Sampled:
    """Written answers in the shape ``sample`` gives, so one forward pass scores both: each
    answer cut at ``max_new_tokens`` tokens (what a rollout may write), and ended by the EOS
    when it ended (``finished``) within them."""
    device = model.get_input_embeddings().weight.device
    eos_ids, pad_id = eos_token_ids(model, tokenizer), pad_token_id(model, tokenizer)
    end = tokenizer.eos_token_id if tokenizer.eos_token_id in eos_ids else eos_ids[0]
    query_ids, query_mask = encode_prompts(tokenizer, prompts, device)
    rows: list[list[int]] = []
    for text, ended in zip(answers, finished, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
        rows.append(ids + [end] if ended and len(ids) < max_new_tokens else ids)
    width = max(1, *map(len, rows))
    response_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=device)
    response_mask = torch.arange(width, device=device).unsqueeze(0) < torch.tensor(
        [len(r) for r in rows], device=device
    ).unsqueeze(1)
    has_eos = torch.tensor([bool(row) and row[-1] == end for row in rows], device=device)
    return Sampled(query_ids, query_mask, response_ids, response_mask, has_eos, list(answers))


@torch.no_grad()
def sample(model: Any, tokenizer: Any, prompts: list[Messages], config: PPOConfig) -> Sampled:
    """One answer per prompt from whatever adapter state ``model`` is in, decoded together by
    the serving engine: an answer that ends leaves the batch and costs nothing more."""
    device = model.get_input_embeddings().weight.device
    eos_ids, pad_id = eos_token_ids(model, tokenizer), pad_token_id(model, tokenizer)
    query_ids, query_mask = encode_prompts(tokenizer, prompts, device)
    # detail: sample from exactly softmax(logits / temperature) within top_p: no top-k, no
    # repetition penalty, the same distribution whose log-probs PPO optimises (TRL).
    sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens)
    rows = [
        Request(ids[keep.bool()].tolist(), None, sampling, frozenset(eos_ids))
        for ids, keep in zip(query_ids, query_mask, strict=True)
    ]
    Engine(AsIs(model), pad_id, str(device)).run(rows)
    answers = [row.tokens + ([row.eos_token] if row.eos_token is not None else []) for row in rows]
    width = max(map(len, answers))
    output = torch.tensor([answer + [pad_id] * (width - len(answer)) for answer in answers], device=device)
    # detail: each answer ends at its first EOS (kept as last token), masked after.
    response_ids, response_mask, has_eos = truncate_at_eos(output, eos_ids, pad_id)
    completions = [
        tokenizer.decode(ids[keep], skip_special_tokens=True).strip()
        for ids, keep in zip(response_ids, response_mask, strict=True)
    ]
    return Sampled(query_ids, query_mask, response_ids, response_mask, has_eos, completions)


@dataclass
class ScoredAnswers:
    """Sampled answers of one adapter with their scores and KL to the reference (the gate's
    and the learning benchmark's view of a policy), one entry per prompt given."""

    texts: list[str]
    scores: list[float]
    kl: list[float]  # nats per answer: sum over its tokens of log pi - log pi_ref
    tokens: list[int]
    eos: list[bool]


@torch.no_grad()
def sample_and_score(
    model: Any,
    tokenizer: Any,
    adapter: str | None,
    prompts: list[Messages],
    score_fn: RewardFn,
    config: PPOConfig,
    batch_size: int = 32,
) -> ScoredAnswers:
    """Sample one answer per prompt from ``adapter`` (None: the reference, i.e. the base),
    score them with ``score_fn(prompts, texts, finished)`` and measure their KL to the reference."""
    out = ScoredAnswers([], [], [], [], [])
    for i in range(0, len(prompts), max(1, batch_size)):
        chunk = prompts[i : i + batch_size]
        if adapter is None:
            with use_base(model):
                s = sample(model, tokenizer, chunk, config)
            kl = torch.zeros(len(chunk))
        else:
            with use_adapter(model, adapter):
                s = sample(model, tokenizer, chunk, config)
                batch = (s.query_ids, s.query_mask, s.response_ids, s.response_mask)
                logprobs = response_forward(model, *batch, config.temperature).logprobs
                with use_base(model):
                    ref_logprobs = response_forward(model, *batch, config.temperature).logprobs
            kl = (logprobs - ref_logprobs).sum(dim=1)
        scores = torch.as_tensor(score_fn(chunk, s.completions, s.has_eos.tolist()), dtype=torch.float32).reshape(-1)
        out.texts += s.completions
        out.scores += scores.tolist()
        out.kl += kl.tolist()
        out.tokens += s.response_mask.sum(dim=1).tolist()
        out.eos += s.has_eos.tolist()
    return out
