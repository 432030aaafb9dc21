"""The app's side of the worker: start it as a child process, restart it with backoff.

A separate OS process (not a thread) so training never holds the server's GIL or its
model, and a crash or ``kill -9`` of the worker leaves the server untouched.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from rlhf_demo.config import Settings
from rlhf_demo.worker.loop import PARENT_ENV
from rlhf_demo.worker.status import read_status

log = logging.getLogger(__name__)


@dataclass
class SupervisorState:
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None
    next_start_in: float = 0.0


def worker_command(settings: Settings) -> list[str]:
    """The same settings the server uses; everything else travels in the environment."""
    return [
        sys.executable, "-m", "rlhf_demo", "worker",
        "--model", settings.model,
        "--data-dir", str(settings.data_dir),
        "--quantization", settings.quantization,
        "--compute-dtype", settings.compute_dtype,
        "--device", settings.device,
    ]  # fmt: skip


class WorkerSupervisor:
    """Keeps one worker process alive; exponential backoff between restarts (max 5 min)."""

    def __init__(self, settings: Settings, max_backoff_s: float = 300.0) -> None:
        self.settings = settings
        self.max_backoff_s = max_backoff_s
        self.state = SupervisorState()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = 2.0
        while not self._stop.is_set():
            started = time.monotonic()
            env = {**os.environ, PARENT_ENV: str(os.getpid())}  # the worker stops when this process dies
            self._proc = subprocess.Popen(worker_command(self.settings), env=env)
            self.state.pid = self._proc.pid
            log.info("worker started (pid %s)", self._proc.pid)
            if self._stop.is_set():  # stop() ran while the process was starting and could not see it
                self._proc.terminate()
            code = self._proc.wait()
            self.state.last_exit, self.state.pid = code, None
            if self._stop.is_set():
                break
            if time.monotonic() - started > 600:
                backoff = 2.0  # it ran well for a while: start the backoff again
            self.state.restarts += 1
            self.state.next_start_in = backoff
            log.error("worker exited with %s; restarting in %.0f s", code, backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    def describe(self) -> dict[str, Any]:
        status = read_status(self.settings.worker_dir)
        return {
            "process": "running"
            if self.state.pid
            else f"down (exit {self.state.last_exit}, restart in {self.state.next_start_in:.0f} s)",
            "pid": self.state.pid,
            "restarts": self.state.restarts,
            "status": status,
        }
