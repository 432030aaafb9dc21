"""Which answers a visitor sees: the pair a Compare round shows, and best-of-n chat answers.

Why: a Compare vote teaches the reward model only when it is decisive, and two plain samples
of one policy mostly share the trait a voter looks for (keyword: 9 % of random pairs are
decisive; a decisive pair exists among 4 samples 20 % of the time, docs/learning.md). A round
therefore samples ``candidates`` answers in one batched call and shows the pair chosen by
double Thompson sampling over the reward ensemble (Dwaracherla et al., 2024): two ensemble
members, drawn at random, each pick their best answer, so the pair is one the votes have not
yet settled. Before the first ensemble exists, a round is two plain samples, as ``passive``
(which stays a setting): showing the two answers the base reads as most different was
measured and made fewer pairs decisive than two plain samples (docs/learning.md, pair selection).

Best-of-n: a chat answer can be the trusted reward model's pick of ``best_of`` samples.

The app (rlhf_demo/ui) and ``bench/learning.py`` both call :func:`compare_round` and
:func:`best_answer`: there is no bench-only path.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_demo.config import RewardConfig, SelectionSettings
from rlhf_demo.modeling.adapters import AdapterError
from rlhf_demo.modeling.heads import hidden_size
from rlhf_demo.reward.model import RewardModel, default_layer
from rlhf_demo.serving.sampling import Generation, Sampling

log = logging.getLogger(__name__)
THOMPSON_TRIES = 8  # second draws before the pair falls back to the most uncertain partner


# ── the rules (pure: features and scores in, indices out) ────────────────────────────


def thompson_pair(members: torch.Tensor, texts: Sequence[str], rng: random.Random) -> tuple[int, int]:
    """Double Thompson sampling over ``members`` (M, k) scores: a random member picks its
    best answer, further random members pick theirs until one differs (in text too). When
    every draw agrees, the partner is the answer whose gap to the first the members are
    least sure of (largest spread of the score difference)."""
    first = int(members[rng.randrange(len(members))].argmax())
    for _ in range(THOMPSON_TRIES):
        second = int(members[rng.randrange(len(members))].argmax())
        if second != first and texts[second] != texts[first]:
            return first, second
    gaps = members[:, first : first + 1] - members
    spread = gaps.std(0, correction=0) if len(members) > 1 else gaps.abs()[0]
    order = [int(j) for j in spread.argsort(descending=True) if int(j) != first]
    second = next((j for j in order if texts[j] != texts[first]), order[0])
    return first, second


def choose_pair(reading: Reading, texts: Sequence[str], rng: random.Random) -> tuple[int, int]:
    """The pair of candidates to show, by double Thompson sampling over the ensemble (trusted
    or not: an untrusted ensemble is the most uncertain, which is when exploring pays), in
    random order: position must not tell which answer the first draw preferred."""
    pair = thompson_pair(reading.members, texts, rng)
    return pair if rng.random() < 0.5 else (pair[1], pair[0])


# ── reading answers in the serving process ───────────────────────────────────────────


@dataclass
class Reading:
    """What the reward model says about ``k`` answers to one prompt."""

    features: torch.Tensor  # (k, H) the base's answer features
    scores: torch.Tensor  # (k,) the main probe's raw scores (zeros without a model)
    members: torch.Tensor  # (M, k) each ensemble member's raw scores
    trusted: bool  # the worker's trust gate passed this model


@dataclass
class LocalBase:
    """The base model a process holds only to read answers (its engine generates elsewhere,
    e.g. on a vLLM server): the ``model``, ``tokenizer`` and ``lock`` a :class:`Judge` reads."""

    model: Any
    tokenizer: Any
    lock: Any = field(default_factory=threading.Lock)


class Judge:
    """Reads answers with the serving process's own base (every adapter off, under the decode
    lock, so no visitor's step runs meanwhile) and scores them with the newest reward model
    the worker saved (``<data>/reward/run-<id>``, written whole or not at all). ``server`` is
    anything with ``model``, ``tokenizer`` and ``lock``: the embedded engine, or a LocalBase."""

    def __init__(self, server: Any, folder: Path, config: RewardConfig | None = None) -> None:
        self.server, self.folder = server, Path(folder)
        self.config = config or RewardConfig()
        self._model: RewardModel | None = None
        self._source: Path | None = None

    def newest(self) -> Path | None:
        """The newest complete reward-model folder, None before the first cycle."""
        runs = [p for p in self.folder.glob("run-*") if p.name[4:].isdigit()] if self.folder.is_dir() else []
        return max(runs, key=lambda p: int(p.name[4:]), default=None)

    def model(self) -> RewardModel:
        """The newest saved reward model, or a bare feature reader (zero weights) before any."""
        newest = self.newest()
        if newest is not None and newest != self._source:
            try:
                self._model = RewardModel.load(self.server.model, self.server.tokenizer, newest, self.config.max_length)
                self._source = newest
            except (AdapterError, OSError, ValueError, KeyError) as exc:  # pruned or half-read: keep the last one
                log.warning("reward model %s not loaded: %s", newest, exc)
        if self._model is None:
            model = self.server.model
            layer = self.config.layer if self.config.layer is not None else default_layer(model)
            self._model = RewardModel(
                model, self.server.tokenizer, layer, torch.zeros(hidden_size(model)), max_length=self.config.max_length
            )
        return self._model

    @property
    def trusted(self) -> bool:
        return self.model().trusted

    def read(self, generations: Sequence[Generation]) -> Reading:
        """Features and scores of answers to one prompt (``generations[0].prompt``)."""
        rm = self.model()
        prompts = [g.prompt for g in generations]
        texts = [g.text for g in generations]
        finished = [g.finish_reason == "stop" for g in generations]
        with self.server.lock:
            rm.model = self.server.model  # a slow-path load may have replaced it
            features = rm.features(prompts, texts, finished, self.config.batch_size)
        return Reading(features, rm.score_features(features), rm.member_scores(features), rm.trusted)


# ── what a visitor gets ──────────────────────────────────────────────────────────────


@dataclass
class Round:
    """A Compare round: the two answers shown, and how they were chosen."""

    pair: list[Generation]
    rule: str  # "passive" (the setting, or no ensemble yet) | "dts"
    candidates: int


@dataclass
class Pick:
    """A chat answer and how many samples it was picked from (1: a plain sample)."""

    generation: Generation
    picked_from: int


def _progress(count: int, texts: Sequence[str], what: str) -> str:
    words = sum(len(t.split()) for t in texts)
    return f"_Writing {count} {what}… ({words} words so far)_"


def compare_round(
    server: Any,
    judge: Judge,
    messages: list[dict[str, str]],
    sampling: Sampling,
    config: SelectionSettings,
    rng: random.Random,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[str, str] | Round]:
    """Yield ``(text_a, text_b)`` while the answers are written (progress lines while
    ``candidates`` are), then the :class:`Round`. ``passive``: two samples of the served
    version in one batched call, streamed, exactly as before selection existed."""
    active = server.active
    if config.rule == "passive" or len(judge.model().members) < 2:  # no ensemble yet: nothing to choose by
        results: list[Generation] = []
        for item in server.stream_pair(messages, (active, active), sampling, should_stop=should_stop):
            if isinstance(item, list):
                results = item
            else:
                yield item[0], item[1]
        yield Round(results, "passive", 2)
        return
    if config.candidate_temperature is not None:
        sampling = dataclasses.replace(sampling, temperature=config.candidate_temperature)
    generations: list[Generation] = []
    for item in server.stream_samples(messages, config.candidates, active, sampling, should_stop):
        if isinstance(item, list):
            generations = item
        else:
            line = _progress(config.candidates, item, "candidate answers to choose a pair from")
            yield line, line
    i, j = choose_pair(judge.read(generations), [g.text for g in generations], rng)
    yield Round([generations[i], generations[j]], "dts", config.candidates)


def best_answer(
    server: Any, judge: Judge, messages: list[dict[str, str]], sampling: Sampling, best_of: int, should_stop: Any = None
) -> Iterator[str | Pick]:
    """Yield the answer so far, then the :class:`Pick`. With ``best_of`` > 1 and a trusted
    reward model, ``best_of`` samples are written in one batched call (a progress line
    meanwhile) and the model's favourite is served; otherwise one streamed sample."""
    if best_of > 1 and judge.trusted:
        generations: list[Generation] = []
        for item in server.stream_samples(messages, best_of, None, sampling, should_stop):
            if isinstance(item, list):
                generations = item
            else:
                yield _progress(best_of, item, "answers; the reward model picks one")
        scores = judge.read(generations).scores
        yield Pick(generations[int(scores.argmax())], best_of)
        return
    for item in server.stream(messages, None, sampling, should_stop=should_stop):
        yield Pick(item, 1) if isinstance(item, Generation) else item


__all__ = ["Judge", "LocalBase", "Pick", "Reading", "Round", "best_answer", "choose_pair", "compare_round", "thompson_pair"]
