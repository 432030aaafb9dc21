"""How far could the loop go on a rater? Best-of-n of the base, picked by the reward model.

A policy that answers with the best of ``n`` base answers is ``log n - (n - 1) / n`` nats
from the base: what a perfect optimiser of a reward reaches at that KL. This bench samples
``--answers`` base answers per prompt (as PPO samples), casts ``--votes`` votes on the
training prompts' answers by the rule of ``bench/learning.py`` (A/B: the higher score wins;
👍 above the running median), fits the library's reward model on them, and then, on the
held-out prompts, judges against all base answers of the prompt (ties ½):

* the reward model's pick among ``n`` random answers (the headroom of this reward model);
* the rater's own pick (an oracle: the headroom of the base's answers at that KL).

PPO's win-rate at a KL can be read against these (docs/learning.md, stop 15).

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.learning import load_prompts, messages, split_heldout  # noqa: E402
from bench.raters import Rater, load_rater  # noqa: E402
from rlhf_demo.config import DEFAULT_MODEL, TINY_MODEL, PPOConfig, RewardConfig, load_settings  # noqa: E402
from rlhf_demo.modeling import load_model  # noqa: E402
from rlhf_demo.ppo.trainer import sample_and_score  # noqa: E402
from rlhf_demo.reward.trainer import train_reward_model  # noqa: E402

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
            pairs.append({"prompt": msgs, "chosen": chosen["text"], "rejected": rejected["text"], "chosen_finished": chosen["finished"], "rejected_finished": rejected["finished"]})
        votes += 1
        median = statistics.median(seen)
        for answer in rng.sample([a, b], 2):
            if votes >= budget:
                break
            thumbs.append({"prompt": msgs, "completion": answer["text"], "label": 1 if answer["score"] > median else -1, "finished": answer["finished"]})
            votes += 1
    return pairs, thumbs


def best_of(answers: list[Answer], n: int, key: str, rng: random.Random, draws: int) -> float:
    """Win-rate against all of ``answers`` of the best (by ``key``) of ``n`` random ones."""
    wins = []
    for _ in range(draws):
        pick = max(rng.sample(answers, n), key=lambda a: a[key])["score"]
        wins += [1.0 if pick > a["score"] else 0.5 if pick == a["score"] else 0.0 for a in answers]
    return statistics.fmean(wins)


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
    args = p.parse_args()
    if args.quick:
        args.model, args.answers, args.votes, args.seeds, args.heldout = TINY_MODEL, 4, 30, 1, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rater = load_rater(args.rater)
    loaded = load_model(load_settings(model=args.model, data_dir=args.data_dir, quantization="fp32"))
    prompts = load_prompts()[: 12 if args.quick else None]
    train, held = split_heldout(prompts, args.heldout)
    config = dataclasses.replace(PPOConfig(), max_new_tokens=8) if args.quick else PPOConfig()
    train_answers = base_answers(loaded, train, args.answers, config, rater)
    held_answers = base_answers(loaded, held, args.answers, config, rater)
    sizes = sorted({n for n in (2, 4, args.answers) if n <= args.answers})
    rows = []
    for seed in range(args.seeds):
        rng = random.Random(seed)
        pairs, thumbs = simulate_votes(train_answers, args.votes, rng)
        rm, metrics = train_reward_model(loaded.model, loaded.tokenizer, pairs, thumbs, RewardConfig())
        for prompt, answers in held_answers.items():
            rewards = rm.score([messages(prompt)] * len(answers), [a["text"] for a in answers], finished=[a["finished"] for a in answers])
            for answer, reward in zip(answers, rewards.tolist(), strict=True):
                answer["reward"] = reward
        row = {"seed": seed, "rm_agreement": metrics.agreement}
        for n in sizes:
            row[f"rm_best_of_{n}"] = statistics.fmean(best_of(a, n, "reward", rng, 8) for a in held_answers.values())
            row[f"oracle_best_of_{n}"] = statistics.fmean(best_of(a, n, "score", rng, 8) for a in held_answers.values())
        rows.append(row)
    mean = {key: statistics.fmean(r[key] for r in rows) for key in rows[0] if key != "seed"}
    cells = " | ".join(f"n={n} (KL {math.log(n) - (n - 1) / n:.2f}): RM {mean[f'rm_best_of_{n}']:.2f}, oracle {mean[f'oracle_best_of_{n}']:.2f}" for n in sizes)
    print(f"headroom {args.rater}: {cells}; RM agreement {mean['rm_agreement']:.2f} ({args.seeds} vote seeds)")
    if args.json:
        args.json.write_text(json.dumps({"rater": args.rater, "model": args.model, "answers": args.answers, "votes": args.votes, "mean": mean, "seeds": rows}, indent=1))


if __name__ == "__main__":
    main()
