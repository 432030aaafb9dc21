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
    finished: dict[str, bool] = {}  # by example_key(prompt, answer)

    def note(prompt: Any, text: str, ended: Any) -> None:
        finished.setdefault(example_key(prompt, text), ended is not False)

    # A/B votes: net votes per unordered pair, in the orientation first seen.
    ab: dict[str, dict[str, Any]] = {}
    for row in pairs:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if chosen == rejected:
            continue
        note(prompt, chosen, row.get("chosen_finished"))
        note(prompt, rejected, row.get("rejected_finished"))
        key = example_key(prompt, chosen, rejected)
        entry = ab.setdefault(key, {"prompt": prompt, "a": chosen, "b": rejected, "net": 0})
        entry["net"] += 1 if chosen == entry["a"] else -1

    def pair(prompt: Any, chosen: str, rejected: str, key: str, source: str, votes: int) -> dict[str, Any]:
        return {
            **_pair(prompt, chosen, rejected, key, source, votes),
            "chosen_finished": finished[example_key(prompt, chosen)],
            "rejected_finished": finished[example_key(prompt, rejected)],
        }

    pair_examples = [
        pair(e["prompt"], e["a"], e["b"], key, "ab", e["net"])
        if e["net"] > 0
        else pair(e["prompt"], e["b"], e["a"], key, "ab", -e["net"])
        for key, e in ab.items()
        if e["net"] != 0
    ]

    # Thumbs: net 👍 minus 👎 per (prompt, answer).
    rated: dict[str, dict[str, Any]] = {}
    for row in thumbs:
        if row.get("label") is None:
            continue
        key = example_key(row["prompt"], row["completion"])
        note(row["prompt"], row["completion"], row.get("finished"))
        entry = rated.setdefault(key, {"prompt": row["prompt"], "text": row["completion"], "net": 0})
        entry["net"] += 1 if row["label"] > 0 else -1
    thumb_examples = [
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
                pair_examples.append(pair(up["prompt"], up["completion"], down["completion"], key, "thumbs", 1))
    return pair_examples, thumb_examples


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


__all__ = ["build_examples"]
