"""Shared plumbing of the feedback store: one writer connection, per-thread readers.

One SQLite file in WAL mode, shared by the serving process (Gradio handlers in many
threads) and the worker process. Each write is one ``BEGIN IMMEDIATE`` transaction,
committed before the method returns, so a vote the UI confirmed is on disk; a write
that fails leaves nothing behind. Inputs are validated before any SQL runs.

Reads go through per-thread read-only connections, never through the writer's lock:
in WAL mode a reader sees the last committed state while a writer works, so the Data
and Dashboard tabs do not wait behind a slow write (or the worker's).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import sqlite_utils
from sqlite_utils.db import NotFoundError

from .errors import StoreError, UnknownIdError, translate_sqlite_error
from .schema import immediate_transaction, migrate
from .validate import check_count, check_key, shown


def decode(row: dict[str, Any], *fields: str) -> dict[str, Any]:
    """Turn ``x_json`` columns back into Python values under the key ``x``."""
    out = dict(row)
    for field in fields:
        raw = out.pop(f"{field}_json")
        out[field] = None if raw is None else json.loads(raw)
    return out


def inserted_id(table: sqlite_utils.db.Table) -> int:
    """The integer id of the row just inserted (INTEGER PRIMARY KEY is the rowid)."""
    if table.last_rowid is None:  # pragma: no cover - sqlite always reports one
        raise StoreError(f"insert into {table.name} reported no row id")
    return table.last_rowid


def get_row(db: sqlite_utils.Database, table: str, key: object, what: str) -> dict[str, Any]:
    """One row by primary key, or UnknownIdError naming ``what`` was not found."""
    key = check_key(what, key)  # SQLite could not bind a huge int or a lone surrogate
    try:
        return db.table(table).get(key)
    except NotFoundError:
        raise UnknownIdError(f"unknown {what}: {shown(key)}") from None


def file_id(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode); None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class StoreBase:
    """The connections and transactions every topic of the store shares; thread-safe."""

    def __init__(self, db_path: str | Path, busy_timeout_ms: int = 5000) -> None:
        busy_timeout_ms = check_count("busy_timeout_ms", busy_timeout_ms)
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_ms = busy_timeout_ms
        # One connection for all threads, guarded by one lock: sqlite3 connections keep
        # transaction state per connection, so interleaved threads would share it.
        self._lock = threading.RLock()
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        conn = sqlite3.connect(str(self.path), timeout=busy_timeout_ms / 1000, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA secure_delete = ON")  # deleted text is overwritten, not left in free pages
            self.db = sqlite_utils.Database(conn)
            migrate(self.db)
            self._file_id = file_id(self.path)
        except sqlite3.Error as exc:
            conn.close()
            raise translate_sqlite_error(exc, busy_timeout_ms) from exc
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._closed = True
        with self._readers_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        with self._lock:
            self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One committed transaction; an error rolls it back, becomes a StoreError."""
        with self._lock:
            self._check_file()
            try:
                with immediate_transaction(self.db):
                    yield self.db
            except sqlite3.Error as exc:
                raise translate_sqlite_error(exc, self._busy_timeout_ms) from exc

    def _check_file(self) -> None:
        """Refuse to write when the file at ``path`` is no longer the one this store opened:
        SQLite would keep writing into the deleted file, and every vote would be lost."""
        now = file_id(self.path)
        if now != self._file_id:
            how = "deleted" if now is None else "replaced"
            raise StoreError(
                f"the feedback database {self.path} was {how} while the app ran; nothing was written: restart the app"
            )

    def _truncate_log(self) -> None:
        """Copy the write-ahead log into the file and empty it (best effort: a reader in
        another process may still hold it, then the next checkpoint overwrites it)."""
        with self._lock:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise translate_sqlite_error(exc, self._busy_timeout_ms) from exc

    def _reader(self) -> sqlite_utils.Database:
        """This thread's read-only connection (opened on first use).

        Separate connections let readers run beside the writer (WAL); read-only ones
        cannot write by mistake. Each thread has its own, so no lock is needed.
        """
        if self._closed:
            raise StoreError("the feedback store is closed")
        db = getattr(self._readers, "db", None)
        if db is None:
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=self._busy_timeout_ms / 1000,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            with self._readers_lock:
                self._reader_conns.append(conn)
            db = self._readers.db = sqlite_utils.Database(conn)
        return db

    @contextmanager
    def _read(self) -> Iterator[sqlite_utils.Database]:
        try:
            yield self._reader()
        except sqlite3.Error as exc:
            raise translate_sqlite_error(exc, self._busy_timeout_ms) from exc

    def _query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with self._read() as db:
            return list(db.query(sql, params or []))
