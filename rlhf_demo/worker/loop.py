"""The worker process: wait for enough new votes (or a manual request), then run a cycle.

Runs on its own (``python -m rlhf_demo worker --data-dir …``) or as the app's child
process. Every start first repairs what a killed predecessor may have left: runs still
marked "running" become "failed", staging folders are removed. The served adapter is only
ever changed by a registry row, written last, so a kill at any moment changes nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

from rlhf_demo.config import Settings
from rlhf_demo.store import FeedbackStore, StoreError
from rlhf_demo.worker.publish import clean_partial
from rlhf_demo.worker.status import WorkerStatus, take_training_request, write_status

log = logging.getLogger(__name__)


def _iso(ts: str | None) -> datetime | None:
    if not ts:
        return None
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def due(store: FeedbackStore, settings: Settings, manual: bool = False, now: datetime | None = None) -> str | None:
    """Why a cycle should run now, or None. Every N new votes or T minutes, whichever first."""
    training = settings.training
    counts = store.counts()
    total = counts["thumbs_up"] + counts["thumbs_down"] + counts["preferences"] + counts["both_bad"]
    if total == 0:
        return None
    if manual:
        return f"manual request ({total} votes)"
    if total < training.min_votes:
        return None
    runs = [r for r in store.list_runs(limit=20) if r["kind"] == "cycle"]
    last = runs[0] if runs else None
    since = store.count_votes_since(last["started_at"] if last else None)
    if since >= training.every_votes:
        return f"{since} new votes"
    started = _iso(last["started_at"]) if last else None
    now = now or datetime.now(UTC)
    if since > 0 and started is not None and (now - started).total_seconds() >= 60 * training.every_minutes:
        return f"{since} new votes and {training.every_minutes:g} min since the last cycle"
    return None


PARENT_ENV = "RLHF_DEMO_WORKER_PARENT_PID"  # set by the app's supervisor: stop when that process dies


class CycleInterrupted(Exception):
    """Raised inside a cycle once the worker is asked to stop (SIGTERM, or the app died)."""


class Worker:
    """The loop around :func:`rlhf_demo.worker.cycle.run_cycle`; owns the one base model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = FeedbackStore(settings.db_path)
        self.status = WorkerStatus()
        self._stop = threading.Event()  # stop() from another thread; it also ends the idle wait
        self._signalled = False  # set by the signal handler, which must take no lock (on_signal)
        self._in_cycle = False  # a stop request then waits for the cycle's next progress report
        self._loaded: Any = None

    @property
    def stopping(self) -> bool:
        return self._signalled or self._stop.is_set()

    def repair(self) -> None:
        """Undo what a killed worker may have left: stale runs and partial folders."""
        stale = self.store.mark_stale_runs_failed()
        if stale:
            log.warning("marked %d interrupted run(s) as failed", stale)
        clean_partial(self.settings.adapters_dir, self.store)

    def report(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.status, key, value)
        write_status(self.settings.worker_dir, self.status)

    def _progress(self, **changes: Any) -> None:
        """The cycle's progress callback; also where a stop request ends a cycle early."""
        if self.stopping:
            raise CycleInterrupted("the worker was asked to stop during a cycle; the run is left unpublished")
        self.report(**changes)

    def loaded(self) -> Any:
        if self._loaded is None:
            from rlhf_demo.modeling import load_model

            self.report(state="loading", message="loading the base model")
            self._loaded = load_model(self.settings, role="train")
        return self._loaded

    def run_once(self, manual: bool = False) -> dict[str, Any] | None:
        """One check; runs a cycle when due. Returns the cycle's summary, if one ran."""
        from rlhf_demo.worker.cycle import run_cycle

        reason = due(self.store, self.settings, manual=manual)
        if reason is None:
            return None
        log.info("training cycle: %s", reason)
        loaded = self.loaded()
        self.report(state="training", phase="start", step=0, total=0, started_at=time.time(), message=reason)
        self._in_cycle = True
        try:
            summary = run_cycle(self.settings, self.store, loaded, report=self._progress)
        except CycleInterrupted as exc:
            self.report(state="stopped", message=str(exc))
            raise
        except Exception as exc:
            self.report(state="error", message=f"cycle failed: {exc}")
            raise
        finally:
            self._in_cycle = False
        self.report(state="idle", phase="", step=0, total=0, message=summary.get("decision", ""))
        return summary

    def serve_forever(self) -> None:
        self.repair()
        self.report(state="idle", message="waiting for votes")
        poll = self.settings.training.vote_poll_seconds
        try:
            while not self.stopping:
                manual = take_training_request(self.settings.worker_dir)
                try:
                    self.run_once(manual=manual)
                except StoreError as exc:  # busy DB, etc.: try again on the next poll
                    log.warning("store error, retrying later: %s", exc)
                except CycleInterrupted as exc:
                    log.info("%s", exc)
                except Exception:  # noqa: BLE001 - a failed cycle is recorded; keep waiting
                    log.exception("training cycle failed")
                self.report()
                if not self.stopping:
                    self._stop.wait(poll)
        finally:  # also when a signal ended the wait (on_signal)
            if self.status.state != "stopped":
                self.report(state="stopped", message="stopped")

    def stop(self, *_: Any) -> None:
        """Ask the loop to end (from another thread): at a cycle's next progress report."""
        self._stop.set()

    def on_signal(self, *_: Any) -> None:
        """SIGTERM/SIGINT. Inside a cycle: stop at its next progress report (the run is then
        recorded as stopped). Anywhere else (waiting, importing torch, loading the model)
        there is nothing to finish, and that work can take minutes for a niced worker on a
        busy machine: leave now, so a worker never outlives its app for long.

        It takes no lock: a handler runs on top of whatever the main thread was doing, its
        own previous run included, and the app's death signals the worker once per exiting
        thread. A handler that called ``Event.set`` was found deadlocked in its second run,
        waiting for the lock its first run held."""
        if self._signalled:
            return  # the first signal's stop is under way
        self._signalled = True
        if not self._in_cycle:
            raise SystemExit(0)


def follow_parent(parent_pid: int) -> None:
    """Ask Linux for SIGTERM when the app that started us dies, even by ``kill -9``, so no
    orphaned worker goes on training against a data directory nobody serves."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before we asked
        raise SystemExit(f"the app (pid {parent_pid}) that started this worker is gone")


def main(settings: Settings) -> None:
    """Entry point of ``python -m rlhf_demo worker``: lower priority, stop on SIGTERM."""
    try:
        os.nice(settings.training.nice)
    except OSError:
        pass
    worker = Worker(settings)
    signal.signal(signal.SIGTERM, worker.on_signal)
    signal.signal(signal.SIGINT, worker.on_signal)
    if os.environ.get(PARENT_ENV):
        follow_parent(int(os.environ[PARENT_ENV]))
    worker.serve_forever()
