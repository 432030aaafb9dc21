"""Publishing adapters: a content hash per version, checked when the server loads or serves
it, and version folders that are never deleted, only moved aside (rlhf_demo.worker.publish)."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import write_random_adapter

from rlhf_demo.modeling import load_model
from rlhf_demo.modeling.adapters import ADAPTER_WEIGHTS, attach_new_adapter
from rlhf_demo.runtime import Runtime
from rlhf_demo.store import FeedbackStore
from rlhf_demo.worker.publish import QUARANTINE_DIR, clean_partial, content_hash, publish


def test_publish_records_a_content_hash_of_the_adapter_files(runtime, tiny_loaded, settings) -> None:
    attach_new_adapter(tiny_loaded.model, "policy", settings.lora)
    version = publish(runtime.store, tiny_loaded.model, "policy", settings.adapters_dir, "v0", {})
    row = runtime.store.get_version(version)
    assert row is not None and len(row["content_hash"]) == 64
    assert row["content_hash"] == content_hash(Path(row["path"]))
    first = runtime.store.get_version("v0")  # the identity LoRA the server writes at first start
    assert first is not None and first["content_hash"] == content_hash(settings.adapters_dir / "v0")


def _register(runtime: Runtime, folder: Path, parent: str) -> None:
    runtime.store.register_version(folder.name, str(folder), parent, "active", {}, content_hash=content_hash(folder))


def test_a_version_whose_files_change_is_broken_and_the_newest_good_one_served_also_after_restart(settings, tiny_loaded) -> None:
    """Weights that still load but are not the ones published (bit rot, a bad copy, an
    edit): refused while served and when loaded, marked broken with the reason."""
    runtime = Runtime(settings, tiny_loaded)
    try:
        v1 = write_random_adapter(tiny_loaded, settings, "v1", seed=1)
        _register(runtime, v1, "v0")
        v2 = write_random_adapter(tiny_loaded, settings, "v2", seed=2)
        _register(runtime, v2, "v1")
        assert runtime.sync_registry() == "v2"
        other = write_random_adapter(tiny_loaded, settings, "scratch", seed=3)  # loads fine, other weights
        shutil.copyfile(other / ADAPTER_WEIGHTS, v2 / ADAPTER_WEIGHTS)
        assert runtime.sync_registry() == "v1"
        broken = runtime.store.get_version("v2")
        assert broken is not None and broken["status"] == "broken" and "changed" in broken["broken_reason"]
        shutil.copyfile(other / ADAPTER_WEIGHTS, v1 / ADAPTER_WEIGHTS)  # now v1 too, noticed at the next load
    finally:
        runtime.close()
    restarted = Runtime(settings, load_model(settings))
    try:
        assert restarted.server.active == "v0"
        assert restarted.store.get_version("v1")["status"] == "broken"
    finally:
        restarted.close()


def test_published_folders_survive_a_deleted_database(runtime, tiny_loaded, settings) -> None:
    """The database is lost (a Space restarted on a fresh disk while the adapters stayed):
    the restarted worker finds folders no row names, and moves them aside instead of
    deleting them."""
    attach_new_adapter(tiny_loaded.model, "policy", settings.lora)
    published = {}
    for _ in range(2):
        version = publish(runtime.store, tiny_loaded.model, "policy", settings.adapters_dir, runtime.store.active_version(), {})
        published[version] = runtime.store.get_version(version)["content_hash"]
    assert sorted(published) == ["v1", "v2"]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{settings.db_path}{suffix}").unlink(missing_ok=True)
    with FeedbackStore(settings.db_path) as fresh:
        moved = clean_partial(settings.adapters_dir, fresh)
        assert sorted(moved) == ["v0", "v1", "v2"]
        aside = {p.name.split("-")[0]: p for p in (settings.adapters_dir / QUARANTINE_DIR).iterdir()}
        assert {v: content_hash(aside[v]) for v in published} == published
        assert clean_partial(settings.adapters_dir, fresh) == []  # what was moved aside stays there
