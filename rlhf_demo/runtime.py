"""The serving process's objects, built once: settings, store, model, PolicyServer, registry sync.

The registry (the ``adapter_versions`` table) is the single source of truth for which
version is served; the server polls it, so a worker in another process, or an admin
action, changes what is served without a restart.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_demo.config import Settings
from rlhf_demo.modeling import LoadedModel, load_model
from rlhf_demo.modeling.adapters import AdapterError, attach_new_adapter, save_adapter
from rlhf_demo.selection import Judge
from rlhf_demo.serving import BASE_VERSION, PolicyServer
from rlhf_demo.store import FeedbackStore
from rlhf_demo.visitors import Signer, VisitorBook, load_secret

log = logging.getLogger(__name__)
FIRST_VERSION = "v0"


class StartupError(RuntimeError):
    """The app cannot start as configured; the message says what to change."""


def check_writable(data_dir: Path, db_path: Path | None = None) -> None:
    """Fail at start-up, in one clear sentence, when votes could not be saved later.

    Checks the folder (create it, write and remove a probe file) and the database file
    if it exists: a read-only copy would otherwise start fine and refuse every vote.
    """
    data_dir = Path(data_dir)
    hint = "set RLHF_DEMO_DATA_DIR (or --data-dir) to a writable folder"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise StartupError(f"the data directory {data_dir.resolve()} is not writable ({exc.strerror or exc}); {hint}") from None
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


class Runtime:
    """Owns the long-lived objects of the serving process."""

    def __init__(self, settings: Settings, loaded: LoadedModel | None = None) -> None:
        self.settings = settings
        check_writable(settings.data_dir, settings.db_path)
        self.store = FeedbackStore(settings.db_path)
        self.signer = Signer(load_secret(settings.data_dir))
        self.visitors = VisitorBook()
        self.loaded = loaded or load_model(settings)
        self.server = PolicyServer(self.loaded, settings.sampling, max_slots=settings.adapter_cache + 1)
        self.status = SyncStatus()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.server.reserve_slots(settings.lora)
        self.loaded.model = self.server.model  # one PeftModel for everything in this process
        # the worker's newest reward ensemble, read with this process's base: Compare pairs, best-of-n
        self.judge = Judge(self.server, settings.data_dir / "reward", settings.training.reward)
        self.ensure_first_version()
        self.sync_registry()

    def ensure_first_version(self) -> None:
        """At first start, publish a fresh identity LoRA as ``v0`` and make it active."""
        if self.store.list_versions():
            return
        folder = self.settings.adapters_dir / FIRST_VERSION
        if not folder.exists():
            self.settings.adapters_dir.mkdir(parents=True, exist_ok=True)
            model = attach_new_adapter(self.server.model, FIRST_VERSION, self.settings.lora)
            save_adapter(model, FIRST_VERSION, folder)
            model.delete_adapter(FIRST_VERSION)  # the server loads it like any other version
        self.store.register_version(FIRST_VERSION, str(folder), None, "active", {"note": "identity LoRA"})

    def sync_registry(self) -> str:
        """Make the server serve the registry's active version; a bad adapter is refused.

        A refused version is marked broken in the registry (with the reason) and the
        newest good version becomes active there, so the worker, other processes and a
        restart all move on from it without an admin. Bounded: each try breaks one version.
        """
        for _ in range(len(self.store.list_versions()) + 1):
            wanted = self.store.active_version() or BASE_VERSION
            if wanted == self.server.active or self._serve(wanted):
                break
        return self.server.active

    def _serve(self, wanted: str) -> bool:
        """Load and switch to ``wanted``; False (and marked broken) when it is refused."""
        started = time.perf_counter()
        try:
            load_ms, prepare_ms, mode = 0.0, 0.0, "cached"
            if wanted != BASE_VERSION and wanted not in self.server.loaded_versions:
                row = next(v for v in self.store.list_versions() if v["version"] == wanted)
                self.server.load_version(wanted, row["path"])
                load_ms, prepare_ms, mode = self.server.last_load_ms, self.server.last_prepare_ms, self.server.last_load_mode
            self.server.activate(wanted)
            self.server.unload_unused(self.settings.adapter_cache)
            self.status.last_error = ""
            total_ms = 1000 * (time.perf_counter() - started)
            self.status.swaps = [*self.status.swaps[-49:], {"version": wanted, "mode": mode, "load_ms": load_ms, "prepare_ms": prepare_ms, "total_ms": total_ms, "at": time.time()}]
        except (AdapterError, StopIteration, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            self.status.refused[wanted] = reason
            fallback = self.store.mark_broken(wanted, reason) or BASE_VERSION
            self.status.last_error = f"refused {wanted} (marked broken): {reason}; switching to {fallback}"
            log.error(self.status.last_error)
            return False
        return True

    def start_polling(self) -> None:
        """Poll the registry every ``poll_seconds`` in a daemon thread (cheap: one query)."""

        def loop() -> None:
            while not self._stop.wait(self.settings.poll_seconds):
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
