"""What the Dashboard tab shows, computed from the store and the worker's status file.

Plain functions returning Markdown, rows and a matplotlib figure, so tests can call them.
Metric names follow :mod:`rlhf_demo.worker.cycle` (phase ``reward`` / ``ppo`` / ``gate``).
"""

from __future__ import annotations

import time
from typing import Any

from rlhf_demo.analytics import leaderboard, matches_from_votes
from rlhf_demo.config import Settings
from rlhf_demo.reward.fairness import training_votes
from rlhf_demo.reward.trainer import RewardMetrics
from rlhf_demo.runtime import Runtime
from rlhf_demo.store import FeedbackStore
from rlhf_demo.worker.status import WorkerStatus, read_status
from rlhf_demo.worker.supervisor import WorkerSupervisor

VERSION_COLUMNS = ["version", "created", "parent", "status", "gate"]
RUN_COLUMNS = ["run", "started", "status", "decision", "reason / error"]
LEADERBOARD_COLUMNS = ["version", "rating (Elo scale)", "95% interval", "played against", "win-rate", "votes", "rank"]
NO_MATCHES = (
    "*No Compare votes between two different versions yet.* Once the worker has published a trained version, "
    "choose **Active vs previous version** on the Compare tab: every such vote is a match here."
)


def progress_bar(step: int, total: int, width: int = 20) -> str:
    if total <= 0:
        return ""
    filled = round(width * min(step, total) / total)
    return "▓" * filled + "░" * (width - filled) + f" {step}/{total}"


def status_markdown(status: WorkerStatus | None, process: str | None, stale_after_s: float = 120.0) -> str:
    """Worker state, current phase, progress and ETA; says clearly when no worker runs."""
    if status is None:
        return f"**Worker:** {process or 'not running'}: no status yet."
    age = time.time() - status.heartbeat
    alive = process or ("running" if age < stale_after_s else f"silent for {age:.0f} s")
    text = f"**Worker:** {alive} · **state:** {status.state}"
    if status.state == "training":
        text += f" · **phase:** {status.phase} {progress_bar(status.step, status.total)}"
        if status.eta_s is not None:
            text += f" · ETA {status.eta_s:.0f} s"
    if status.message:
        text += f"  \n{status.message}"
    return text


def versions_rows(store: FeedbackStore) -> list[list[Any]]:
    rows = []
    for v in reversed(store.list_versions()):
        metrics = v.get("metrics") or {}
        gate = metrics.get("gate") if isinstance(metrics, dict) else None
        summary = ""
        if isinstance(gate, dict):
            summary = gate_summary(gate)
            if gate.get("reasons"):
                summary += " · " + "; ".join(gate["reasons"])
        trained_from = metrics.get("trained_from") if isinstance(metrics, dict) else None
        if trained_from and trained_from != v.get("parent"):  # PPO went on from an unproven candidate
            summary = f"trained on from {trained_from} · {summary}"
        rows.append([v["version"], v["created_at"][:19], v.get("parent") or "", v["status"], summary])
    return rows


def gate_summary(gate: dict[str, Any]) -> str:
    """One line for a gate decision: the reward gain with its confidence bound, and the KL."""
    text = f"reward {gate.get('candidate_score', 0):+.2f} vs {gate.get('active_score', 0):+.2f}"
    if "lower_bound" in gate:  # gates before the paired bootstrap (2026-11) have no bound
        text += (
            f" (gain ≥ {gate['lower_bound']:+.2f} at {gate.get('confidence', 0):.0%} confidence, {gate.get('units', 0)} prompts)"
        )
    return text + f", KL {gate.get('kl', 0):.2f}"


def leaderboard_rows(store: FeedbackStore) -> list[list[Any]]:
    """All versions from all Compare matches (see :func:`rlhf_demo.analytics.leaderboard`)."""
    rows = []
    for r in leaderboard(matches_from_votes(store.version_votes())):
        win = "" if r.win_rate is None else f"{r.win_rate:.0%}"
        rows.append([r.version, round(r.rating), f"{r.low:.0f}–{r.high:.0f}", r.opponents, win, r.votes, r.rank])
    return rows


def leaderboard_note(rows: list[list[Any]]) -> str:
    return "" if rows else NO_MATCHES


def votes_until_training(store: FeedbackStore, training: Any) -> int:
    """How many more votes the worker waits for before its next cycle (the vote rule of
    :func:`rlhf_demo.worker.loop.due`: at least ``min_votes`` in all, ``every_votes`` new)."""
    counts = store.counts()
    total = counts["thumbs_up"] + counts["thumbs_down"] + counts["preferences"] + counts["both_bad"]
    runs = [r for r in store.list_runs(limit=20) if r["kind"] == "cycle"]
    since = store.count_votes_since(runs[0]["started_at"] if runs else None)
    return max(training.min_votes - total, training.every_votes - since, 0)


def training_markdown(store: FeedbackStore, training: Any) -> str:
    """ "N more votes until the next training", for the Dashboard's first line."""
    left = votes_until_training(store, training)
    if left == 0:
        return "**Enough new votes for the next training:** it starts on the worker's next poll (or when the current cycle ends)."
    plural = "vote" if left == 1 else "votes"
    also = f" (or {training.every_minutes:g} min after the last cycle, if a vote came since)" if store.list_runs(limit=1) else ""
    return f"**{left} more {plural} until the next training**{also}. 👍/👎 in Chat and A/B votes in Compare all count."


def counted_markdown(store: FeedbackStore, settings: Settings) -> str:
    """How many vote examples the reward model will train on after the worker's per-voter caps
    (:func:`rlhf_demo.reward.fairness.cap_per_voter`, as the cycle applies it), and why."""
    kept, every = votes_kept(store, settings)
    if not every:
        return ""
    return f"**{len(kept)} of {len(every)}** vote examples count toward the reward model: {cap_rule(settings)}."


def votes_kept(store: FeedbackStore, settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the vote examples the next reward model trains on, all of them): the worker keeps each
    visitor's and network's newest, within its share."""
    pairs, thumbs = training_votes(store, settings.limits)
    return [*pairs, *thumbs], [*store.preference_pairs(), *store.thumb_examples()]


def cap_rule(settings: Settings) -> str:
    share, cap = settings.limits.max_training_share, settings.limits.max_training_votes
    return f"one voter (their visitor ids and networks together) may hold at most {share:.0%} of them (while there are few voters, no more than another voter), and at most {cap} of each kind"


def _metric_series(store: FeedbackStore, run_id: int, phase: str, name: str) -> tuple[list[int], list[float]]:
    points = [
        (m["step"], m["value"])
        for m in store.run_metrics(run_id)
        if m["phase"] == phase and m["name"] == name and m["value"] is not None
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _figure() -> tuple[Any, Any]:
    """Three panels readable on a light or a dark page: transparent background, mid-grey text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grey = "#8a8a8a"
    style: dict[str, Any] = {
        "text.color": grey,
        "axes.labelcolor": grey,
        "axes.edgecolor": grey,
        "xtick.color": grey,
        "ytick.color": grey,
        "axes.facecolor": "none",
        "legend.framealpha": 0.0,
    }
    with plt.rc_context(style):  # type: ignore[arg-type]  # rcParams keys, checked by matplotlib at run time
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    fig.patch.set_alpha(0.0)
    return fig, axes


def _say(ax: Any, title: str, text: str) -> None:
    """A panel with nothing to plot says why instead of showing blank axes (−0.04…0.04)."""
    ax.set_title(title, color="#8a8a8a")
    ax.text(0.5, 0.5, text, ha="center", va="center", color="gray", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def curves_figure(store: FeedbackStore) -> Any:
    """RM held-out accuracy per run, reward and KL per PPO step of the last run, gate decisions."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = list(reversed([r for r in store.list_runs(limit=50) if r["kind"] == "cycle"]))
    fig, axes = _figure()
    titles = ("Reward model held-out accuracy", "Mean reward per PPO step", "KL to reference per PPO step")
    if not runs:
        for ax, title in zip(axes, titles, strict=True):
            _say(ax, title, "no training run yet")
        fig.tight_layout()
        plt.close(fig)
        return fig
    # a run summary's "reward" is RewardMetrics.as_dict(): read its accuracies by their field names
    for key, label in zip(RewardMetrics.ACCURACIES, ("A/B pairs", "thumbs", "all votes"), strict=True):
        acc = [(r["id"], (r.get("summary") or {}).get("reward", {}).get(key)) for r in runs]
        acc = [(i, a) for i, a in acc if a is not None]  # None: no votes of that kind judged yet
        axes[0].plot([i for i, _ in acc], [a for _, a in acc], "o-", label=label)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set(title=titles[0], xlabel="run", ylim=(0, 1.05))
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # runs are whole numbers
    last = next((r for r in reversed(runs) if r["status"] != "running"), runs[-1])
    for name, ax, title in (("score", axes[1], titles[1]), ("kl", axes[2], titles[2])):
        steps, values = _metric_series(store, last["id"], "ppo", name)
        if not steps:
            _say(ax, f"{title} (run {last['id']})", f"no PPO in run {last['id']}")
            continue
        ax.plot(steps, values, "o-")
        ax.set(title=f"{title} (run {last['id']})", xlabel="PPO step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for r in runs:
        decision = (r.get("summary") or {}).get("decision", "")
        color = {"published": "tab:green", "rejected": "tab:red"}.get(decision)
        if color:
            axes[0].axvline(r["id"], color=color, alpha=0.25)
    axes[0].text(0.01, 0.02, "green: published · red: rejected", transform=axes[0].transAxes, fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def last_cycle_markdown(store: FeedbackStore) -> str:
    """How the last finished cycle ended and why (the worker's own line says only "rejected")."""
    run = next((r for r in store.list_runs(limit=20) if r["kind"] == "cycle" and r["status"] != "running"), None)
    if run is None:
        return ""
    summary = run.get("summary") or {}
    return f"**Last cycle** (run {run['id']}): {summary.get('decision') or run['status']}" + (
        f": {_why(run)}" if _why(run) else ""
    )


def _why(run: dict[str, Any]) -> str:
    """A run's error, else its gate's reasons, else the gate's numbers."""
    gate = (run.get("summary") or {}).get("gate") or {}
    return run.get("error") or "; ".join(gate.get("reasons") or []) or (gate_summary(gate) if "kl" in gate else "")


def curves_note(store: FeedbackStore) -> str:
    if any(r["kind"] == "cycle" for r in store.list_runs(limit=50)):
        return ""
    return "*No training run yet:* the learning curves appear after the first one (see the vote count above)."


def run_rows(store: FeedbackStore, limit: int = 10) -> list[list[Any]]:
    rows = []
    for r in store.list_runs(limit=limit):
        summary = r.get("summary") or {}
        rows.append([r["id"], r["started_at"][:19], r["status"], summary.get("decision", ""), _why(r)])
    return rows


TABLES = 8  # what DashboardEvents.tables returns


class DashboardEvents:
    """The Dashboard tab's refreshes: the worker line every few seconds, tables on demand."""

    def __init__(self, runtime: Runtime, supervisor: WorkerSupervisor | None) -> None:
        self.runtime = runtime
        self.supervisor = supervisor

    def worker_markdown(self) -> tuple[str, str]:
        described = self.supervisor.describe() if self.supervisor else None
        status = described["status"] if described else read_status(self.runtime.settings.worker_dir)
        process = described["process"] if described else None
        sync = self.runtime.status.last_error or f"Serving **{self.runtime.server.active}**."
        last = last_cycle_markdown(self.runtime.store)
        return status_markdown(status, process) + (f"  \n{last}" if last else ""), sync

    def runs_seen(self) -> str:
        """What changes when a run starts or ends: the tables are redrawn only then."""
        return repr([(r["id"], r["status"]) for r in self.runtime.store.list_runs(limit=5)])

    def refresh_if_runs_changed(self, seen: str) -> tuple[Any, ...]:
        """The timer's redraw: the tables when a run started or ended since ``seen``, else nothing."""
        import gradio as gr

        now = self.runs_seen()
        if now == seen:
            return (gr.skip(),) * (1 + TABLES)
        return (now, *self.tables())

    def next_training(self) -> str:
        return training_markdown(self.runtime.store, self.runtime.settings.training)

    def tables(self) -> tuple[Any, ...]:
        store = self.runtime.store
        board_rows = leaderboard_rows(store)
        return (
            self.next_training(),
            counted_markdown(store, self.runtime.settings),
            curves_note(store),
            curves_figure(store),
            leaderboard_note(board_rows),
            board_rows,
            versions_rows(store),
            run_rows(store),
        )


def build_dashboard_tab(events: DashboardEvents, demo: Any) -> Any:
    """The Dashboard tab inside the current Blocks."""
    import gradio as gr

    private: dict[str, Any] = {"api_visibility": "private"}
    with gr.Tab("Dashboard") as tab:
        worker_md = gr.Markdown()
        sync_md = gr.Markdown()
        next_training = gr.Markdown(elem_id="dashboard-next-training")
        counted = gr.Markdown(elem_id="dashboard-counted")
        gr.Markdown("**Learning curves**")
        curves_md = gr.Markdown()
        curves = gr.Plot(show_label=False)  # its floating label covered the first plot's title
        gr.Markdown(
            "**Leaderboard: human votes between versions** (every Compare match between two different versions; "
            "Bradley–Terry rating on the Elo scale, oldest version = 1000, with a 95 % bootstrap interval)"
        )
        board_md = gr.Markdown()
        board = gr.Dataframe(headers=LEADERBOARD_COLUMNS, interactive=False)
        gr.Markdown("**Versions**")
        versions = gr.Dataframe(headers=VERSION_COLUMNS, interactive=False, wrap=True)
        gr.Markdown("**Recent training runs**")
        runs = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, wrap=True)
        refresh = gr.Button("Refresh plots")

        tables = [next_training, counted, curves_md, curves, board_md, board, versions, runs]
        timer = gr.Timer(5)
        timer.tick(events.worker_markdown, None, [worker_md, sync_md], show_progress="hidden", **private)
        timer.tick(events.next_training, None, next_training, show_progress="hidden", **private)
        refresh.click(events.tables, None, tables, **private)
        seen = gr.State("")
        timer.tick(events.refresh_if_runs_changed, [seen], [seen, *tables], show_progress="hidden", **private)
        demo.load(events.worker_markdown, None, [worker_md, sync_md], **private)
        demo.load(events.refresh_if_runs_changed, [seen], [seen, *tables], **private)
    return tab
