"""The learning benchmark's inputs and its simulated rater: prompts (training and held out)
and the votes the rater casts through the app's own Compare path."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.raters import Rater
from rlhf_demo.runtime import Runtime
from rlhf_demo.selection import Round, compare_round
from rlhf_demo.serving import Generation
from rlhf_demo.store import FeedbackStore

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
VISITORS = 16  # the rater stands for a crowd: votes rotate over this many visitor ids


def load_prompts(folder: Path = PROMPTS_DIR) -> list[str]:
    """Every ``*.txt`` (one prompt a line, ``#`` comments) and ``*.json`` (a list of strings)
    in the folder, de-duplicated, in file order."""
    prompts: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.suffix == ".txt":
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        elif path.suffix == ".json":
            prompts += [str(p).strip() for p in json.loads(path.read_text())]
    return list(dict.fromkeys(p for p in prompts if p))


def split_heldout(prompts: list[str], count: int) -> tuple[list[str], list[str]]:
    """``(train, held_out)``: the ``count`` prompts with the smallest sha256 are held out.

    Depends on the text alone (not on the seed), so every run is judged on the same
    prompts, and adding prompts moves few of them."""
    ranked = sorted(prompts, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    held = set(ranked[:count])
    return [p for p in prompts if p not in held], [p for p in prompts if p in held]


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


# ── the simulated rater votes through the serving path ──────────────────────────────


def prompt_stream(prompts: list[str], rng: random.Random) -> Iterator[str]:
    """Training prompts in shuffled rounds: every prompt once before any repeats."""
    while True:
        order = list(prompts)
        rng.shuffle(order)
        yield from order


def log_answer(store: FeedbackStore, visitor: str, g: Generation) -> str:
    """Record an answer as the app records what it served; returns its response id."""
    return store.log_response(
        visitor_id=visitor,
        prompt=g.prompt,
        text=g.text,
        adapter_version=g.version,
        sampling=dataclasses.asdict(g.sampling),
        prompt_tokens=g.prompt_tokens,
        completion_tokens=g.completion_tokens,
        latency_s=g.latency_s,
        finish_reason=g.finish_reason,
    )


def cast_votes(
    runtime: Runtime,
    rater: Rater,
    prompts: Iterator[str],
    budget: int,
    seen_scores: list[float],
    thumbs_per_pair: int,
    max_new_tokens: int,
    rng: random.Random,
) -> dict[str, Any]:
    """Spend ``budget`` votes on answers of the served version; returns what was cast.

    Each prompt gets a Compare round of the active version, chosen as the app chooses it
    (``selection.compare_round``: the library's selection settings), both answers logged;
    one A/B vote on the pair, then up to ``thumbs_per_pair`` thumbs on its answers (👍 when
    the score is above the running median of all scores so far).
    """
    server, store = runtime.server, runtime.store
    cast: dict[str, Any] = {
        "ab": 0,
        "ties": 0,
        "thumbs_up": 0,
        "thumbs_down": 0,
        "pairs": 0,
        "answer_tokens": [],
        "scores": [],
        "rules": {},
    }
    started = time.perf_counter()

    def votes() -> int:
        return cast["ab"] + cast["ties"] + cast["thumbs_up"] + cast["thumbs_down"]

    while votes() < budget:
        prompt = next(prompts)
        visitor = f"bench-rater-{cast['pairs'] % VISITORS}"  # under the per-visitor vote cap
        *_, round_ = compare_round(
            server,
            runtime.judge,
            messages(prompt),
            server.sampling(max_new_tokens=max_new_tokens),
            runtime.settings.selection,
            rng,
        )
        assert isinstance(round_, Round)
        pair = round_.pair
        cast["rules"][round_.rule] = cast["rules"].get(round_.rule, 0) + 1
        ids = [log_answer(store, visitor, g) for g in pair]
        scores = [float(rater(prompt, g.text)) for g in pair]
        seen_scores.extend(scores)
        cast["pairs"] += 1
        cast["answer_tokens"] += [g.completion_tokens for g in pair]
        cast["scores"] += scores
        outcome = "A" if scores[0] > scores[1] else "B" if scores[1] > scores[0] else "tie"
        store.prefer(visitor_id=visitor, response_a_id=ids[0], response_b_id=ids[1], outcome=outcome, source="two_samples")
        cast["ab" if outcome != "tie" else "ties"] += 1  # a tie is a vote too, but teaches the RM nothing
        median = statistics.median(seen_scores)
        order = [0, 1] if rng.random() < 0.5 else [1, 0]
        for i in order[:thumbs_per_pair]:
            if votes() >= budget:
                break
            up = scores[i] > median
            store.rate(visitor, ids[i], 1 if up else -1)
            cast["thumbs_up" if up else "thumbs_down"] += 1
    cast["votes"] = votes()
    cast["decisive_fraction"] = cast["ab"] / max(1, cast["ab"] + cast["ties"])
    cast["seconds"] = time.perf_counter() - started
    cast["mean_answer_tokens"] = statistics.fmean(cast.pop("answer_tokens"))
    cast["mean_score"] = statistics.fmean(cast.pop("scores"))
    return cast
