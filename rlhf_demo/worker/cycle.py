"""One training cycle: reward model → short PPO → gate → publish or reject.

Everything runs on the worker's single base model: the reward model, the candidate policy
and the active version are adapters on it, the reference is the base with adapters off.
Each phase logs per-step metrics into the run, and reports progress for the dashboard.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_demo.config import GateConfig, Settings
from rlhf_demo.modeling import LoadedModel
from rlhf_demo.modeling.adapters import attach_new_adapter, put_adapter
from rlhf_demo.modeling.heads import HEAD_FILE, ScalarHead, hidden_size
from rlhf_demo.ppo.trainer import PPOTrainer, sample_and_score
from rlhf_demo.reward import holdout_split
from rlhf_demo.reward.data import build_examples, preferred_answers
from rlhf_demo.reward.fairness import training_votes
from rlhf_demo.reward.losses import example_key
from rlhf_demo.reward.model import RewardModel
from rlhf_demo.reward.trainer import RewardMetrics, train_reward_model
from rlhf_demo.store import FeedbackStore
from rlhf_demo.worker.gate import evaluate_gate
from rlhf_demo.worker.publish import keep_rejected, publish

log = logging.getLogger(__name__)
POLICY, ACTIVE, REWARD = "policy", "active", "reward"
Report = Callable[..., None]


def _prompt_key(prompt: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}:{m['content']}" for m in prompt)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The plottable part of a metrics dict (bools as 0/1; lists, text and None dropped)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}


def split_prompts(prompts: list[list[dict[str, str]]], eval_count: int) -> tuple[list, list]:
    """Training vs held-out gate prompts, by a stable hash; never an empty side."""
    held = [p for p in prompts if holdout_split(_prompt_key(p), 0.25)]
    train = [p for p in prompts if not holdout_split(_prompt_key(p), 0.25)]
    if not held or not train:
        cut = max(1, min(eval_count, len(prompts) // 4))
        held, train = prompts[:cut], prompts[cut:] or prompts[:cut]
    return train, held[:eval_count]


Votes = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # (pairs, thumbs) after the per-voter cap


def train_reward(
    settings: Settings,
    store: FeedbackStore,
    loaded: LoadedModel,
    run_id: int,
    report: Report,
    budget_s: float,
    gate: GateConfig,
    votes: Votes,
) -> tuple[RewardModel, RewardMetrics]:
    """Refit the reward model (and its ensemble) on every vote, after the per-voter cap, and
    keep it beside the run with its trust verdict: the serving process reads the newest one
    (rlhf_demo/selection.py) to choose Compare pairs and best-of-n answers; the last two stay
    on disk (and in the Hub snapshot)."""
    reward_dir = settings.data_dir / "reward"
    report(phase="reward", step=0, total=0, started_at=time.time())

    def progress(done: int, total: int, metrics: dict[str, float]) -> None:
        store.log_metrics(run_id, "reward", done, numeric(metrics))
        report(step=done, total=total)

    config = dataclasses.replace(settings.training.reward, max_seconds=budget_s)
    pairs, thumbs = votes
    rm, metrics = train_reward_model(loaded.model, loaded.tokenizer, pairs, thumbs, config, progress=progress)
    metrics.votes_used = len(pairs) + len(thumbs)
    rm.trusted = untrusted_reward(metrics, gate) is None
    rm.save(reward_dir / f"run-{run_id}")
    for old in sorted(reward_dir.glob("run-*"), key=lambda p: int(p.name[4:]))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return rm, metrics


def chosen_for_ppo(settings: Settings, votes: Votes, train_prompts: list) -> list[tuple[list, str, bool]]:
    """The answers voters preferred on PPO's own prompts (``votes``: the reward model's, after
    the per-voter cap), for its likelihood term; none on the gate's held-out prompts, so the
    gate still measures what carries over to prompts the policy was not trained on. Empty
    when the term is off."""
    if settings.training.ppo.chosen_loss_coef <= 0:
        return []
    examples = build_examples(*votes, settings.training.reward.max_thumb_pairs_per_prompt)
    ours = {example_key(p) for p in train_prompts}
    return [(a["prompt"], a["completion"], a["finished"]) for a in preferred_answers(*examples) if a["group"] in ours]


def untrusted_reward(metrics: RewardMetrics, gate: GateConfig) -> str | None:
    """Why PPO must not run on this reward model yet (None: it may): its cross-validated
    agreement with votes it was not fitted on is not above ``min_reward_agreement`` with
    confidence. Optimising such a model moves the policy at random (docs/learning.md)."""
    bound = metrics.agreement_lower_bound
    if bound is not None and bound > gate.min_reward_agreement:
        return None
    if metrics.agreement is None:
        return f"reward model not trusted yet: votes on {metrics.prompts} prompt(s) leave nothing to check it on; waiting for more votes"
    return (
        f"reward model not trusted yet: it agrees with {metrics.agreement:.0%} of {metrics.judged} held-out votes "
        f"(lower bound {bound:.0%}, needs > {gate.min_reward_agreement:.0%}); waiting for more decisive votes"
    )


def resume_point(store: FeedbackStore, active: str | None, gate: GateConfig) -> dict[str, Any] | None:
    """The rejected candidate this cycle's PPO continues from, or None (start from the active version).

    A candidate the gate turned down only for want of confidence (its held-out gain over the
    active version was positive, its KL within bound, its answers sane) is promising but
    unproven. Training it further, instead of starting again from the active version, lets
    small steps add up across cycles: when every cycle began again from the base, each fell
    short of the gate by noise (docs/learning.md). Only the latest cycle that
    trained counts: when it kept nothing (its KL budget spent) or a version was published
    since, the chain ends and training starts from what is served.
    """
    for run in store.list_runs(limit=50):
        summary = run.get("summary") or {}
        if run["kind"] != "cycle" or run["status"] not in ("succeeded", "rejected") or "ppo" not in summary:
            continue  # not a cycle that trained (e.g. the reward model was not trusted yet)
        version = run.get("candidate_version")
        row = store.get_version(version) if version else None
        if row is None or row["status"] != "rejected" or row["parent"] != active:
            return None
        verdict = (row.get("metrics") or {}).get("gate") or {}
        promising = (
            verdict.get("improvement", 0.0) > 0.0
            and verdict.get("kl", float("inf")) <= gate.max_kl
            and verdict.get("degenerate_fraction", 1.0) <= gate.max_degenerate_fraction
        )
        return row if promising and Path(row["path"]).is_dir() else None
    return None


def warm_value_head(start: dict[str, Any] | None, model: Any, advantage: str) -> ScalarHead | None:
    """The value head (GAE) saved beside the version PPO continues from, or None (a cold,
    zero head; RLOO has none). Kept across cycles like the reward model: a cold head makes
    the first steps' advantages mostly noise."""
    if advantage != "gae" or start is None or not (Path(start["path"]) / HEAD_FILE).is_file():
        return None
    return ScalarHead.load(Path(start["path"]), hidden_size(model))


def _rejected(store: FeedbackStore, run_id: int, summary: dict[str, Any], reason: str) -> dict[str, Any]:
    """End the run with nothing to gate or publish, saying why."""
    summary.update(decision="rejected", version=None, gate={"passed": False, "reasons": [reason]})
    store.finish_run(run_id, "rejected", summary=summary)
    log.info("cycle %d: no candidate (%s)", run_id, reason)
    return summary


def _policy_model(
    settings: Settings, loaded: LoadedModel, origin: dict[str, Any] | None, active_row: dict[str, Any] | None
) -> Any:
    """The worker's model with the policy to train (from ``origin``, else fresh) and the active
    version (the gate's baseline) as adapters."""
    model = loaded.model
    if origin is not None:
        model = put_adapter(model, POLICY, origin["path"], trainable=True)
    else:
        if POLICY in model.peft_config:
            model.delete_adapter(POLICY)
        model = attach_new_adapter(model, POLICY, settings.lora)
    if active_row is not None:
        model = put_adapter(model, ACTIVE, active_row["path"], trainable=False)
    loaded.model = model
    return model


def _no_update_reason(result: Any, kl_stop: float | None) -> str:
    if result.last.get("kl_stop"):
        return (
            f"no PPO update kept: the policy's KL to the reference already passes {kl_stop} "
            "nats after one update (raise the gate's max_kl, or reset to base for a fresh budget)"
        )
    return "no PPO update kept: the cycle's time budget ran out first"


def _gate(
    store: FeedbackStore,
    run_id: int,
    model: Any,
    loaded: LoadedModel,
    reward_fn: Any,
    gate_prompts: list,
    has_active: bool,
    settings: Settings,
    gate_config: GateConfig,
    summary: dict[str, Any],
) -> Any:
    """k answers per held-out prompt from the candidate and from the active version (the base
    when none is published), paired by prompt, scored by the same reward model; k grows while
    the store holds few prompts (``GateConfig.answers_per_prompt``)."""
    ppo, k = settings.training.ppo, gate_config.answers_per_prompt(len(gate_prompts))
    asked = [p for p in gate_prompts for _ in range(k)]
    candidate = sample_and_score(model, loaded.tokenizer, POLICY, asked, reward_fn, ppo)
    baseline = sample_and_score(model, loaded.tokenizer, ACTIVE if has_active else None, asked, reward_fn, ppo)
    gate = evaluate_gate(candidate.scores, baseline.scores, candidate.kl, candidate.texts, gate_config, group_size=k)
    summary["gate"] = gate.as_metrics()
    shown = zip(asked[::k][:3], candidate.texts[::k][:3], strict=False)
    summary["samples"] = [{"prompt": p[-1]["content"], "answer": t} for p, t in shown]
    figures = {"candidate_score": gate.candidate_score, "active_score": gate.active_score, "lower_bound": gate.lower_bound}
    store.log_metrics(run_id, "gate", 0, {**figures, "kl": gate.kl, "passed": float(gate.passed)})
    return gate


def run_cycle(
    settings: Settings,
    store: FeedbackStore,
    loaded: LoadedModel,
    report: Report | None = None,
    gate_config: GateConfig | None = None,
) -> dict[str, Any]:
    """Train, gate and publish (or reject) one candidate; returns the run summary.

    ``gate_config`` overrides ``settings.training.gate`` (benchmarks and tests)."""
    report = report or (lambda **_: None)
    training = settings.training
    gate_config = gate_config or training.gate
    deadline = time.monotonic() + training.time_budget_s
    run_id = store.start_run("cycle")
    summary: dict[str, Any] = {}
    try:
        report(run_id=run_id)
        active = store.active_version()
        active_row = store.get_version(active) if active else None
        prompts = store.recent_prompts(limit=256)
        if len(prompts) < 2:
            raise ValueError("need at least 2 distinct prompts in the store")
        train_prompts, gate_prompts = split_prompts(prompts, gate_config.prompts)

        votes = training_votes(store, settings.limits)  # read once: the reward model and PPO see the same votes
        rm, rm_metrics = train_reward(settings, store, loaded, run_id, report, 0.3 * training.time_budget_s, gate_config, votes)
        summary["reward"] = rm_metrics.as_dict()
        reason = untrusted_reward(rm_metrics, gate_config)
        if reason is not None:
            return _rejected(store, run_id, summary, reason)

        # The candidate starts from the last promising candidate, else from the active version
        # (or fresh when only the base is served); the gate always compares with the active one.
        start = resume_point(store, active, gate_config) if training.resume_rejected else None
        origin = start or active_row
        summary["trained_from"] = (origin or {}).get("version")
        model = _policy_model(settings, loaded, origin, active_row)
        rm.model = model  # the reward model reads through the PeftModel, which can switch its adapters off

        def reward_fn(batch_prompts: list, completions: list[str], finished: list[bool]) -> Any:
            return rm.score(batch_prompts, completions, normalized=True, finished=finished)

        value_head = warm_value_head(origin, model, training.ppo.advantage)
        chosen = chosen_for_ppo(settings, votes, train_prompts)
        summary["chosen_answers"] = len(chosen)
        trainer = PPOTrainer(
            model, loaded.tokenizer, reward_fn, training.ppo, policy_adapter=POLICY, value_head=value_head, chosen=chosen
        )
        random.Random(run_id).shuffle(train_prompts)  # each cycle starts on other prompts

        def on_step(step: int, total: int, stats: dict[str, Any]) -> None:
            store.log_metrics(run_id, "ppo", step - 1, numeric(stats))
            report(step=step)

        report(phase="ppo", step=0, total=training.ppo.steps, started_at=time.time())
        ppo_seconds = deadline - 0.15 * training.time_budget_s - time.monotonic()
        result = trainer.train(train_prompts, max_seconds=max(0.0, ppo_seconds), progress=on_step)
        summary["ppo"] = {**result.last, "kept_updates": float(result.kept_updates), "stopped": result.stopped}
        if not result.kept_updates:  # the candidate is the active version unchanged: a gate would compare noise
            return _rejected(store, run_id, summary, _no_update_reason(result, training.ppo.kl_stop))

        report(phase="gate", step=0, total=1)
        gate = _gate(
            store, run_id, model, loaded, reward_fn, gate_prompts, active_row is not None, settings, gate_config, summary
        )
        report(phase="publish", step=0, total=1)
        metrics = {
            "gate": summary["gate"],
            "reward": rm_metrics.accuracies(),
            "run_id": run_id,
            "trained_from": summary["trained_from"],
        }
        # save_policy keeps the value head (GAE) with its adapter, so the next cycle starts from it.
        keep = publish if gate.passed else keep_rejected
        version = keep(store, model, POLICY, settings.adapters_dir, active, metrics, write=trainer.save_policy)
        summary.update(decision="published" if gate.passed else "rejected", version=version)
        store.finish_run(run_id, "succeeded" if gate.passed else "rejected", summary=summary, candidate_version=version)
        log.info("cycle %d: %s %s (%s)", run_id, summary["decision"], version, "; ".join(gate.reasons) or "gate passed")
        return summary
    except BaseException as exc:
        store.finish_run(run_id, "failed", summary=summary, error=f"{type(exc).__name__}: {exc}")
        raise
