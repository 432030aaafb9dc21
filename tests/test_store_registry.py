"""Tests for rlhf_demo.store, the adapter registry: versions, statuses, broken versions."""

from __future__ import annotations

import pytest

from rlhf_demo.store import FeedbackStore, InvalidInputError, UnknownIdError
from tests import store_fixtures

db_path = store_fixtures.db_path  # the fixture, usable in this module
store = store_fixtures.store  # the fixture, usable in this module


def test_adapter_registry_set_active_version_and_rollback(store: FeedbackStore) -> None:
    assert store.active_version() is None
    assert store.next_version_name() == "v0"
    store.register_version("v0", "/adapters/v0", status="active")
    store.register_version("v1", "/adapters/v1", parent="v0", metrics={"reward": 0.4})
    assert store.active_version() == "v0"
    store.set_active_version("v1")
    assert store.active_version() == "v1"
    statuses = {v["version"]: v["status"] for v in store.list_versions()}
    assert statuses == {"v0": "retired", "v1": "active"}
    store.set_active_version("v0")  # rollback
    assert store.active_version() == "v0"
    assert store.list_versions()[1]["metrics"] == {"reward": 0.4}

    store.register_version(store.next_version_name(), "/adapters/v2", "v1", "retired", {})
    store.set_version_status("v2", "rejected")
    with pytest.raises(InvalidInputError, match="rejected"):
        store.set_active_version("v2")
    with pytest.raises(UnknownIdError):
        store.set_active_version("v9")
    with pytest.raises(InvalidInputError):
        store.register_version("v1", "/elsewhere")
    with pytest.raises(InvalidInputError):
        store.register_version("latest", "/x")
    assert store.active_version() == "v0"
    for n in range(3, 11):
        store.register_version(f"v{n}", f"/adapters/v{n}")
    assert store.next_version_name() == "v11"
    assert [v["version"] for v in store.list_versions()][-2:] == ["v9", "v10"]


def test_broken_version_is_recorded_and_newest_good_one_served(store: FeedbackStore) -> None:
    store.register_version("v0", "/a/v0", status="active")
    store.register_version("v1", "/a/v1", parent="v0", status="active")
    store.register_version("v2", "/a/v2", parent="v1", status="rejected")
    store.register_version("v3", "/a/v3", parent="v1", status="active")
    assert store.mark_broken("v3", "corrupt safetensors") == "v1"
    assert store.active_version() == "v1"
    rows = {v["version"]: v for v in store.list_versions()}
    assert (rows["v3"]["status"], rows["v3"]["broken_reason"]) == ("broken", "corrupt safetensors")
    assert rows["v2"]["status"] == "rejected"  # never served, not a fallback
    assert store.mark_broken("v1", "gone") == "v0"
    assert store.mark_broken("v0", "gone") is None and store.active_version() is None
    store.set_active_version("v1")  # an admin may retry a broken version
    assert store.active_version() == "v1"


def test_get_version_finds_one_row_or_none(store: FeedbackStore) -> None:
    store.register_version("v0", "/a/v0", status="active", metrics={"note": "first"})
    store.register_version("v1", "/a/v1", parent="v0", status="rejected")
    row = store.get_version("v0")
    assert row is not None and (row["path"], row["status"], row["metrics"]) == ("/a/v0", "active", {"note": "first"})
    assert store.get_version("v1") == store.list_versions()[1]
    for unknown in ("v2", "", "x" * 10_000, None, 7):
        assert store.get_version(unknown) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("status", ["candidate", "published"])
def test_statuses_nothing_writes_are_refused(store: FeedbackStore, status: str) -> None:
    with pytest.raises(InvalidInputError, match="status must be one of"):
        store.register_version("v0", "/a/v0", status=status)
    assert store.list_versions() == []


def test_a_version_keeps_the_hash_of_its_files(store: FeedbackStore) -> None:
    digest = "ab" * 32
    store.register_version("v0", "/a/v0", status="active", content_hash=digest)
    store.register_version("v1", "/a/v1", parent="v0")  # registered without one: not checked
    assert [v["content_hash"] for v in store.list_versions()] == [digest, None]
    for bad in ("abc", "AB" * 32, "zz" * 32, 12):
        with pytest.raises(InvalidInputError, match="sha256"):
            store.register_version("v2", "/a/v2", content_hash=bad)  # type: ignore[arg-type]
    assert store.get_version("v2") is None
