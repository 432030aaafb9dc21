"""Feedback store: SQLite schema, all reads and writes of feedback, runs, adapters."""

from .errors import InvalidInputError, StoreBusyError, StoreError, UnknownIdError
from .export import export_preferences, export_unpaired
from .feedback import FeedbackStore
from .registry import SERVABLE_STATUSES
from .schema import LATEST_VERSION, migrate, schema_version

__all__ = [
    "LATEST_VERSION",
    "SERVABLE_STATUSES",
    "FeedbackStore",
    "InvalidInputError",
    "StoreBusyError",
    "StoreError",
    "UnknownIdError",
    "export_preferences",
    "export_unpaired",
    "migrate",
    "schema_version",
]
