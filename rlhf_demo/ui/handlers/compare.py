"""The Compare tab's verbs: two blind answers to one prompt, an A/B vote, reasons, a follow-up
both sides answer ("continue both"), a new round."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rlhf_demo.selection import Round, compare_round
from rlhf_demo.serving import Generation
from rlhf_demo.store.validate import OUTCOMES, SIDES
from rlhf_demo.ui.handlers.base import TabHandlers
from rlhf_demo.ui.handlers.chat import REASONS_SAID
from rlhf_demo.ui.handlers.checks import UserError, check_message, check_sampling, check_visitor, two_strings
from rlhf_demo.ui.handlers.continuation import side_histories, stream_both
from rlhf_demo.visitors import Visitor


def vote_label(outcome: str) -> str:
    """A stored outcome as its Compare button reads: "A is better", "Tie", "Both bad"."""
    return f"{outcome} is better" if outcome in SIDES else outcome.replace("_", " ").capitalize()


VOTE_LABELS = {vote_label(outcome): outcome for outcome in OUTCOMES}  # button label -> stored outcome
SOURCES = {"Two samples of the active policy": "two_samples", "Active vs previous version": "two_versions"}
PAIR_SAID = {"created": "Vote recorded", "updated": "Vote changed", "unchanged": "That vote was already recorded"}


@dataclass
class PairState:
    """The Compare tab's current pair; versions are revealed only after the vote. After a
    "continue both", ``earlier`` holds each side's conversation before the current answers
    (for display: the server's record is what the model sees)."""

    response_ids: tuple[str, str] | None = None
    versions: tuple[str, str] | None = None
    source: str = "two_samples"
    voted: bool = False
    generating: bool = False  # answers are still streaming: no vote yet
    stop_requested: bool = False  # the Stop button: both answers end at their next token
    earlier: tuple[list[dict[str, str]], list[dict[str, str]]] = field(default_factory=lambda: ([], []))
    question: str = ""  # the prompt the current answers answer


class CompareHandlers(TabHandlers):
    """Compare: both answers come from one batched call and are recorded before any vote."""

    def compare(self, visitor: Visitor | str, message: Any, source_label: Any, **sampling: Any) -> tuple[str, str, PairState]:
        """Two answers to one prompt from one batched call; which version wrote which stays hidden."""
        *_, (a, b, state) = self.compare_stream(visitor, message, source_label, **sampling)
        return a, b, state

    def compare_stream(
        self, visitor: Visitor | str, message: Any, source_label: Any, **sampling: Any
    ) -> Iterator[tuple[str, str, PairState]]:
        """:meth:`compare`, streamed: ``(a, b, state)`` as both answers grow (``state.generating``
        until both are finished and recorded; no vote before that)."""
        visitor = check_visitor(visitor)
        text = check_message(message, self.limits)
        checked = {k: v for k, v in check_sampling(**sampling).items() if v is not None}
        source = SOURCES.get(source_label, source_label) if isinstance(source_label, str) else None
        if source is None or source not in SOURCES.values():
            raise UserError(f"Unknown comparison source {str(source_label)[:40]!r}.")
        state = PairState(source=source, generating=True, question=text)
        yield "", "", state  # the page holds this pair's state before the first token: Stop finds it
        results: list[Generation] = []
        for item in self.compare_candidates(
            [{"role": "user", "content": text}], self._versions(source), checked, lambda: state.stop_requested
        ):
            if isinstance(item, list):
                results = item
            else:
                yield item[0], item[1], state
        ids = tuple(self.record(visitor, r, None) for r in results)
        state.response_ids, state.versions, state.generating = (ids[0], ids[1]), (results[0].version, results[1].version), False
        yield results[0].text, results[1].text, state

    def continue_stream(
        self, visitor: Visitor | str, message: Any, state: Any, **sampling: Any
    ) -> Iterator[tuple[str, str, PairState]]:
        """A follow-up both sides answer, each in its own conversation (A's history holds A's
        answers, B's holds B's), streamed like :meth:`compare_stream`; the new answers are the
        pair to vote on next, each recorded with the answer it continues as its parent."""
        visitor = check_visitor(visitor)
        text = check_message(message, self.limits)
        checked = {k: v for k, v in check_sampling(**sampling).items() if v is not None}
        if isinstance(state, PairState) and state.generating:
            raise UserError("Wait until both answers are finished.")
        if not isinstance(state, PairState) or not two_strings(state.response_ids):
            raise UserError("Generate a pair first.")
        parents = state.response_ids
        rows = (self.own_response(visitor, parents[0]), self.own_response(visitor, parents[1]))
        histories = side_histories(rows)
        if sum(m["role"] == "user" for m in histories[0]) >= self.limits.max_turns:
            raise UserError(f"This pair reached {self.limits.max_turns} turns; start a new round.")
        asked = {"role": "user", "content": text}
        shown = state.earlier, state.question
        state.earlier, state.question = histories, text  # shown while both answers stream
        state.generating, state.stop_requested = True, False
        results: list[Generation] = []
        server, streamed = self.runtime.server, False
        try:
            for item in stream_both(
                server,
                ([*histories[0], asked], [*histories[1], asked]),
                (rows[0]["adapter_version"], rows[1]["adapter_version"]),
                server.sampling(**checked),
                lambda: state.stop_requested,
            ):
                if isinstance(item, list):
                    results = item
                else:
                    streamed = True
                    yield item[0], item[1], state
            ids = (self.record(visitor, results[0], None, parents[0]), self.record(visitor, results[1], None, parents[1]))
        except BaseException:
            if streamed:  # the page shows answers that were never recorded: nothing there to vote on
                state.response_ids = state.versions = None
            else:  # refused before a token: the pair shown stays the one to vote on
                state.earlier, state.question = shown
            raise
        finally:
            state.generating = False
        state.response_ids, state.versions, state.voted = ids, (results[0].version, results[1].version), False
        yield results[0].text, results[1].text, state

    def _versions(self, source: str) -> tuple[str, str]:
        """Which versions answer: the active one twice, or active and previous in random order
        (blind: a position must not reveal the version)."""
        active = self.runtime.server.active
        if source != "two_versions":
            return active, active
        previous = self.runtime.previous_version()
        if previous is None:
            raise UserError("There is no previous version yet: compare two samples instead.")
        versions = [active, previous]
        random.shuffle(versions)
        return versions[0], versions[1]

    def compare_candidates(
        self, prompt: list[dict[str, str]], versions: tuple[str, str], sampling: dict[str, Any], should_stop: Callable[[], bool]
    ) -> Iterator[Any]:
        """The one call into serving for a pair: partial texts ``(a, b)`` as they grow, then the
        list of both finished :class:`Generation` s (which pair to show is decided here)."""
        server = self.runtime.server
        if versions[0] != versions[1]:
            yield from server.stream_pair(prompt, versions, server.sampling(**sampling), should_stop=should_stop)
            return
        # two samples of the served version: the pair the reward ensemble learns most from
        settings = self.runtime.settings.selection
        rounds = compare_round(
            server, self.runtime.judge, prompt, server.sampling(**sampling), settings, random.Random(), should_stop
        )
        for item in rounds:
            yield item.pair if isinstance(item, Round) else item

    @staticmethod
    def stop_pair(state: Any) -> None:
        """Stop the pair being written: both answers end at their next token, are recorded and can be voted on."""
        if not isinstance(state, PairState) or not state.generating:
            raise UserError("Nothing to stop.")
        state.stop_requested = True

    @staticmethod
    def new_round(state: Any = None) -> PairState:
        """A fresh pair: the previous one stays recorded (and voted, or not)."""
        return PairState()

    def vote_pair(self, visitor: Visitor | str, state: PairState, outcome_label: Any) -> tuple[str, PairState]:
        """Record an A/B vote (voting again on the same pair changes it), then reveal which
        version wrote which answer."""
        visitor = check_visitor(visitor)
        outcome = VOTE_LABELS.get(outcome_label, outcome_label) if isinstance(outcome_label, str) else None
        if outcome is None or outcome not in OUTCOMES:
            raise UserError(f"Unknown outcome {str(outcome_label)[:40]!r}.")
        if isinstance(state, PairState) and state.generating:
            raise UserError("Wait until both answers are finished.")
        if not isinstance(state, PairState) or not two_strings(state.response_ids) or not two_strings(state.versions):
            raise UserError("Generate a pair first.")
        a, b = state.response_ids
        self.own_response(visitor, a)
        self.own_response(visitor, b)  # both: a pair must not mix in another visitor's answer
        self.check_vote_rate(visitor)
        result = self.runtime.store.record_preference(
            visitor_id=visitor.id, response_a_id=a, response_b_id=b, outcome=outcome, source=state.source, ip_key=visitor.ip_key
        )
        state.voted = True
        label = vote_label(outcome)
        return (
            f"{PAIR_SAID[result.change]}: you chose **{label}**. A was written by **{state.versions[0]}**, B by **{state.versions[1]}**.",
            state,
        )

    def pair_reasons(self, visitor: Visitor | str, state: PairState, tags: Any, comment: Any) -> str:
        """Reason tags and a comment for this page's vote on the current pair."""
        visitor = check_visitor(visitor)
        if not isinstance(state, PairState) or not two_strings(state.response_ids) or not state.voted:
            raise UserError("Vote on a pair first; the reasons go with that vote.")
        self.check_vote_rate(visitor)
        a, b = state.response_ids
        result = self.runtime.store.annotate_preference(visitor.id, a, b, tags, comment)
        return REASONS_SAID[result.change]
