"""The worker's live status (phase, step, ETA) as a small JSON file the UI polls.

A file, not a DB table: it changes every PPO step and must never contend with vote writes.
Written atomically (temp file + rename) so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
TRAIN_NOW_FILE = "train-now"


@dataclass
class WorkerStatus:
    pid: int = field(default_factory=os.getpid)
    state: str = "idle"  # idle | training | error | stopped
    phase: str = ""  # reward | ppo | gate | publish
    step: int = 0
    total: int = 0
    run_id: int | None = None
    started_at: float = 0.0
    heartbeat: float = field(default_factory=time.time)
    message: str = ""

    @property
    def eta_s(self) -> float | None:
        if self.state != "training" or self.step <= 0 or self.total <= 0:
            return None
        elapsed = time.time() - self.started_at
        return elapsed / self.step * max(0, self.total - self.step)


def write_status(folder: Path, status: WorkerStatus) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    status.heartbeat = time.time()
    tmp = folder / f".{STATUS_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(status)))
    tmp.replace(folder / STATUS_FILE)


def read_status(folder: Path) -> WorkerStatus | None:
    try:
        data: dict[str, Any] = json.loads((folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    known = {k: v for k, v in data.items() if k in WorkerStatus.__dataclass_fields__}
    return WorkerStatus(**known)


def request_training(folder: Path) -> None:
    """Admin's "train now": a flag file the worker consumes on its next poll."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TRAIN_NOW_FILE).write_text(str(time.time()))


def take_training_request(folder: Path) -> bool:
    try:
        (folder / TRAIN_NOW_FILE).unlink()
        return True
    except FileNotFoundError:
        return False
