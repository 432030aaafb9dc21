"""The serving process's objects, built once: settings, store, model, serving engine, registry sync.

The registry (the ``adapter_versions`` table) is the single source of truth for which
version is served; the server polls it, so a worker in another process, or an admin
action, changes what is served without a restart.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_demo.config import Settings, for_device
from rlhf_demo.modeling import LoadedModel, load_model
from rlhf_demo.modeling.adapters import AdapterError, attach_new_adapter, save_adapter
from rlhf_demo.modeling.loading import eos_token_ids
from rlhf_demo.selection import Judge, LocalBase
from rlhf_demo.serving import BASE_VERSION, PolicyServer
from rlhf_demo.serving.interface import EngineError, ServingEngine
from rlhf_demo.store import SERVABLE_STATUSES, FeedbackStore
from rlhf_demo.visitors import Signer, load_secret
from rlhf_demo.worker.publish import HASHED_FILES, check_content, content_hash

log = logging.getLogger(__name__)
FIRST_VERSION = "v0"


class StartupError(RuntimeError):
    """The app cannot start as configured; the message says what to change."""


PROBE_BYTES = 256 * 1024  # a file and a SQLite row of this size: a vote's write, with room


def _probe_writes(data_dir: Path) -> None:
    """Write and fsync a file and commit a SQLite row (WAL, like the store) in ``data_dir``,
    then remove both: creating an empty file succeeds on a full disk, these do not."""
    fd, name = tempfile.mkstemp(dir=data_dir, prefix=".write-probe-")
    probe_db = Path(f"{name}.db")
    try:
        with open(fd, "wb") as probe:
            probe.write(b"\0" * PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
        con = sqlite3.connect(probe_db)
        try:
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("CREATE TABLE probe (x BLOB)")
            con.execute("INSERT INTO probe VALUES (zeroblob(?))", (PROBE_BYTES,))
            con.commit()
        finally:
            con.close()
    finally:
        for path in (Path(name), probe_db, Path(f"{probe_db}-wal"), Path(f"{probe_db}-shm")):
            path.unlink(missing_ok=True)


def check_writable(data_dir: Path, db_path: Path | None = None) -> None:
    """Fail at start-up, in one clear sentence, when votes could not be saved later.

    Checks the folder (create it, write a file and a SQLite row there) and the database
    file if it exists: a full disk or a read-only copy would otherwise start fine and
    refuse every vote (or fail with SQLite's bare "disk I/O error").
    """
    data_dir = Path(data_dir)
    hint = "set RLHF_DEMO_DATA_DIR (or --data-dir) to a writable folder"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        _probe_writes(data_dir)
    except (OSError, sqlite3.Error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        existing = next(p for p in (data_dir, *data_dir.resolve().parents) if p.exists())
        if shutil.disk_usage(existing).free < 2 * PROBE_BYTES:
            raise StartupError(
                f"the data directory {data_dir.resolve()} has no space left ({reason}); free space there, or {hint}"
            ) from None
        raise StartupError(f"the data directory {data_dir.resolve()} is not writable ({reason}); {hint}") from None
    db_path = Path(db_path or data_dir / "feedback.db")
    for path in (db_path, db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")):
        if path.exists() and not os.access(path, os.W_OK):
            raise StartupError(f"the database file {path.resolve()} is read-only; {hint}, or fix its permissions")


@dataclass
class SyncStatus:
    """What the last registry poll did; shown on the dashboard."""

    last_error: str = ""
    refused: dict[str, str] = field(default_factory=dict)
    # version, mode, load_ms (generation lock held), prepare_ms (whole load), total_ms, at
    swaps: list[dict[str, Any]] = field(default_factory=list)


def build_engine(settings: Settings, loaded: LoadedModel) -> ServingEngine:
    """The engine the settings name: the policy in this process (default), or a vLLM server,
    which this process only sends prompts to (it keeps the tokenizer and the EOS rule)."""
    if settings.engine == "vllm":
        from rlhf_demo.serving.vllm_engine import VllmEngine

        eos = frozenset(eos_token_ids(loaded.model, loaded.tokenizer))
        try:
            return VllmEngine(settings.engine_url, loaded.tokenizer, eos, settings.sampling)
        except EngineError as exc:
            raise StartupError(str(exc)) from None
    server = PolicyServer(loaded, settings.sampling, max_slots=settings.adapter_cache + 1, max_batch=settings.max_batch)
    server.reserve_slots(settings.lora)
    loaded.model = server.model  # one PeftModel for everything in this process
    return server


class Runtime:
    """Owns the long-lived objects of the serving process."""

    def __init__(self, settings: Settings, loaded: LoadedModel | None = None) -> None:
        check_writable(settings.data_dir, settings.db_path)
        self.store = FeedbackStore(settings.db_path)
        self.signer = Signer(load_secret(settings.data_dir))
        self.loaded = loaded or load_model(settings)
        self.settings = settings = for_device(settings, self.loaded.device)
        self.server = build_engine(settings, self.loaded)
        self.status = SyncStatus()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._checked: dict[str, tuple[Any, ...]] = {}  # version -> its files' stat when last hashed
        # the worker's newest reward ensemble, read with this process's base: Compare pairs, best-of-n
        reader = self.server if isinstance(self.server, PolicyServer) else LocalBase(self.loaded.model, self.loaded.tokenizer)
        self.judge = Judge(reader, settings.data_dir / "reward", settings.training.reward)
        self.ensure_first_version()
        self.sync_registry()

    def ensure_first_version(self) -> None:
        """At first start, publish a fresh identity LoRA as ``v0`` and make it active."""
        if self.store.list_versions():
            return
        folder = self.settings.adapters_dir / FIRST_VERSION
        if not folder.exists():
            self.settings.adapters_dir.mkdir(parents=True, exist_ok=True)
            model = attach_new_adapter(self.loaded.model, FIRST_VERSION, self.settings.lora)
            save_adapter(model, FIRST_VERSION, folder)
            model.delete_adapter(FIRST_VERSION)  # the server loads it like any other version
            self.loaded.model = model
        self.store.register_version(
            FIRST_VERSION, str(folder), None, "active", {"note": "identity LoRA"}, content_hash=content_hash(folder)
        )

    def sync_registry(self) -> str:
        """Make the server serve the registry's active version; a bad adapter is refused.

        A refused version is marked broken in the registry (with the reason) and the
        newest good version becomes active there, so the worker, other processes and a
        restart all move on from it without an admin. Bounded: each try breaks one version.
        """
        for _ in range(len(self.store.list_versions()) + 1):
            wanted = self.store.active_version() or BASE_VERSION
            if self._serve(wanted):
                break
        return self.server.active

    def _check_files(self, version: str) -> dict[str, Any]:
        """The registry row of ``version`` once its files match the registered hash (re-read
        only when their size or time changed since the last check)."""
        row = self.store.get_version(version)
        if row is None:
            raise AdapterError(f"{version} is not in the registry")
        if not row.get("content_hash"):
            return row  # registered before hashes were kept
        stats = tuple((s.st_size, s.st_mtime_ns) for s in (Path(row["path"], name).stat() for name in HASHED_FILES))
        if self._checked.get(version) != (row["path"], stats):
            check_content(row)
            self._checked[version] = (row["path"], stats)
        return row

    def _serve(self, wanted: str) -> bool:
        """Serve ``wanted`` (loading it if needed) unless its files are not the ones
        registered or do not load; False (and marked broken) when it is refused."""
        started = time.perf_counter()
        try:
            load_ms, prepare_ms, mode = 0.0, 0.0, "cached"
            row = None if wanted == BASE_VERSION else self._check_files(wanted)
            if wanted == self.server.active:
                return True
            if row is not None and wanted not in self.server.loaded_versions:
                self.server.load_version(wanted, row["path"])
                load_ms, prepare_ms, mode = self.server.last_load_ms, self.server.last_prepare_ms, self.server.last_load_mode
            self.server.swap_to(wanted)
            self.server.unload_unused(self.settings.adapter_cache)
            self.status.last_error = ""
            total_ms = 1000 * (time.perf_counter() - started)
            self.status.swaps = [
                *self.status.swaps[-49:],
                {
                    "version": wanted,
                    "mode": mode,
                    "load_ms": load_ms,
                    "prepare_ms": prepare_ms,
                    "total_ms": total_ms,
                    "at": time.time(),
                },
            ]
        except (AdapterError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            self.status.refused[wanted] = reason
            fallback = self.store.mark_broken(wanted, reason) or BASE_VERSION
            self.status.last_error = f"refused {wanted} (marked broken): {reason}; switching to {fallback}"
            log.error(self.status.last_error)
            return False
        return True

    def previous_version(self) -> str | None:
        """The version served before the active one, loaded so that it can answer (Compare's
        "active vs previous"); None when nothing was served before it."""
        served = [v for v in self.store.list_versions() if v["status"] in SERVABLE_STATUSES]
        names = [v["version"] for v in served]
        if self.server.active not in names:
            return names[-1] if names else None
        position = names.index(self.server.active)
        if position == 0:
            return None
        previous = served[position - 1]
        self.server.load_version(previous["version"], previous["path"])
        return previous["version"]

    def start_polling(self) -> None:
        """Poll the registry every ``registry_poll_seconds`` in a daemon thread (cheap: one query)."""

        def loop() -> None:
            while not self._stop.wait(self.settings.registry_poll_seconds):
                try:
                    self.sync_registry()
                except Exception:  # noqa: BLE001 - a poll must never kill the server
                    log.exception("registry poll failed")

        self._poller = threading.Thread(target=loop, name="registry-poll", daemon=True)
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        self.store.close()

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.loaded.describe(),
            "active_adapter": self.server.active,
            "data_dir": str(self.settings.data_dir.resolve()),
        }
