"""Keep a Space's data across restarts: snapshot the DB and exports to a Hub dataset.

Spaces no longer offer persistent ``/data`` storage, and their local disk is wiped on every
restart. When ``HF_TOKEN`` and ``RLHF_DEMO_HUB_DATASET`` are set, a
``huggingface_hub.CommitScheduler`` pushes a consistent SQLite snapshot (``sqlite3``'s
online backup, safe while votes are being written) plus the TRL exports every few minutes,
and a fresh start restores the last snapshot before opening the store.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
SNAPSHOT_NAME = "feedback.db"


def hub_target(env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(dataset repo id, token) when syncing is configured, else None."""
    env = dict(os.environ if env is None else env)
    repo, token = env.get("RLHF_DEMO_HUB_DATASET", ""), env.get("HF_TOKEN", "")
    return (repo, token) if repo and token else None


def snapshot_database(db_path: Path, target: Path) -> Path:
    """A consistent copy of a live WAL database (online backup API), written atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    source = sqlite3.connect(db_path)
    try:
        dest = sqlite3.connect(tmp)
        try:
            source.backup(dest)
        finally:
            dest.close()
    finally:
        source.close()
    tmp.replace(target)
    return target


def restore_from_hub(db_path: Path, repo_id: str, token: str) -> bool:
    """Download the last snapshot when the local DB is missing (fresh Space container)."""
    if db_path.exists():
        return False
    from huggingface_hub import hf_hub_download

    try:
        cached = hf_hub_download(repo_id, f"snapshot/{SNAPSHOT_NAME}", repo_type="dataset", token=token)
    except Exception as exc:  # noqa: BLE001 - first start, or no access: start empty, say so
        log.warning("no snapshot restored from %s: %s", repo_id, str(exc).splitlines()[0])
        return False
    db_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, db_path)
    log.info("restored %s from the Hub dataset %s", db_path, repo_id)
    return True


def start_sync(data_dir: Path, db_path: Path, repo_id: str, token: str, every_minutes: float = 10.0) -> Any:
    """Start the background pusher; returns the scheduler (``.stop()`` on shutdown)."""
    from huggingface_hub import CommitScheduler

    from rlhf_demo.store import FeedbackStore, export_preferences, export_unpaired

    folder = data_dir / "hub-sync"

    class SnapshotScheduler(CommitScheduler):
        def push_to_hub(self) -> Any:
            with self.lock:
                snapshot_database(db_path, folder / "snapshot" / SNAPSHOT_NAME)
                store = FeedbackStore(db_path)
                try:
                    export_preferences(store, folder / "exports" / "preferences.jsonl")
                    export_unpaired(store, folder / "exports" / "unpaired.jsonl")
                finally:
                    store.close()
            return super().push_to_hub()

    folder.mkdir(parents=True, exist_ok=True)
    return SnapshotScheduler(repo_id=repo_id, repo_type="dataset", folder_path=folder, every=every_minutes, token=token, private=True)


def persistence_note(db_path: Path, env: dict[str, str] | None = None) -> str:
    """One honest sentence for the UI about what survives a restart."""
    target = hub_target(env)
    env = dict(os.environ if env is None else env)
    if target:
        return f"Votes are stored in SQLite at `{db_path}` and copied to the Hub dataset `{target[0]}` every few minutes."
    if env.get("SPACE_ID"):
        return (
            f"Votes are stored in SQLite at `{db_path}`. **This Space's disk is wiped on restart**: set `HF_TOKEN` and "
            "`RLHF_DEMO_HUB_DATASET` to keep them in a Hub dataset."
        )
    return f"Votes are stored in SQLite at `{db_path}`."
