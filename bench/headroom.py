"""How far could the loop go on a rater? Best-of-n of the base, picked by the reward model.

A policy that answers with the best of ``n`` base answers is ``log n - (n - 1) / n`` nats
from the base: what a perfect optimiser of a reward reaches at that KL. This bench samples
``--answers`` base answers per prompt (as PPO samples), casts ``--votes`` votes on the
training prompts' answers by the rule of ``bench/learning.py`` (A/B: the higher score wins;
👍 above the running median), fits the library's reward model on them, and then, on the
held-out prompts, judges against all base answers of the prompt (ties ½):

* the reward model's pick among ``n`` random answers (the headroom of this reward model);
* the rater's own pick (an oracle: the headroom of the base's answers at that KL).

PPO's win-rate at a KL can be read against these (docs/learning.md, headroom).

    python bench/headroom.py --rater bench.raters:enthusiasm --seeds 3
    python bench/headroom.py --quick                     # tiny model: plumbing only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.learning_votes import load_prompts, messages, split_heldout  # noqa: E402
from bench.raters import Rater, load_rater  # noqa: E402
from rlhf_demo.config import (  # noqa: E402
    DEFAULT_MODEL,
    QUANTIZATIONS,
    TINY_MODEL,
    PPOConfig,
    RewardConfig,
    SamplingBounds,
    load_settings,
)
from rlhf_demo.modeling import load_model  # noqa: E402
from rlhf_demo.modeling.heads import hidden_size  # noqa: E402
from rlhf_demo.ppo.trainer import sample_and_score  # noqa: E402
from rlhf_demo.reward.model import RewardModel, default_layer  # noqa: E402
from rlhf_demo.reward.trainer import train_reward_model  # noqa: E402
from rlhf_demo.selection import thompson_pair  # noqa: E402

Answer = dict  # {"text", "finished", "score"}


def base_answers(loaded, prompts: list[str], k: int, config: PPOConfig, rater: Rater) -> dict[str, list[Answer]]:
    """``k`` answers of the base per prompt, sampled as PPO samples, with the rater's scores."""
    asked = [messages(p) for p in prompts for _ in range(k)]
    got = sample_and_score(loaded.model, loaded.tokenizer, None, asked, lambda p, c, f: torch.zeros(len(c)), config, 48)
    out: dict[str, list[Answer]] = {}
    for msgs, text, eos in zip(asked, got.texts, got.eos, strict=True):
        prompt = msgs[-1]["content"]
        out.setdefault(prompt, []).append({"text": text, "finished": bool(eos), "score": float(rater(prompt, text))})
    return out


def simulate_votes(answers: dict[str, list[Answer]], budget: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """A/B pairs and thumbs in the store's row format, cast as ``bench/learning.py`` casts them."""
    pairs, thumbs, seen, votes, order = [], [], [], 0, []
    while votes < budget:
        if not order:
            order = list(answers)
            rng.shuffle(order)
        prompt = order.pop()
        a, b = rng.sample(answers[prompt], 2)
        seen += [a["score"], b["score"]]
        msgs = messages(prompt)
        if a["score"] != b["score"]:
            chosen, rejected = (a, b) if a["score"] > b["score"] else (b, a)
            pairs.append(
                {
                    "prompt": msgs,
                    "chosen": chosen["text"],
                    "rejected": rejected["text"],
                    "chosen_finished": chosen["finished"],
                    "rejected_finished": rejected["finished"],
                }
            )
        votes += 1
        median = statistics.median(seen)
        for answer in rng.sample([a, b], 2):
            if votes >= budget:
                break
            thumbs.append(
                {
                    "prompt": msgs,
                    "completion": answer["text"],
                    "label": 1 if answer["score"] > median else -1,
                    "finished": answer["finished"],
                }
            )
            votes += 1
    return pairs, thumbs


def best_of(answers: list[Answer], n: int, key: str, rng: random.Random, draws: int) -> float:
    """Win-rate against all of ``answers`` of the best (by ``key``) of ``n`` random ones."""
    wins = []
    for _ in range(draws):
        pick = max(rng.sample(answers, n), key=lambda a: a[key])["score"]
        wins += [1.0 if pick > a["score"] else 0.5 if pick == a["score"] else 0.0 for a in answers]
    return statistics.fmean(wins)


def most_different(features: torch.Tensor, texts: list[str]) -> tuple[int, int]:
    """The two answers whose base features are furthest apart (cosine), distinct texts first:
    a candidate rule for rounds before any reward model, measured here (fewer decisive pairs
    than two plain samples), not adopted."""
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    distance = 1.0 - unit @ unit.T
    best, pair = float("-inf"), (0, 1)
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            value = float(distance[i, j]) + (0.0 if texts[i] != texts[j] else -10.0)
            if value > best:
                best, pair = value, (i, j)
    return pair


def differ(scores: list[float], pair: tuple[int, int]) -> bool:
    """Whether the rater decides the pair (a tie teaches nothing)."""
    return scores[pair[0]] != scores[pair[1]]


def selection_study(
    loaded, train: list[str], config: PPOConfig, raters: list[str], k: int, budget: int, seeds: int, temperatures: list[float]
) -> dict:
    """How often a Compare pair is decisive (the rater does not call it a tie) under each rule,
    on base answers: ``passive`` (two samples), the most different of ``k`` (no reward
    model yet), double Thompson sampling over an ensemble fitted on ``budget`` passive votes
    of the other half of the prompts, and the oracle (a decisive pair exists among ``k``).
    The same answers and seeds serve every rule."""
    voted, shown = train[::2], train[1::2]
    out: dict = {}
    for temperature in temperatures:
        sampled = dataclasses.replace(config, temperature=temperature, top_p=0.9)  # the serving top-p
        answers: dict[str, dict] = {}
        texts = base_answers(loaded, shown, k, sampled, lambda p, r: 0.0)
        vote_answers = base_answers(loaded, voted, 2, dataclasses.replace(config, top_p=0.9), lambda p, r: 0.0)
        reader = RewardModel(loaded.model, loaded.tokenizer, default_layer(loaded.model), torch.zeros(hidden_size(loaded.model)))
        features = {
            p: reader.features([messages(p)] * k, [a["text"] for a in texts[p]], [a["finished"] for a in texts[p]]) for p in shown
        }
        for name in raters:
            rater = load_rater(name)
            answers[name] = {p: [{**a, "score": float(rater(p, a["text"]))} for a in texts[p]] for p in shown}
            votes = {p: [{**a, "score": float(rater(p, a["text"]))} for a in vote_answers[p]] for p in voted}
            rows = []
            for seed in range(seeds):
                rng = random.Random(seed)
                pairs, thumbs = simulate_votes(votes, budget, rng)
                rm, metrics = train_reward_model(loaded.model, loaded.tokenizer, pairs, thumbs, RewardConfig())
                counts = {"passive": 0, "most_different": 0, "dts": 0, "oracle": 0}
                for p in shown:
                    scores, texts_p = [a["score"] for a in answers[name][p]], [a["text"] for a in answers[name][p]]
                    counts["passive"] += differ(scores, (0, 1))
                    counts["most_different"] += differ(scores, most_different(features[p], texts_p))
                    counts["dts"] += differ(scores, thompson_pair(rm.member_scores(features[p]), texts_p, rng))
                    counts["oracle"] += any(differ(scores, (i, j)) for i in range(k) for j in range(i + 1, k))
                rows.append(
                    {
                        "seed": seed,
                        "rm_agreement": metrics.agreement,
                        "rm_lower_bound": metrics.agreement_lower_bound,
                        **{r: c / len(shown) for r, c in counts.items()},
                    }
                )
            mean = {
                key: statistics.fmean([r[key] for r in rows if r[key] is not None] or [float("nan")])
                for key in rows[0]
                if key != "seed"
            }
            out[f"{name} T={temperature}"] = {"mean": mean, "seeds": rows, "prompts": len(shown)}
            print(
                f"decisive pairs, {name}, T={temperature}, k={k}, RM on {budget} votes: "
                + ", ".join(f"{r} {mean[r]:.2f}" for r in ("passive", "most_different", "dts", "oracle"))
                + f" (RM agreement {mean['rm_agreement']:.2f})"
            )
    return out


def latency(loaded, prompts: list[str], sizes: list[int], max_new_tokens: int) -> dict[str, dict[int, float]]:
    """Median seconds, per ``n``, of ``n`` answers to one prompt in one batched serving call
    (what a best-of-n chat answer and a Compare round of ``n`` candidates wait for), and of
    reading them with the base for the reward model (``Judge.read``, no model saved: the
    features alone cost the same). n = 2 is today's Compare round."""
    import tempfile

    from rlhf_demo.selection import Judge
    from rlhf_demo.serving import PolicyServer

    server = PolicyServer(loaded, SamplingBounds())
    judge = Judge(server, Path(tempfile.mkdtemp()))
    try:
        sampling = server.sampling(max_new_tokens=max_new_tokens)
        # one untimed round first: a GPU's first kernels and allocations are not the answer's cost
        *_, done = server.stream_samples(messages(prompts[0]), max(sizes), None, server.sampling(max_new_tokens=8))
        judge.read(done)
        out: dict[str, dict[int, float]] = {"sample_s": {}, "read_s": {}}
        for n in sizes:
            sample_s, read_s = [], []
            for prompt in prompts:
                started = time.perf_counter()
                *_, done = server.stream_samples(messages(prompt), n, None, sampling)
                sample_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                judge.read(done)
                read_s.append(time.perf_counter() - started)
            out["sample_s"][n], out["read_s"][n] = statistics.median(sample_s), statistics.median(read_s)
            print(
                f"n={n}: sampling median {out['sample_s'][n]:.2f} s ({out['sample_s'][n] / out['sample_s'][sizes[0]]:.2f}x n={sizes[0]}), "
                f"reading {out['read_s'][n]:.2f} s, {max_new_tokens} new tokens, {len(prompts)} prompts"
            )
        return out
    finally:
        server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rater", default="bench.raters:brevity")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data-dir", default="data", help="data dir holding the converted model")
    p.add_argument("--answers", type=int, default=6, help="base answers per prompt (the largest n)")
    p.add_argument("--votes", type=int, default=200)
    p.add_argument("--seeds", type=int, default=3, help="vote simulations (the answers are sampled once)")
    p.add_argument("--heldout", type=int, default=36)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="tiny model, 12 prompts, 4 answers: plumbing only")
    p.add_argument(
        "--pairs", help="comma-separated raters: measure Compare's decisive pairs per selection rule instead (docs/learning.md)"
    )
    p.add_argument("--temperatures", default="0.7", help="candidate temperatures for --pairs")
    p.add_argument("--latency", help="comma-separated n: time n answers to one prompt in the server instead (best-of-n, Compare)")
    p.add_argument("--latency-prompts", type=int, default=8)
    p.add_argument(
        "--latency-tokens", type=int, default=SamplingBounds().max_new_tokens, help="new tokens per answer (default: chat's)"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=QUANTIZATIONS,
        help="weights the answers are sampled with (auto: what the app serves on this device; NF4 + bfloat16 on a GPU)",
    )
    args = p.parse_args()
    if args.quick:
        args.model, args.answers, args.votes, args.seeds, args.heldout = TINY_MODEL, 4, 30, 1, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rater = load_rater(args.rater)
    loaded = load_model(load_settings(model=args.model, data_dir=args.data_dir, quantization=args.precision))
    prompts = load_prompts()[: 12 if args.quick else None]
    train, held = split_heldout(prompts, args.heldout)
    config = dataclasses.replace(PPOConfig(), max_new_tokens=8) if args.quick else PPOConfig()
    if args.latency:
        sizes = [int(n) for n in args.latency.split(",")]
        figures = latency(loaded, held[: args.latency_prompts], sizes, 8 if args.quick else args.latency_tokens)
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "model": args.model,
                        "precision": loaded.describe(),
                        "threads": args.threads,
                        "tokens": args.latency_tokens,
                        **figures,
                    },
                    indent=1,
                )
            )
        return
    if args.pairs:
        temperatures = [float(t) for t in args.temperatures.split(",")]
        study = selection_study(loaded, train, config, args.pairs.split(","), args.answers, args.votes, args.seeds, temperatures)
        if args.json:
            args.json.write_text(
                json.dumps({"model": args.model, "k": args.answers, "votes": args.votes, "study": study}, indent=1)
            )
        return
    train_answers = base_answers(loaded, train, args.answers, config, rater)
    held_answers = base_answers(loaded, held, args.answers, config, rater)
    sizes = sorted({n for n in (2, 4, args.answers) if n <= args.answers})
    rows = []
    for seed in range(args.seeds):
        rng = random.Random(seed)
        pairs, thumbs = simulate_votes(train_answers, args.votes, rng)
        rm, metrics = train_reward_model(loaded.model, loaded.tokenizer, pairs, thumbs, RewardConfig())
        for prompt, answers in held_answers.items():
            rewards = rm.score(
                [messages(prompt)] * len(answers), [a["text"] for a in answers], finished=[a["finished"] for a in answers]
            )
            for answer, reward in zip(answers, rewards.tolist(), strict=True):
                answer["reward"] = reward
        row = {"seed": seed, "rm_agreement": metrics.agreement}
        for n in sizes:
            row[f"rm_best_of_{n}"] = statistics.fmean(best_of(a, n, "reward", rng, 8) for a in held_answers.values())
            row[f"oracle_best_of_{n}"] = statistics.fmean(best_of(a, n, "score", rng, 8) for a in held_answers.values())
        rows.append(row)
    mean = {key: statistics.fmean(r[key] for r in rows) for key in rows[0] if key != "seed"}
    cells = " | ".join(
        f"n={n} (KL {math.log(n) - (n - 1) / n:.2f}): RM {mean[f'rm_best_of_{n}']:.2f}, oracle {mean[f'oracle_best_of_{n}']:.2f}"
        for n in sizes
    )
    print(f"headroom {args.rater}: {cells}; RM agreement {mean['rm_agreement']:.2f} ({args.seeds} vote seeds)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rater": args.rater,
                    "model": args.model,
                    "answers": args.answers,
                    "votes": args.votes,
                    "mean": mean,
                    "seeds": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
