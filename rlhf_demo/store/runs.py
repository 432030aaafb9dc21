"""Training runs and their metric curves, as the worker records them."""

from __future__ import annotations

import numbers
from typing import Any

from .db import StoreBase, decode, get_row, inserted_id
from .errors import InvalidInputError
from .validate import (
    FINISHED_RUN_STATUSES,
    MAX_ID_BYTES,
    MAX_TEXT_BYTES,
    PHASES,
    check_choice,
    check_count,
    check_str,
    check_version,
    encode_json,
    is_finite_number,
    kind_of,
    shown,
    utc_now,
)


def _check_metric(name: object, value: object) -> float:
    check_str("metric name", name, MAX_ID_BYTES)
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or (not is_finite_number(value) and isinstance(value, numbers.Integral))
    ):  # NaN and infinity are results (stored as NULL / inf); an int past a float is not
        raise InvalidInputError(f"metric {shown(name)} must be a number, got {shown(value)}")
    return float(value)


def _error_tail(error: str) -> str:
    """A long error keeps its tail (where the cause is): recording must not fail."""
    error = str(error).replace("\x00", "")
    return error.encode("utf-8", "replace")[-MAX_TEXT_BYTES:].decode("utf-8", "ignore")


class Runs(StoreBase):
    """One row per training run, with its summary, and its metrics per step."""

    def start_run(self, kind: str) -> int:
        check_str("kind", kind, MAX_ID_BYTES)
        with self._write() as db:
            table = db.table("training_runs").insert({"kind": kind, "status": "running", "started_at": utc_now()})
            return inserted_id(table)

    def log_metric(self, run_id: int, phase: str, step: int, name: str, value: float) -> None:
        self.log_metrics(run_id, phase, step, {name: value})

    def log_metrics(self, run_id: int, phase: str, step: int, metrics: dict[str, float]) -> None:
        """Several curves at one step, in one transaction. NaN is stored as NULL."""
        check_choice("phase", phase, PHASES)
        step = check_count("step", step)
        if not isinstance(metrics, dict):
            raise InvalidInputError(f"metrics must be a dict, got {kind_of(metrics)}")
        now = utc_now()
        rows = [
            {"run_id": run_id, "phase": phase, "step": step, "name": name, "value": _check_metric(name, value), "created_at": now}
            for name, value in metrics.items()
        ]
        with self._write() as db:
            get_row(db, "training_runs", run_id, "training run")
            db.table("run_metrics").insert_all(rows)

    def finish_run(
        self,
        run_id: int,
        status: str,
        summary: dict[str, Any] | None = None,
        error: str | None = None,
        candidate_version: str | None = None,
    ) -> None:
        """Close a running run. A long error keeps its tail: recording must not fail."""
        check_choice("status", status, FINISHED_RUN_STATUSES)
        if candidate_version is not None:
            check_version("candidate_version", candidate_version)
        updates: dict[str, Any] = {
            "status": status,
            "finished_at": utc_now(),
            "summary_json": None if summary is None else encode_json("summary", summary),
            "candidate_version": candidate_version,
        }
        if error is not None:
            updates["error"] = _error_tail(error)
        with self._write() as db:
            row = get_row(db, "training_runs", run_id, "training run")
            if row["status"] != "running":
                raise InvalidInputError(f"training run {run_id} already finished ({row['status']})")
            db.table("training_runs").update(run_id, updates)

    def list_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, summary decoded."""
        limit = check_count("limit", limit)
        rows = self._query("SELECT * FROM training_runs ORDER BY id DESC LIMIT ?", [limit])
        return [decode(row, "summary") for row in rows]

    def run_metrics(self, run_id: int) -> list[dict[str, Any]]:
        with self._read() as db:
            get_row(db, "training_runs", run_id, "training run")
            return list(db.table("run_metrics").rows_where("run_id = ?", [run_id], order_by="id"))

    def mark_stale_runs_failed(self) -> int:
        """At worker start, a run still 'running' died with its process: fail it."""
        with self._write() as db:
            runs = db.table("training_runs")
            stale = [row["id"] for row in runs.rows_where("status = 'running'")]
            for run_id in stale:
                runs.update(run_id, {"status": "failed", "finished_at": utc_now(), "error": "interrupted"})
        return len(stale)
