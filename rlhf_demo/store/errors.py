"""Store errors: one base class, so the UI and worker catch all the store raises.

Messages are written for a person reading a toast or a log line, not for a debugger.
"""

from __future__ import annotations

import sqlite3


class StoreError(Exception):
    """Anything the feedback store refuses or fails to do; nothing was written."""


class UnknownIdError(StoreError):
    """An id (response, conversation, run, version) that the store has never seen."""


class InvalidInputError(StoreError):
    """A value the store will not save (wrong type, out of range, too long, NUL)."""


class StoreBusyError(StoreError):
    """Another writer held the database lock for longer than the busy timeout."""


def translate_sqlite_error(exc: sqlite3.Error, busy_timeout_ms: int) -> StoreError:
    """Map a sqlite3 error to a StoreError; callers never need to import sqlite3."""
    message = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in message or "busy" in message):
        return StoreBusyError(
            f"the feedback database stayed locked by another writer for more than "
            f"{busy_timeout_ms} ms; nothing was written, please try again"
        )
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in message:
        return StoreError("the feedback store is closed")
    return StoreError(f"feedback database error: {message}")
