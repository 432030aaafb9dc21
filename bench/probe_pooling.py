"""Would the reward probe read votes better from other poolings of the same hidden states?

The library's probe reads the mean over an answer's tokens of the base's hidden state at one
layer (``RewardModel.features``). A trait carried by one word (a keyword, an exclamation)
is diluted by that mean; the maximum over tokens, or the last token's state, keeps it. This
study samples base answers once (as ``bench/headroom.py`` does), reads every pooling of each
answer once, and then, per rater and vote simulation, fits the library's probe
(``train_reward_model``, unchanged) on each pooling and its concatenations, and measures on
the held-out prompts:

* ``pair_acc``: how often the probe orders two answers to one prompt as the rater does (all
  pairs the rater does not tie);
* ``rm_bo<n>``: the win-rate against all base answers of the probe's pick of ``n``;
* ``agree_cv``: the probe's own cross-validated agreement (what the trust gate reads);

and per rater the headroom any probe works within: the rater's own pick of ``n``
(``oracle_bo<n>``) and the share of answers it scores above 0.

    python bench/probe_pooling.py --raters keyword,enthusiasm,brevity --vote-seeds 6 \\
        --models-from /tmp/decode-data --json bench/results/probe-pooling.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.headroom import base_answers, best_of, simulate_votes  # noqa: E402
from bench.learning_votes import load_prompts, messages, split_heldout  # noqa: E402
from bench.raters import load_rater  # noqa: E402
from rlhf_demo.config import DEFAULT_MODEL, PPOConfig, RewardConfig, load_settings  # noqa: E402
from rlhf_demo.modeling import load_model  # noqa: E402
from rlhf_demo.modeling.adapters import use_base  # noqa: E402
from rlhf_demo.modeling.heads import hidden_size  # noqa: E402
from rlhf_demo.reward import trainer as reward_trainer  # noqa: E402
from rlhf_demo.reward.model import RewardModel, default_layer, hidden_state_at  # noqa: E402

POOLINGS = {"mean": ("mean",), "mean+max": ("mean", "max"), "max": ("max",), "mean+last": ("mean", "last")}
"""Each arm's feature vector: the concatenation of these poolings (``mean`` is the library's)."""


def answer_key(prompt: list[dict[str, str]], text: str, finished: bool) -> str:
    return json.dumps([prompt[-1]["content"], text, bool(finished)])


@torch.no_grad()
def read_poolings(model: Any, tokenizer: Any, items: Sequence[tuple[list[dict[str, str]], str, bool]]) -> dict[str, dict]:
    """Per answer: mean, max over its tokens and the last token's state at the probe's layer,
    read one answer at a time (no padding to reason about), every adapter off."""
    layer = default_layer(model)
    reader = RewardModel(model, tokenizer, layer, torch.zeros(hidden_size(model)))
    out = {}
    model.eval()
    with use_base(model):
        for prompt, text, finished in items:
            ((ids, start),) = reader.encode([prompt], [text], [finished])
            hidden = hidden_state_at(
                model, layer, input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
            )
            states = hidden[0, start:].float()
            out[answer_key(prompt, text, finished)] = {"mean": states.mean(0), "max": states.max(0).values, "last": states[-1]}
    return out


def mean_of(rows: Sequence[dict[str, float | None]], key: str) -> float:
    """Mean of a figure over vote seeds (a seed without it, e.g. no cross-validation, is left out)."""
    return statistics.fmean(float(v) for r in rows if (v := r[key]) is not None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raters", default="keyword,enthusiasm,brevity", help="names in bench/raters.py")
    p.add_argument("--vote-seeds", type=int, default=6, help="vote simulations per rater (the answers are sampled once)")
    p.add_argument("--votes", type=int, default=200)
    p.add_argument("--train-answers", type=int, default=6, help="base answers per training prompt")
    p.add_argument("--held-answers", type=int, default=8, help="base answers per held-out prompt (the largest n)")
    p.add_argument("--heldout", type=int, default=36)
    p.add_argument("--models-from", default="data", help="data dir holding the converted model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model(load_settings(model=DEFAULT_MODEL, data_dir=args.models_from, quantization="fp32"))
    model, tokenizer = loaded.model, loaded.tokenizer
    train, held = split_heldout(load_prompts(), args.heldout)
    started = time.monotonic()
    unrated = lambda prompt, text: 0.0  # noqa: E731 - scores are filled in per rater below
    answers = {
        "train": base_answers(loaded, train, args.train_answers, PPOConfig(), unrated),
        "held": base_answers(loaded, held, args.held_answers, PPOConfig(), unrated),
    }
    items = [(messages(q), a["text"], a["finished"]) for part in answers.values() for q, xs in part.items() for a in xs]
    features = read_poolings(model, tokenizer, items)
    print(f"{len(items)} answers sampled and read in {time.monotonic() - started:.0f} s", flush=True)

    arm = {"pooling": "mean"}

    def pooled(
        self: Any, prompts: Sequence, completions: Sequence[str], finished: Sequence[bool] | None = None, batch_size: int = 16
    ) -> torch.Tensor:
        finished = [True] * len(completions) if finished is None else finished
        rows = [features[answer_key(q, c, f)] for q, c, f in zip(prompts, completions, finished, strict=True)]
        return torch.stack([torch.cat([row[part] for part in POOLINGS[arm["pooling"]]]) for row in rows])

    def width(model: Any) -> int:
        return hidden_size(model) * len(POOLINGS[arm["pooling"]])

    results: dict[str, dict[str, list[dict[str, float | None]]]] = {}
    headroom: dict[str, dict[str, float]] = {}
    with mock.patch.object(RewardModel, "features", pooled), mock.patch.object(reward_trainer, "hidden_size", width):
        for name in args.raters.split(","):
            rater = load_rater(f"bench.raters:{name}")
            for part in answers.values():
                for q, xs in part.items():
                    for a in xs:
                        a["score"] = float(rater(q, a["text"]))
            oracle = random.Random(0)
            headroom[name] = {
                "share_scoring_above_0": statistics.fmean(a["score"] > 0 for xs in answers["held"].values() for a in xs),
                **{
                    f"oracle_bo{n}": statistics.fmean(best_of(xs, n, "score", oracle, 16) for xs in answers["held"].values())
                    for n in (2, 4, 8)
                },
            }
            print(f"{name:<11} the rater's own pick: {headroom[name]}", flush=True)
            for seed in range(args.vote_seeds):
                pairs, thumbs = simulate_votes(answers["train"], args.votes, random.Random(seed))
                for pooling in POOLINGS:
                    arm["pooling"] = pooling
                    rm, metrics = reward_trainer.train_reward_model(model, tokenizer, pairs, thumbs, RewardConfig())
                    ordered = []
                    for q, xs in answers["held"].items():
                        rewards = rm.score_features(
                            pooled(None, [messages(q)] * len(xs), [a["text"] for a in xs], [a["finished"] for a in xs])
                        )
                        for a, r in zip(xs, rewards.tolist(), strict=True):
                            a["reward"] = r
                        ordered += [
                            float((a["reward"] - b["reward"]) * (a["score"] - b["score"]) > 0)
                            for a, b in itertools.combinations(xs, 2)
                            if a["score"] != b["score"]
                        ]
                    rng = random.Random(100 + seed)
                    row = {
                        "agree_cv": metrics.agreement,
                        "pair_acc": statistics.fmean(ordered),
                        "pairs_judged": len(ordered),
                        "decisive_votes": len(pairs),
                    }
                    for n in (2, 4, 8):
                        row[f"rm_bo{n}"] = statistics.fmean(best_of(xs, n, "reward", rng, 16) for xs in answers["held"].values())
                    results.setdefault(name, {}).setdefault(pooling, []).append(row)
            for pooling, rows in results[name].items():
                mean = {k: round(mean_of(rows, k), 3) for k in rows[0]}
                print(f"{name:<11} {pooling:<10} {mean}", flush=True)
    if args.json:
        summary = {
            name: {pooling: {k: mean_of(rows, k) for k in rows[0]} for pooling, rows in arms.items()}
            for name, arms in results.items()
        }
        args.json.write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "vote_seeds": args.vote_seeds,
                    "mean": summary,
                    "headroom": headroom,
                    "runs": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
