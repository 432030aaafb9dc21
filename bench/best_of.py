"""Best-of-n chat answers, measured on what a learning run taught: win-rate per n.

``SelectionSettings.best_of`` serves the trusted reward model's favourite of n samples
(``selection.best_answer``). Whether that pays depends on the policy and reward model a
crowd's votes produced, not on the base, so this bench reads a finished
``bench/learning.py`` run (``--run``: its ``--out`` folder): on a copy of its data dir, the
version it serves and its newest reward model, with the run's own rater and held-out prompts.

Per held-out prompt it samples ``--samples`` (m) chat answers of the served version and
``--base-samples`` of the base, through the serving process as a visitor gets them (the
server's sampling); the rater judges each served answer against each base answer (ties 1/2),
and the reward model reads the served answers as ``best_answer`` does (``Judge.read``, the
main probe). For each n the figure is the *exact* expectation over all n-subsets of the m
answers of the reward model's pick (no resampling noise): with the answers sorted by the
model's score, the i-th lowest is the pick of C(i-1, n-1) / C(m, n) of them. Beside it the
rater's own pick (an oracle: what a perfect reward model would reach with n samples).
n = 1 is today's plain answer; the gain per n is paired by prompt (its SE over prompts).

    python bench/best_of.py --run /work/runs/keyword/seed-1 --json bench/out/best-of-keyword-1.json
    python bench/best_of.py --quick          # tiny model: plumbing only
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.learning_cli import command_arguments, make_settings, parse_args  # noqa: E402
from bench.learning_eval import expected_win, verdict, win_rate  # noqa: E402
from bench.learning_votes import load_prompts, messages, split_heldout  # noqa: E402
from bench.raters import load_rater  # noqa: E402
from rlhf_demo.config import load_settings  # noqa: E402
from rlhf_demo.modeling import load_model  # noqa: E402
from rlhf_demo.runtime import Runtime  # noqa: E402
from rlhf_demo.serving import BASE_VERSION  # noqa: E402

log = logging.getLogger("bench.best_of")


def curve(per_prompt: list[dict[str, list[float]]], ns: list[int]) -> dict[str, Any]:
    """Win-rate per n (mean over prompts ± SE) for the reward model's pick and the rater's,
    and the gain over n = 1 paired by prompt."""
    out: dict[str, Any] = {}
    for key, order in (("reward_model", "rm"), ("oracle", "rater")):
        rows = {}
        plain = [expected_win(p["wins"], p[order], 1) for p in per_prompt]
        for n in ns:
            got = [expected_win(p["wins"], p[order], n) for p in per_prompt]
            rate, se = win_rate(got, 1)
            gain, gain_se = win_rate([g - b for g, b in zip(got, plain, strict=True)], 1)
            rows[str(n)] = {"win_rate": rate, "win_rate_se": se, "gain": gain, "gain_se": gain_se}
        out[key] = rows
    return out


def measure(run_dir: Path, models_from: str | None, samples: int, base_samples: int, ns: list[int]) -> dict[str, Any]:
    """Sample, read and judge on a copy of the run's data dir (the run itself is not touched)."""
    recorded = json.loads((run_dir / "learning.json").read_text())
    argv = command_arguments(recorded["command"])
    if argv is None:
        raise SystemExit(f"{run_dir}/learning.json: not a bench/learning.py run ({recorded['command']!r})")
    if models_from:
        argv += ["--models-from", models_from]
    args = parse_args(argv)
    rater = load_rater(args.rater)
    _, heldout = split_heldout(load_prompts(Path(args.prompts)), args.heldout)
    with tempfile.TemporaryDirectory(prefix="best-of-") as tmp:
        data_dir = Path(tmp) / "data"
        shutil.copytree(run_dir / "data", data_dir)
        model_settings = load_settings(model=args.model, data_dir=args.models_from, quantization=args.quantization)
        runtime = Runtime(make_settings(args, data_dir), load_model(model_settings))
        try:
            server, judge = runtime.server, runtime.judge
            sampling = server.sampling(max_new_tokens=runtime.settings.training.ppo.max_new_tokens)
            started = time.perf_counter()
            base = server.generate_many([messages(p) for p in heldout for _ in range(base_samples)], BASE_VERSION, sampling)
            served = server.generate_many([messages(p) for p in heldout for _ in range(samples)], None, sampling)
            sampling_s = time.perf_counter() - started
            per_prompt = []
            for k, prompt in enumerate(heldout):
                answers = served[k * samples : (k + 1) * samples]
                base_scores = [float(rater(prompt, g.text)) for g in base[k * base_samples : (k + 1) * base_samples]]
                scores = [float(rater(prompt, g.text)) for g in answers]
                wins = [statistics.fmean(verdict(s, b) for b in base_scores) for s in scores]
                per_prompt.append({"wins": wins, "rater": scores, "rm": judge.read(answers).scores.tolist()})
            reading_s = time.perf_counter() - started - sampling_s
            trusted, version = judge.trusted, server.active
            source = judge.newest()
        finally:
            runtime.close()
    result = {
        "run": str(run_dir),
        "rater": args.rater,
        "seed": args.seed,
        "version": version,
        "reward_run": source.name if source else None,
        "trusted": trusted,
        "prompts": len(heldout),
        "samples": samples,
        "base_samples": base_samples,
        "sampling_s": sampling_s,
        "reading_s": reading_s,
        **curve(per_prompt, ns),
    }
    # What a visitor is served: best_answer uses the reward model only while it is trusted.
    result["served"] = result["reward_model"] if trusted else {str(n): result["reward_model"]["1"] for n in ns}
    return result


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rater and n: the mean over runs (seeds) of the win-rate and of the gain over n = 1,
    with the SE across runs, for the reward model's pick, what is served, and the oracle."""
    raters: dict[str, Any] = {}
    for rater in sorted({r["rater"] for r in results}):
        runs = sorted((r for r in results if r["rater"] == rater), key=lambda r: r["seed"])
        figures: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "trusted": [r["trusted"] for r in runs]}
        for key in ("reward_model", "served", "oracle"):
            figures[key] = {}
            for n in runs[0][key]:
                rate, rate_se = win_rate([r[key][n]["win_rate"] for r in runs], 1)
                gain, gain_se = win_rate([r[key][n]["gain"] for r in runs], 1)
                figures[key][n] = {"win_rate": rate, "win_rate_se": rate_se, "gain": gain, "gain_se": gain_se}
        raters[rater] = figures
    return {
        "runs": [{k: r[k] for k in ("run", "rater", "seed", "version", "reward_run", "trusted")} for r in results],
        "raters": raters,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--run", help="a finished bench/learning.py run: its --out folder (learning.json, data/)")
    p.add_argument("--models-from", help="data dir holding the converted model (default: the run's own setting)")
    p.add_argument("--samples", type=int, default=12, help="served answers per held-out prompt (m)")
    p.add_argument("--base-samples", type=int, default=6, help="base answers per held-out prompt")
    p.add_argument("--n", default="1,2,4,8", help="comma-separated n to report (each at most --samples)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--quick", action="store_true", help="tiny model: a learning --quick run, then this on it")
    p.add_argument("--summarize", nargs="+", help="instead: mean ± SE across these result JSONs, per rater and n, to --json")
    args = p.parse_args(argv)
    if args.summarize:
        summary = summarize([json.loads(Path(f).read_text()) for f in args.summarize])
        for rater, fig in summary["raters"].items():
            print(rater, {n: f"{v['win_rate']:.3f} ± {v['win_rate_se']:.3f}" for n, v in fig["served"].items()})
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    ns = [int(x) for x in args.n.split(",")]
    if args.quick:
        quick_dir = Path(tempfile.mkdtemp(prefix="best-of-quick-"))
        learning = [sys.executable, str(Path(__file__).with_name("learning.py")), "--quick", "--out", str(quick_dir)]
        subprocess.run([*learning, "--threads", str(args.threads), "--models-from", str(quick_dir)], check=True)
        args.run, args.samples, args.base_samples, ns = str(quick_dir), 4, 2, [1, 2, 4]
    if not args.run:
        p.error("--run (or --quick) is required")
    result = measure(Path(args.run), args.models_from, args.samples, args.base_samples, ns)
    for n in ns:
        rm, oracle = result["reward_model"][str(n)], result["oracle"][str(n)]
        print(
            f"n={n}: reward model's pick {rm['win_rate']:.3f} ± {rm['win_rate_se']:.3f} "
            f"(gain {rm['gain']:+.3f} ± {rm['gain_se']:.3f}); rater's pick {oracle['win_rate']:.3f}"
        )
    print(f"{result['version']}, {result['reward_run']} (trusted: {result['trusted']}), sampling {result['sampling_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
