"""Keep a Space's data across restarts: snapshot the DB and exports to a Hub dataset.

Spaces no longer offer persistent ``/data`` storage, and their local disk is wiped on every
restart. When ``HF_TOKEN`` and ``RLHF_DEMO_HUB_DATASET`` are set, :class:`HubSync` pushes a
compact SQLite snapshot (``VACUUM INTO``: consistent while votes are being written, and
free of the pages deleted rows leave behind) plus the TRL exports every few minutes, right
after a "Delete my data", and once more on shutdown (SIGTERM), within the grace period a
Space gets before it is killed; a fresh start restores the last snapshot before opening
the store. Every push squashes the dataset's git history to one commit, so an older
snapshot (holding what a visitor has since deleted) does not live on in the history.

A restore that fails for any reason other than "nothing there yet" turns syncing off for
the run: pushing the empty database of a fresh container would replace the Hub's copy.

The DB alone is not enough: its registry names an active adapter version whose files live in
``adapters/vN``, and ``reward/run-N`` is the reward model the last cycles optimised against.
Without them a restored Space serves the base model. So the snapshot also carries
every served adapter version (immutable: each is uploaded once, hard-linked into the sync
folder, never re-sent) and the latest reward model, and the restore brings them back before
the server loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from rlhf_demo.reward.model import PROBE_FILE
from rlhf_demo.store.registry import SERVABLE_STATUSES  # versions that may be served again; rejected/broken ones are not carried

log = logging.getLogger(__name__)
SNAPSHOT_NAME = "feedback.db"
REWARD_DIR = "reward"
# Spaces run on Kubernetes, whose default grace between SIGTERM and SIGKILL is 30 s; the
# final push gets 20 of them, the rest is for closing Gradio and stopping the worker.
FINAL_PUSH_S = 20.0
DELETION_PUSH_S = 30.0  # how long "Delete my data" waits for the Hub before answering


def hub_target(env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(dataset repo id, token) when syncing is configured, else None."""
    env = dict(os.environ if env is None else env)
    repo, token = env.get("RLHF_DEMO_HUB_DATASET", ""), env.get("HF_TOKEN", "")
    return (repo, token) if repo and token else None


def snapshot_database(db_path: Path, target: Path) -> Path:
    """A consistent, compact copy of a live WAL database, written atomically. ``VACUUM INTO``
    rather than the backup API: a page-by-page copy would carry the free pages, where the
    text of deleted rows lingers."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    source = sqlite3.connect(db_path)
    try:
        source.execute("VACUUM INTO ?", [str(tmp)])
    finally:
        source.close()
    tmp.replace(target)
    return target


class HubUnavailable(RuntimeError):
    """The Hub's snapshot could not be read; pushing a fresh database now would replace it."""


def restore_from_hub(db_path: Path, repo_id: str, token: str, data_dir: Path | None = None) -> bool:
    """Download the last snapshot when the local DB is missing (fresh Space container); with
    ``data_dir``, also the adapter versions the registry may serve and the latest reward model
    that are missing locally. Returns whether the DB was restored; HubUnavailable when the
    Hub may hold a snapshot that could not be read."""
    restored = _restore_database(db_path, repo_id, token)
    if data_dir is not None and db_path.exists():
        try:
            restore_models(data_dir, db_path, repo_id, token)
        except Exception as exc:  # noqa: BLE001 - serve what we have (the server falls back), say so
            log.warning("could not restore the models from %s: %s", repo_id, str(exc).splitlines()[0])
    return restored


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _restore_database(db_path: Path, repo_id: str, token: str) -> bool:
    if db_path.exists():
        return False
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        cached = hf_hub_download(repo_id, f"snapshot/{SNAPSHOT_NAME}", repo_type="dataset", token=token)
    except GatedRepoError as exc:
        raise HubUnavailable(f"no access to the Hub dataset {repo_id}: {_first_line(exc)}") from None
    except (RepositoryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError):
        log.info("no snapshot in the Hub dataset %s yet: starting empty", repo_id)
        return False
    except Exception as exc:  # noqa: BLE001 - network down, Hub error: the snapshot may exist
        raise HubUnavailable(f"could not read the snapshot of {repo_id}: {_first_line(exc)}") from None
    db_path.parent.mkdir(parents=True, exist_ok=True)
    partial = db_path.with_name(db_path.name + ".restore")
    shutil.copyfile(cached, partial)
    partial.replace(db_path)  # whole or absent, also when a SIGTERM comes mid-copy
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
            dest = staging / name[len(prefix) :]
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
    runs = sorted(
        {f.split("/")[1] for f in files if f.startswith(f"{REWARD_DIR}/") and f.endswith(f"/{PROBE_FILE}")}, key=_run_number
    )
    local_runs = [p.name for p in (data_dir / REWARD_DIR).glob("run-*") if (p / PROBE_FILE).exists()]
    if runs and not local_runs:
        _download_folder(repo_id, token, files, f"{REWARD_DIR}/{runs[-1]}/", data_dir / REWARD_DIR / runs[-1])
        restored.append(f"{REWARD_DIR}/{runs[-1]}")
    if restored:
        log.info("restored %s from the Hub dataset %s", ", ".join(restored), repo_id)
    return restored


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link (copy where links fail) ``source``'s files into ``target``: no second copy on disk,
    and the source's mtime, so the sync sees an unchanged file as already uploaded."""
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
        if (
            status in SERVABLE_STATUSES
            and source.is_dir()
            and not target.exists()
            and f"adapters/{version}/adapter_config.json" not in remote
        ):
            _link_tree(source, target)
            staged.append(f"adapters/{version}")
    runs = sorted(
        (p for p in (data_dir / REWARD_DIR).glob("run-*") if (p / PROBE_FILE).exists()), key=lambda p: _run_number(p.name)
    )
    if runs and f"{REWARD_DIR}/{runs[-1].name}/{PROBE_FILE}" not in remote and not (folder / REWARD_DIR / runs[-1].name).exists():
        for old in (folder / REWARD_DIR).glob("run-*"):  # uploaded already; only the latest is restored
            shutil.rmtree(old, ignore_errors=True)
        _link_tree(runs[-1], folder / REWARD_DIR / runs[-1].name)
        staged.append(f"{REWARD_DIR}/{runs[-1].name}")
    return staged


class HubSync:
    """Pushes the data directory's snapshot to a private Hub dataset: every ``every_minutes``,
    on demand (after a deletion) and once more on shutdown, one push at a time.

    Each push commits only the files whose content changed since the last one and then
    squashes the dataset's history, so that the Hub keeps the latest snapshot only. Every
    thread it starts is a daemon: a push still running when the grace period ends is
    abandoned with the process, never waited for."""

    def __init__(self, data_dir: Path, db_path: Path, repo_id: str, token: str, every_minutes: float = 10.0) -> None:
        from huggingface_hub import HfApi

        self.data_dir, self.db_path, self.repo_id = data_dir, db_path, repo_id
        self.folder = data_dir / "hub-sync"
        self.every_s = every_minutes * 60
        self.api = HfApi(token=token)
        self._remote: set[str] | None = None  # the repo's files when this container started: not sent again
        self._sent: dict[str, tuple[int, int, str]] = {}  # path in repo -> (size, mtime_ns, sha256) last committed
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> HubSync:
        """Push every ``every_minutes`` in a daemon thread until :meth:`close`; the sync that
        "Delete my data" pushes through (:func:`push_after_deletion`)."""
        global _running

        def loop() -> None:
            while not self._stop.wait(self.every_s):
                self.push_within(self.every_s)

        threading.Thread(target=loop, name="hub-sync", daemon=True).start()
        _running = self
        return self

    def push(self) -> bool:
        """Snapshot, commit what changed, squash the history; returns whether anything was committed."""
        from huggingface_hub import CommitOperationAdd

        with self._lock:
            if self._remote is None:
                self.api.create_repo(self.repo_id, repo_type="dataset", private=True, exist_ok=True)
                self._remote = set(self.api.list_repo_files(self.repo_id, repo_type="dataset"))
            self._stage()
            changed = {}
            for path in sorted(p for p in self.folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
                name, stat = path.relative_to(self.folder).as_posix(), path.stat()
                seen = self._sent.get(name)
                if seen is not None and seen[:2] == (stat.st_size, stat.st_mtime_ns):
                    continue
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                if seen is None or seen[2] != digest:
                    changed[name] = (stat.st_size, stat.st_mtime_ns, digest)
                else:
                    self._sent[name] = (stat.st_size, stat.st_mtime_ns, digest)
            if not changed:
                return False
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(self.folder / name)) for name in changed]
            self.api.create_commit(self.repo_id, repo_type="dataset", operations=operations, commit_message="rlhf-demo snapshot")
            self._sent.update(changed)
            try:
                self.api.super_squash_history(
                    self.repo_id, repo_type="dataset", commit_message="rlhf-demo snapshot (history squashed)"
                )
            except Exception as exc:  # noqa: BLE001 - the snapshot is safe; the older ones stay in the history until the next push
                log.warning("could not squash the history of %s: %s", self.repo_id, _first_line(exc))
            return True

    def _stage(self) -> None:
        from rlhf_demo.store import FeedbackStore, export_preferences, export_unpaired

        snapshot = snapshot_database(self.db_path, self.folder / "snapshot" / SNAPSHOT_NAME)
        stage_models(self.data_dir, snapshot, self.folder, self._remote or set())  # the registry as snapshotted
        store = FeedbackStore(self.db_path)
        try:
            export_preferences(store, self.folder / "exports" / "preferences.jsonl")
            export_unpaired(store, self.folder / "exports" / "unpaired.jsonl")
        finally:
            store.close()

    def push_within(self, timeout_s: float) -> bool:
        """Push in a daemon thread and wait at most ``timeout_s``; True when it finished without error."""
        outcome: list[bool] = []

        def run() -> None:
            try:
                self.push()
                outcome.append(True)
            except Exception as exc:  # noqa: BLE001 - logged; the next push tries again
                log.error("push to the Hub dataset %s failed: %s", self.repo_id, _first_line(exc))
                outcome.append(False)

        thread = threading.Thread(target=run, name="hub-push", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            log.error("push to the Hub dataset %s did not finish within %.0f s", self.repo_id, timeout_s)
        return bool(outcome and outcome[0])

    def close(self, grace_s: float = FINAL_PUSH_S) -> bool:
        """Stop the schedule and push a last time, waiting at most ``grace_s``; True when it got there."""
        global _running
        self._stop.set()
        if _running is self:
            _running = None
        started = time.monotonic()
        done = self.push_within(grace_s)
        log.info("final push to %s %s after %.1f s", self.repo_id, "done" if done else "NOT done", time.monotonic() - started)
        return done


_running: HubSync | None = None  # the process's sync, pushed through after a deletion


def push_after_deletion() -> str:
    """Push now so that a deletion reaches the Hub snapshot (and, by the squash, its history);
    one sentence for the visitor, empty when this app does not sync."""
    sync = _running
    if sync is None:
        return ""
    if sync.push_within(DELETION_PUSH_S):
        return "The Hub backup no longer holds it either."
    return "The Hub backup could not be updated just now; it will be on its next push (within minutes)."


def persistence_note(db_path: Path, env: dict[str, str] | None = None) -> str:
    """One honest sentence for the UI about what survives a restart."""
    target = hub_target(env)
    env = dict(os.environ if env is None else env)
    if target:
        return (
            f"Votes are stored in SQLite at `{db_path}` and copied to the Hub dataset `{target[0]}` every few minutes, "
            'after each "Delete my data" and on shutdown.'
        )
    if env.get("SPACE_ID"):
        return (
            f"Votes are stored in SQLite at `{db_path}`. **This Space's disk is wiped on restart**: set `HF_TOKEN` and "
            "`RLHF_DEMO_HUB_DATASET` to keep them in a Hub dataset."
        )
    return f"Votes are stored in SQLite at `{db_path}`."
