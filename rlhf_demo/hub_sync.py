"""Keep a Space's data across restarts: snapshot the DB and exports to a Hub dataset.

Spaces no longer offer persistent ``/data`` storage, and their local disk is wiped on every
restart. When ``HF_TOKEN`` and ``RLHF_DEMO_HUB_DATASET`` are set, a
``huggingface_hub.CommitScheduler`` pushes a consistent SQLite snapshot (``sqlite3``'s
online backup, safe while votes are being written) plus the TRL exports every few minutes,
and a fresh start restores the last snapshot before opening the store.

The DB alone is not enough: its registry names an active adapter version whose files live in
``adapters/vN``, and ``reward/run-N`` is the reward model the last cycles optimised against.
Without them a restored Space serves the base model. So the snapshot also carries
every served adapter version (immutable: each is uploaded once, hard-linked into the sync
folder, never re-sent) and the latest reward model, and the restore brings them back before
the server loads.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from rlhf_demo.reward.model import PROBE_FILE
from rlhf_demo.store.registry import SERVABLE_STATUSES  # versions that may be served again; rejected/broken ones are not carried

log = logging.getLogger(__name__)
SNAPSHOT_NAME = "feedback.db"
REWARD_DIR = "reward"


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


def restore_from_hub(db_path: Path, repo_id: str, token: str, data_dir: Path | None = None) -> bool:
    """Download the last snapshot when the local DB is missing (fresh Space container); with
    ``data_dir``, also the adapter versions the registry may serve and the latest reward model
    that are missing locally. Returns whether the DB was restored."""
    restored = _restore_database(db_path, repo_id, token)
    if data_dir is not None and db_path.exists():
        try:
            restore_models(data_dir, db_path, repo_id, token)
        except Exception as exc:  # noqa: BLE001 - serve what we have (the server falls back), say so
            log.warning("could not restore the models from %s: %s", repo_id, str(exc).splitlines()[0])
    return restored


def _restore_database(db_path: Path, repo_id: str, token: str) -> bool:
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


def _registry(db_path: Path) -> list[tuple[str, str, str]]:
    """(version, path, status) of every registered adapter, read-only (the store may not be open yet)."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return [tuple(row) for row in con.execute("SELECT version, path, status FROM adapter_versions")]
    except sqlite3.OperationalError:  # a DB from before the registry existed
        return []
    finally:
        con.close()


def _relocate(db_path: Path, version: str, path: Path) -> None:
    """Point a restored registry row at where its files now are (the snapshot may come from another
    data directory). Runs before the store opens: nothing else holds the database."""
    con = sqlite3.connect(db_path)
    try:
        with con:
            con.execute("UPDATE adapter_versions SET path = ? WHERE version = ?", [str(path), version])
    finally:
        con.close()


def _download_folder(repo_id: str, token: str, files: list[str], prefix: str, target: Path) -> None:
    """Download every file under ``prefix`` into ``target``, whole or not at all (staging folder, rename)."""
    from huggingface_hub import hf_hub_download

    staging = target.with_name(f".{target.name}.restore")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in files:
        if name.startswith(prefix):
            cached = hf_hub_download(repo_id, name, repo_type="dataset", token=token)
            dest = staging / name[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, dest)
    staging.replace(target)


def _run_number(name: str) -> int:
    return int(name[4:]) if name.startswith("run-") and name[4:].isdigit() else -1


def restore_models(data_dir: Path, db_path: Path, repo_id: str, token: str) -> list[str]:
    """Bring back the servable adapter versions and the latest reward model missing locally; returns what came back."""
    from huggingface_hub import HfApi

    files = HfApi(token=token).list_repo_files(repo_id, repo_type="dataset")
    restored = []
    for version, path, status in _registry(db_path):
        target = data_dir / "adapters" / version
        prefix = f"adapters/{version}/"
        if status not in SERVABLE_STATUSES or not any(f.startswith(prefix) for f in files):
            continue
        if not target.is_dir():
            _download_folder(repo_id, token, files, prefix, target)
            restored.append(f"adapters/{version}")
        if Path(path).resolve() != target.resolve():
            _relocate(db_path, version, target)
    runs = sorted({f.split("/")[1] for f in files if f.startswith(f"{REWARD_DIR}/") and f.endswith(f"/{PROBE_FILE}")}, key=_run_number)
    local_runs = [p.name for p in (data_dir / REWARD_DIR).glob("run-*") if (p / PROBE_FILE).exists()]
    if runs and not local_runs:
        _download_folder(repo_id, token, files, f"{REWARD_DIR}/{runs[-1]}/", data_dir / REWARD_DIR / runs[-1])
        restored.append(f"{REWARD_DIR}/{runs[-1]}")
    if restored:
        log.info("restored %s from the Hub dataset %s", ", ".join(restored), repo_id)
    return restored


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link (copy where links fail) ``source``'s files into ``target``: no second copy on disk,
    and the source's mtime, so the scheduler sees an unchanged file as already uploaded."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for item in source.rglob("*"):
        if item.is_file():
            dest = staging / item.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(item, dest)
            except OSError:
                shutil.copy2(item, dest)
    staging.replace(target)


def stage_models(data_dir: Path, db_path: Path, folder: Path, remote: set[str]) -> list[str]:
    """Put the servable adapter versions and the latest reward model into the sync folder, skipping
    what the Hub repo already holds (``remote``: its file names) or what is staged already."""
    staged = []
    for version, path, status in _registry(db_path):
        source, target = Path(path), folder / "adapters" / version
        if status in SERVABLE_STATUSES and source.is_dir() and not target.exists() and f"adapters/{version}/adapter_config.json" not in remote:
            _link_tree(source, target)
            staged.append(f"adapters/{version}")
    runs = sorted((p for p in (data_dir / REWARD_DIR).glob("run-*") if (p / PROBE_FILE).exists()), key=lambda p: _run_number(p.name))
    if runs and f"{REWARD_DIR}/{runs[-1].name}/{PROBE_FILE}" not in remote and not (folder / REWARD_DIR / runs[-1].name).exists():
        for old in (folder / REWARD_DIR).glob("run-*"):  # uploaded already; only the latest is restored
            shutil.rmtree(old, ignore_errors=True)
        _link_tree(runs[-1], folder / REWARD_DIR / runs[-1].name)
        staged.append(f"{REWARD_DIR}/{runs[-1].name}")
    return staged


def start_sync(data_dir: Path, db_path: Path, repo_id: str, token: str, every_minutes: float = 10.0) -> Any:
    """Start the background pusher; returns the scheduler (``.stop()`` on shutdown)."""
    from huggingface_hub import CommitScheduler, HfApi

    from rlhf_demo.store import FeedbackStore, export_preferences, export_unpaired

    folder = data_dir / "hub-sync"
    try:  # what a previous container uploaded already: not sent again
        remote = set(HfApi(token=token).list_repo_files(repo_id, repo_type="dataset"))
    except Exception:  # noqa: BLE001 - a new repo (created below), or no access yet: stage everything
        remote = set()

    class SnapshotScheduler(CommitScheduler):
        def push_to_hub(self) -> Any:
            with self.lock:
                snapshot = snapshot_database(db_path, folder / "snapshot" / SNAPSHOT_NAME)
                stage_models(data_dir, snapshot, folder, remote)  # the registry as snapshotted: adapters match the DB
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
