"""FeedbackStore: the one door to the SQLite file, composed of one part per topic.

Each part is a class over the shared plumbing of :mod:`.db` (connections, transactions):
chats and answers (:mod:`.chats`), votes (:mod:`.votes`), training data
(:mod:`.training_data`), the adapter registry (:mod:`.registry`), training runs
(:mod:`.runs`) and "delete my data" (:mod:`.privacy`). Callers see one object.
"""

from __future__ import annotations

from .chats import Chats
from .privacy import Privacy
from .registry import Registry
from .runs import Runs
from .training_data import TrainingData
from .votes import VoteResult, Votes


class FeedbackStore(Chats, Votes, TrainingData, Registry, Runs, Privacy):
    """Every read and write of feedback, adapters and runs; safe to share between threads."""


__all__ = ["FeedbackStore", "VoteResult"]
