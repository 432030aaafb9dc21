"""The adapter registry: which versions exist, where their files are, which one is served.

The ``adapter_versions`` table is the single source of truth for what is served: the
server polls it, so a worker in another process or an admin changes the served version
without a restart. Statuses: ``active`` (served now; at most one), ``retired`` (passed
the gate, served before, may be served again), ``rejected`` (the gate refused it; never
served), ``broken`` (the server refused to load it; ``broken_reason`` says why).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import sqlite_utils

from .db import StoreBase, decode, get_row
from .errors import InvalidInputError
from .validate import MAX_TEXT_BYTES, check_choice, check_key, check_str, check_version, encode_json, shown, utc_now

VERSION_STATUSES = ("active", "retired", "rejected", "broken")
SERVABLE_STATUSES = ("active", "retired")  # passed the gate and not broken: may be served
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NUMERIC_ORDER = "CAST(substr(version, 2) AS INTEGER)"  # v2 before v10


def _retire_active(db: sqlite_utils.Database) -> None:
    versions = db.table("adapter_versions")
    for row in list(versions.rows_where("status = 'active'")):
        versions.update(row["version"], {"status": "retired"})


def _newest_servable(db: sqlite_utils.Database, other_than: str) -> str | None:
    marks = ", ".join("?" for _ in SERVABLE_STATUSES)
    rows = list(
        db.query(
            f"SELECT version FROM adapter_versions WHERE status IN ({marks}) AND version != ? "
            f"ORDER BY {NUMERIC_ORDER} DESC LIMIT 1",
            [*SERVABLE_STATUSES, other_than],
        )
    )
    return str(rows[0]["version"]) if rows else None


class Registry(StoreBase):
    """Adapter versions and their statuses."""

    def register_version(
        self,
        version: str,
        path: str | Path,
        parent: str | None = None,
        status: str = "retired",
        metrics: dict[str, Any] | None = None,
        content_hash: str | None = None,
    ) -> None:
        """Record an adapter that is already whole on disk (the row is written last), with
        the sha256 of its files (``content_hash``) that loading it checks."""
        check_version("version", version)
        if content_hash is not None and not _SHA256_RE.match(str(content_hash)):
            raise InvalidInputError(f"content_hash must be a sha256 in hex; got {shown(content_hash)}")
        if parent is not None:
            check_version("parent", parent)
        check_choice("status", status, VERSION_STATUSES)
        row = {
            "version": version,
            "parent": parent,
            "path": check_str("path", str(path), MAX_TEXT_BYTES),
            "status": status,
            "metrics_json": encode_json("metrics", metrics or {}),
            "created_at": utc_now(),
            "content_hash": content_hash,
        }
        with self._write() as db:
            versions = db.table("adapter_versions")
            if versions.count_where("version = ?", [version]):
                raise InvalidInputError(f"adapter version {version} is already registered")
            if status == "active":
                _retire_active(db)
            versions.insert(row)

    def set_version_status(self, version: str, status: str) -> None:
        """Change a version's status; 'active' goes through set_active_version(): one active."""
        check_choice("status", status, VERSION_STATUSES)
        if status == "active":
            self.set_active_version(version)
            return
        with self._write() as db:
            get_row(db, "adapter_versions", version, "adapter version")
            db.table("adapter_versions").update(version, {"status": status})

    def set_active_version(self, version: str) -> None:
        """Serve ``version`` from now on; the old active one becomes 'retired'.

        Rolling back is setting an older version active again.
        """
        with self._write() as db:
            row = get_row(db, "adapter_versions", version, "adapter version")
            if row["status"] == "rejected":
                raise InvalidInputError(f"adapter version {version} was rejected by the gate; rejected versions are never served")
            _retire_active(db)
            # An admin may retry a version marked broken (after fixing its files); if it
            # is still unloadable, the server marks it broken again.
            db.table("adapter_versions").update(version, {"status": "active", "broken_reason": None})

    def mark_broken(self, version: str, reason: str) -> str | None:
        """The server refused ``version``: record why, and if it was the active one,
        serve the newest version that is still good instead (None: the base model).

        Stored in the registry, not in the server's memory, so a restart (or the worker)
        does not pick the broken version again.
        """
        check_version("version", version)
        reason = str(reason).replace("\x00", "")[-2000:] or "refused by the server"
        with self._write() as db:
            row = get_row(db, "adapter_versions", version, "adapter version")
            versions = db.table("adapter_versions")
            versions.update(version, {"status": "broken", "broken_reason": reason})
            if row["status"] != "active":
                rows = list(db.query("SELECT version FROM adapter_versions WHERE status = 'active'"))
                return rows[0]["version"] if rows else None
            good = _newest_servable(db, version)
            if good is not None:
                versions.update(good, {"status": "active"})
            return good

    def active_version(self) -> str | None:
        rows = self._query("SELECT version FROM adapter_versions WHERE status = 'active'")
        return rows[0]["version"] if rows else None

    def get_version(self, name: str) -> dict[str, Any] | None:
        """One version's row (metrics decoded), or None when no version has that name."""
        try:
            key = check_key("adapter version", name)
        except InvalidInputError:  # no registered name is that long, or not text
            return None
        rows = self._query("SELECT * FROM adapter_versions WHERE version = ?", [key])
        return decode(rows[0], "metrics") if rows else None

    def list_versions(self) -> list[dict[str, Any]]:
        """All versions in numeric order (v2 before v10), metrics decoded."""
        rows = self._query(f"SELECT * FROM adapter_versions ORDER BY {NUMERIC_ORDER}")
        return [decode(row, "metrics") for row in rows]

    def next_version_name(self) -> str:
        """'v0' for an empty registry, else one more than the highest number."""
        rows = self._query(f"SELECT MAX({NUMERIC_ORDER}) AS n FROM adapter_versions")
        highest = rows[0]["n"]
        return "v0" if highest is None else f"v{int(highest) + 1}"
