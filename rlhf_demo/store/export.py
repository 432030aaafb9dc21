"""Exports in TRL's dataset formats, so any TRL trainer can read our feedback as-is.

- ``export_preferences``: conversational preference format (prompt / chosen / rejected),
  explicit A/B votes only.
- ``export_unpaired``: KTO's unpaired format (prompt / completion / label), from thumbs
  and both-bad votes.

Both carry two extra columns that TRL's trainers ignore: ``reasons`` (the rater's tags, a
list, empty when none) and ``comment`` ("" when none), so a dataset user can filter or study
why a vote went that way.

Files are written to a temporary file beside the target and renamed over it, so a
crash or a full disk never leaves a half-written dataset.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import StoreError
from .feedback import FeedbackStore


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines to ``path`` all-or-nothing; return how many."""
    target = Path(path)
    count = 0
    tmp_name: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with open(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except OSError as exc:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
        reason = exc.strerror or str(exc)
        raise StoreError(f"could not write export to {target}: {reason}; nothing was written") from exc
    return count


def export_preferences(store: FeedbackStore, path: str | Path, include_visitor_ids: bool = False) -> int:
    """One JSON line per decisive A/B vote; returns the number of pairs written."""
    rows = []
    for pair in store.preference_pairs():
        row: dict[str, Any] = {
            "prompt": pair["prompt"],
            "chosen": _assistant(pair["chosen"]),
            "rejected": _assistant(pair["rejected"]),
            "reasons": pair["reasons"],
            "comment": pair["comment"],
        }
        if include_visitor_ids:
            row["visitor_id"] = pair["visitor_id"]
        rows.append(row)
    return _write_jsonl_atomic(path, rows)


def export_unpaired(store: FeedbackStore, path: str | Path, include_visitor_ids: bool = False) -> int:
    """One JSON line per thumb, two per both-bad vote; returns the number written."""
    rows = []
    for example in store.thumb_examples():
        row: dict[str, Any] = {
            "prompt": example["prompt"],
            "completion": _assistant(example["completion"]),
            "label": example["label"],
            "reasons": example["reasons"],
            "comment": example["comment"],
        }
        if include_visitor_ids:
            row["visitor_id"] = example["visitor_id"]
        rows.append(row)
    return _write_jsonl_atomic(path, rows)
