"""Tests for rlhf_demo.store, exports in TRL's formats."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from rlhf_demo.store import FeedbackStore, StoreError, export_preferences, export_unpaired
from rlhf_demo.store import export as export_module
from tests import store_fixtures
from tests.store_fixtures import PROMPT

db_path = store_fixtures.db_path  # the fixture, usable in this module
store = store_fixtures.store  # the fixture, usable in this module
voted_store = store_fixtures.voted_store  # the fixture, usable in this module


def test_exports_load_with_datasets(voted_store: FeedbackStore, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    pref_path, kto_path = (
        tmp_path / "out" / "prefs.jsonl",
        tmp_path / "out" / "kto.jsonl",
    )
    assert export_preferences(voted_store, pref_path) == 2
    assert export_unpaired(voted_store, kto_path) == 3
    cache = str(tmp_path / "hf-cache")

    prefs = datasets.load_dataset("json", data_files=str(pref_path), split="train", cache_dir=cache)
    assert sorted(prefs.column_names) == ["chosen", "comment", "prompt", "reasons", "rejected"]
    assert prefs[0]["prompt"] == PROMPT
    assert prefs[0]["chosen"] == [{"role": "assistant", "content": "Blue."}]
    assert prefs[1]["rejected"] == [{"role": "assistant", "content": "Apple."}]

    kto = datasets.load_dataset("json", data_files=str(kto_path), split="train", cache_dir=cache)
    assert sorted(kto.column_names) == ["comment", "completion", "label", "prompt", "reasons"]
    assert kto["label"] == [False, False, True]
    assert kto[2]["completion"] == [{"role": "assistant", "content": "Blue."}]

    export_preferences(voted_store, pref_path, include_visitor_ids=True)
    export_unpaired(voted_store, kto_path, include_visitor_ids=True)
    first = json.loads(pref_path.read_text().splitlines()[0])
    assert set(first) == {"prompt", "chosen", "rejected", "reasons", "comment", "visitor_id"}
    assert json.loads(kto_path.read_text().splitlines()[0])["visitor_id"] == "s3"


def test_reasons_and_comment_land_in_the_db_and_in_both_exports(voted_store: FeedbackStore, tmp_path: Path) -> None:
    """Reasons on a 👎 and on an A/B vote: stored (tags in the fixed order), exported as the
    extra columns ``reasons`` and ``comment``; a changed vote drops them."""
    datasets = pytest.importorskip("datasets")
    store = voted_store
    blue = store.preference_pairs()[0]
    a, b = store.db.execute("SELECT response_a_id, response_b_id FROM preferences WHERE visitor_id = 's1'").fetchone()
    assert blue["reasons"] == [] and blue["comment"] == ""
    store.annotate_preference("s1", b, a, ["too long", "wrong"], "  B rambles.  ")  # either order names the pair
    store.rate("s9", b, -1)
    store.annotate_rating("s9", b, ("rude",), "Curt.")
    assert store.db.execute("SELECT reasons, comment FROM preferences WHERE visitor_id = 's1'").fetchone() == (
        '["wrong", "too long"]',
        "B rambles.",
    )
    assert store.db.execute("SELECT reasons, comment FROM ratings WHERE visitor_id = 's9'").fetchone() == ('["rude"]', "Curt.")

    pref_path, kto_path = tmp_path / "prefs.jsonl", tmp_path / "kto.jsonl"
    export_preferences(store, pref_path)
    export_unpaired(store, kto_path)
    cache = str(tmp_path / "hf-cache")
    prefs = datasets.load_dataset("json", data_files=str(pref_path), split="train", cache_dir=cache)
    assert (prefs[0]["reasons"], prefs[0]["comment"]) == (["wrong", "too long"], "B rambles.")
    assert (prefs[1]["reasons"], prefs[1]["comment"]) == ([], "")
    kto = [json.loads(line) for line in kto_path.read_text().splitlines()]
    assert [(r["reasons"], r["comment"]) for r in kto if r["comment"]] == [(["rude"], "Curt.")]

    store.rate("s9", b, 1)  # the 👎 became a 👍: its reasons explained the old vote
    assert store.db.execute("SELECT reasons, comment FROM ratings WHERE visitor_id = 's9'").fetchone() == (None, None)
    store.prefer(visitor_id="s1", response_a_id=a, response_b_id=b, outcome="B", source="two_samples")
    assert store.preference_pairs()[-1]["reasons"] == []
    store.annotate_preference("s1", a, b, ["unsafe"], "")
    assert store.annotate_preference("s1", a, b, [], "  ").change == "removed"
    assert store.db.execute("SELECT reasons, comment FROM preferences WHERE visitor_id = 's1'").fetchone() == (None, None)


def test_export_disk_full_leaves_no_partial_file(
    voted_store: FeedbackStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "exports"
    out.mkdir()
    previous = out / "prefs.jsonl"
    previous.write_text("old export\n")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module.os, "fsync", disk_full)
    with pytest.raises(StoreError, match="No space left"):
        export_preferences(voted_store, out / "new.jsonl")
    with pytest.raises(StoreError, match="No space left"):
        export_unpaired(voted_store, previous)
    assert sorted(p.name for p in out.iterdir()) == ["prefs.jsonl"]
    assert previous.read_text() == "old export\n"
