"""Reward-model datasets from the store's votes: pure functions, no model.

Why a module of its own: what counts as one example (dedup, majority vote, 👍 x 👎 pairs)
and which prompts are held out decide what the reward model can learn and how it is
judged; both are tested without loading a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from rlhf_demo.reward.losses import example_key


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

    Pair examples: ``{"prompt", "chosen", "rejected", "chosen_finished",
    "rejected_finished", "key", "group", "source", "votes"}`` with source ``"ab"`` or
    ``"thumbs"``; thumb examples: ``{"prompt", "completion", "finished", "label" (bool),
    "key", "group", "votes"}``. ``group`` is the prompt's key (the unit of
    :func:`rlhf_demo.reward.trainer.cross_validate` folds). ``*finished`` (rows: ``chosen_finished``/``rejected_finished``,
    ``finished``; default True): whether the answer ended, or was cut at the length limit.
    """
    finished: dict[str, bool] = {}  # by example_key(prompt, answer): the first row that shows it decides
    ab = _net_ab_votes(pairs, finished)
    pair_examples = [
        _pair_ended(e["prompt"], *((e["a"], e["b"]) if e["net"] > 0 else (e["b"], e["a"])), key, "ab", abs(e["net"]), finished)
        for key, e in ab.items()
        if e["net"] != 0
    ]
    thumb_examples = _net_thumbs(thumbs, finished)
    pair_examples += _thumb_pairs(thumb_examples, set(ab), max_pairs_per_prompt, finished)
    return pair_examples, thumb_examples


def preferred_answers(pair_examples: Sequence[dict[str, Any]], thumb_examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The answers voters preferred, once each: every A/B winner (net over its votes) and every
    net-👍 answer, from :func:`build_examples`' output, as ``{"prompt", "completion",
    "finished", "group"}``. A 👍 x 👎 pair adds nothing its 👍 does not already."""
    out: dict[str, dict[str, Any]] = {}
    for ex in pair_examples:
        if ex["source"] == "ab":
            key = example_key(ex["prompt"], ex["chosen"])
            out.setdefault(key, _answer(ex["prompt"], ex["chosen"], ex.get("chosen_finished", True)))
    for ex in thumb_examples:
        if ex["label"]:
            out.setdefault(ex["key"], _answer(ex["prompt"], ex["completion"], ex["finished"]))
    return [answer for answer in out.values() if answer["completion"].strip()]


def _answer(prompt: Any, text: str, finished: bool) -> dict[str, Any]:
    return {"prompt": prompt, "completion": text, "finished": finished, "group": example_key(prompt)}


def _note(finished: dict[str, bool], prompt: Any, text: str, ended: Any) -> None:
    finished.setdefault(example_key(prompt, text), ended is not False)


def _pair_ended(
    prompt: Any, chosen: str, rejected: str, key: str, source: str, votes: int, finished: dict[str, bool]
) -> dict[str, Any]:
    return {
        **_pair(prompt, chosen, rejected, key, source, votes),
        "chosen_finished": finished[example_key(prompt, chosen)],
        "rejected_finished": finished[example_key(prompt, rejected)],
    }


def _net_ab_votes(pairs: Sequence[dict[str, Any]], finished: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """A/B votes: net votes per unordered pair, in the orientation first seen."""
    ab: dict[str, dict[str, Any]] = {}
    for row in pairs:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if chosen == rejected:
            continue
        _note(finished, prompt, chosen, row.get("chosen_finished"))
        _note(finished, prompt, rejected, row.get("rejected_finished"))
        key = example_key(prompt, chosen, rejected)
        entry = ab.setdefault(key, {"prompt": prompt, "a": chosen, "b": rejected, "net": 0})
        entry["net"] += 1 if chosen == entry["a"] else -1
    return ab


def _net_thumbs(thumbs: Sequence[dict[str, Any]], finished: dict[str, bool]) -> list[dict[str, Any]]:
    """Thumbs: net 👍 minus 👎 per (prompt, answer); a tie is dropped."""
    rated: dict[str, dict[str, Any]] = {}
    for row in thumbs:
        if row.get("label") is None:
            continue
        key = example_key(row["prompt"], row["completion"])
        _note(finished, row["prompt"], row["completion"], row.get("finished"))
        entry = rated.setdefault(key, {"prompt": row["prompt"], "text": row["completion"], "net": 0})
        entry["net"] += 1 if row["label"] > 0 else -1
    return [
        {
            "prompt": e["prompt"],
            "completion": e["text"],
            "finished": finished[key],
            "label": e["net"] > 0,
            "key": key,
            "group": example_key(e["prompt"]),
            "votes": abs(e["net"]),
        }
        for key, e in rated.items()
        if e["net"] != 0
    ]


def _thumb_pairs(
    thumb_examples: list[dict[str, Any]], seen: set[str], max_pairs_per_prompt: int, finished: dict[str, bool]
) -> list[dict[str, Any]]:
    """👍 x 👎 on the same prompt -> pairs, diagonal order (u0d0, u0d1, u1d0, u1d1, ...), none
    that ``seen`` (the A/B pairs) already holds."""
    by_prompt: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for ex in thumb_examples:
        ups, downs = by_prompt.setdefault(ex["group"], ([], []))
        (ups if ex["label"] else downs).append(ex)
    out = []
    for ups, downs in by_prompt.values():
        combos = sorted(itertools.product(range(len(ups)), range(len(downs))), key=lambda ij: (ij[0] + ij[1], ij[0]))
        for i, j in combos[: max(0, max_pairs_per_prompt)]:
            up, down = ups[i], downs[j]
            key = example_key(up["prompt"], up["completion"], down["completion"])
            if key not in seen:
                seen.add(key)
                out.append(_pair_ended(up["prompt"], up["completion"], down["completion"], key, "thumbs", 1, finished))
    return out


def _pair(prompt: Any, chosen: str, rejected: str, key: str, source: str, votes: int) -> dict[str, Any]:
    """One pair example; A/B votes and 👍 x 👎 combinations share this shape, so training
    and evaluation need not know where a pair came from."""
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "key": key,
        "group": example_key(prompt),
        "source": source,
        "votes": votes,
    }


__all__ = ["build_examples", "preferred_answers"]
