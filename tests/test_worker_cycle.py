"""A full cycle with the tiny model: votes → RM → PPO → gate → publish → the server swaps.

Also crash safety: the worker process is killed with SIGKILL in the middle of PPO and in
the middle of publishing; the DB, the served version and published adapters stay intact,
and the next run succeeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rlhf_demo.serving import Sampling
from rlhf_demo.store import FeedbackStore
from rlhf_demo.worker.cycle import run_cycle
from rlhf_demo.worker.gate import GateConfig

REPO = Path(__file__).resolve().parents[1]
ALWAYS = GateConfig(min_improvement=float("-inf"), max_kl=float("inf"), max_degenerate_fraction=1.0)
NEVER = GateConfig(min_improvement=float("inf"))


def small_training(training, steps: int = 2):
    """A cycle sized for the tiny model and a 2-core CI machine."""
    return dataclasses.replace(
        training,
        min_votes=4,
        ppo=dataclasses.replace(
            training.ppo, steps=steps, batch_size=4, mini_batch_size=2, samples_per_prompt=2, max_new_tokens=8
        ),
        gate=dataclasses.replace(training.gate, prompts=2, samples_per_prompt=2),
    )


def small(settings, steps: int = 2):
    return dataclasses.replace(settings, training=small_training(settings.training, steps))


def cast_votes(store: FeedbackStore, n_prompts: int = 12) -> None:
    """Thumbs and A/B votes on a few prompts, as the UI would record them."""
    for i in range(n_prompts):
        prompt = [{"role": "user", "content": f"question number {i}?"}]
        ids = [
            store.log_response(
                visitor_id=f"s{i % 3}",
                prompt=prompt,
                text=text,
                adapter_version="v0",
                sampling={},
                prompt_tokens=5,
                completion_tokens=3,
                latency_s=0.1,
            )
            for text in (f"great answer {i}", f"poor {i}")
        ]
        store.rate(f"s{i % 3}", ids[0], 1)
        store.rate(f"s{i % 3}", ids[1], -1)
        store.prefer(visitor_id=f"s{i % 3}", response_a_id=ids[0], response_b_id=ids[1], outcome="A", source="two_samples")


def test_full_cycle_publishes_and_server_swaps(runtime, settings):
    settings = small(settings)
    cast_votes(runtime.store)
    before = runtime.server.generate([{"role": "user", "content": "question number 1?"}], sampling=Sampling(0.0, 1.0, 12))
    from rlhf_demo.modeling import load_model

    worker_model = load_model(settings)  # the worker process has its own base
    summary = run_cycle(settings, runtime.store, worker_model, gate_config=ALWAYS)
    assert summary["decision"] == "published" and summary["version"] == "v1"
    assert runtime.store.active_version() == "v1"
    run = runtime.store.list_runs(limit=1)[0]
    assert run["status"] == "succeeded" and run["candidate_version"] == "v1"
    names = {(m["phase"], m["name"]) for m in runtime.store.run_metrics(run["id"])}
    assert ("gate", "kl") in names and any(p == "ppo" for p, _ in names) and any(p == "reward" for p, _ in names)
    assert runtime.sync_registry() == "v1"
    after = runtime.server.generate([{"role": "user", "content": "question number 1?"}], sampling=Sampling(0.0, 1.0, 12))
    assert after.version == "v1" and before.version == "v0"

    from rlhf_demo.ui import dashboard

    figure = dashboard.curves_figure(runtime.store)  # the dashboard plots this run's PPO curves
    for axis in figure.axes[1:]:
        (line,) = axis.get_lines()
        assert list(line.get_xdata()) == [0, 1], f"{axis.get_title()}: no curve for the 2 PPO steps"
    # ... and the RM's cross-validated accuracy
    plotted = {
        line.get_label(): list(line.get_ydata())
        for line in figure.axes[0].get_lines()
        if len(line.get_xdata()) and not line.get_label().startswith("_")
    }
    assert set(plotted) == {"A/B pairs", "thumbs", "all votes"}, "RM accuracy plot is empty"
    assert all(0 <= y <= 1 for ys in plotted.values() for y in ys)
    # the published version carries the same numbers, under the same names
    reward = next(v for v in runtime.store.list_versions() if v["version"] == "v1")["metrics"]["reward"]
    assert reward == {k: summary["reward"][k] for k in ("pairwise_accuracy", "thumb_accuracy", "agreement")}
    assert None not in reward.values()


def test_rejected_candidate_is_kept_but_never_served(runtime, settings):
    settings = small(settings)
    cast_votes(runtime.store)
    from rlhf_demo.modeling import load_model

    summary = run_cycle(settings, runtime.store, load_model(settings), gate_config=NEVER)
    assert summary["decision"] == "rejected" and summary["gate"]["reasons"]
    rejected = next(v for v in runtime.store.list_versions() if v["version"] == summary["version"])
    assert rejected["status"] == "rejected" and Path(rejected["path"]).is_dir()
    assert runtime.store.active_version() == "v0" and runtime.sync_registry() == "v0"


def test_gae_value_head_is_kept_with_the_version_and_warm_starts_the_next_cycle(runtime, settings, monkeypatch):
    """With ``advantage="gae"`` the value head is saved beside the candidate's adapter (both
    published and rejected ones) and the next cycle's PPO starts from the head of the version
    it trains from, as the reward model is refit rather than restarted: a cold head every
    cycle makes the first steps' advantages mostly noise."""
    from safetensors.torch import load_file

    from rlhf_demo.modeling import load_model
    from rlhf_demo.modeling.heads import HEAD_FILE
    from rlhf_demo.worker import cycle as cycle_module

    settings = small(settings)
    settings = dataclasses.replace(
        settings,
        training=dataclasses.replace(
            settings.training, ppo=dataclasses.replace(settings.training.ppo, advantage="gae", samples_per_prompt=1)
        ),
    )
    starts: list[dict[str, torch.Tensor]] = []

    class Recording(cycle_module.PPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            starts.append({k: v.detach().clone() for k, v in self.value_head.state_dict().items()})

    monkeypatch.setattr(cycle_module, "PPOTrainer", Recording)
    cast_votes(runtime.store)
    worker_model = load_model(settings)
    first = run_cycle(settings, runtime.store, worker_model, gate_config=ALWAYS)
    v1 = next(v for v in runtime.store.list_versions() if v["version"] == first["version"])
    saved = load_file(str(Path(v1["path"]) / HEAD_FILE))
    assert torch.count_nonzero(starts[0]["linear.weight"]) == 0  # the first cycle starts cold (V = 0)
    assert torch.count_nonzero(saved["linear.weight"]) > 0  # ... and learned something
    second = run_cycle(settings, runtime.store, worker_model, gate_config=NEVER)
    assert torch.equal(starts[1]["linear.weight"], saved["linear.weight"]) and torch.equal(
        starts[1]["linear.bias"], saved["linear.bias"]
    )
    rejected = next(v for v in runtime.store.list_versions() if v["version"] == second["version"])
    assert (Path(rejected["path"]) / HEAD_FILE).is_file()


# ----- kill -9 ---------------------------------------------------------------------------
CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from rlhf_demo.config import load_settings
    from rlhf_demo.worker import publish as publish_module
    from rlhf_demo.worker.loop import Worker
    from rlhf_demo.worker import cycle
    import dataclasses

    where = sys.argv[3]
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "verify":          # staging folder written, not yet renamed
        publish_module.verify_loads = die
    elif where == "register":      # renamed into adapters/vN, registry row not written
        from rlhf_demo.store import FeedbackStore
        FeedbackStore.register_version = die
    settings = load_settings(env={}, model=sys.argv[1], data_dir=sys.argv[2], quantization="fp32")
    sys.path.insert(0, sys.argv[5])
    from test_worker_cycle import small
    settings = small(settings, int(sys.argv[4]))
    gate = cycle.GateConfig(min_improvement=float("-inf"), max_kl=float("inf"), max_degenerate_fraction=1.0)
    original = cycle.run_cycle
    cycle.run_cycle = lambda *a, **k: original(*a, **{**k, "gate_config": gate})
    worker = Worker(settings)
    worker.repair()
    print("SUMMARY", worker.run_once(manual=True), flush=True)
    """
)


def start_worker(settings, where: str, iterations: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, settings.model, str(settings.data_dir), where, str(iterations), str(REPO / "tests")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def assert_consistent(settings, runtime) -> None:
    con = sqlite3.connect(settings.db_path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
    assert runtime.store.active_version() == "v0"
    assert runtime.sync_registry() == "v0"
    assert (
        runtime.server.generate([{"role": "user", "content": "hi"}], sampling=runtime.server.sampling(max_new_tokens=4)).version
        == "v0"
    )
    assert runtime.store.counts()["preferences"] == 12  # no vote lost


def wait_for_phase(settings, phase: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    status = settings.worker_dir / "status.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker ended early: {proc.stdout.read()}")
        try:
            if json.loads(status.read_text()).get("phase") == phase:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    pytest.fail(f"worker never reached phase {phase}")


@pytest.mark.parametrize("where", ["ppo", "verify", "register"])
def test_kill_9_leaves_everything_consistent_and_next_run_succeeds(runtime, settings, where):
    settings = small(settings)
    cast_votes(runtime.store)
    if where == "ppo":
        proc = start_worker(settings, "none", iterations=50)
        wait_for_phase(settings, "ppo", proc)
        proc.send_signal(signal.SIGKILL)
    else:
        proc = start_worker(settings, where, iterations=1)
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read()
    assert_consistent(settings, runtime)
    assert runtime.store.list_runs(limit=1)[0]["status"] == "running"  # the dead worker's run

    proc = start_worker(settings, "none", iterations=1)  # a restarted worker repairs and resumes
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    runs = runtime.store.list_runs(limit=2)
    assert runs[1]["status"] == "failed" and "interrupted" in (runs[1]["error"] or "")
    assert runs[0]["status"] == "succeeded"
    assert runtime.store.active_version() == "v1"  # the killed candidate never took a version name
    leftovers = [p.name for p in settings.adapters_dir.iterdir() if p.name.startswith(".")]
    assert not leftovers
    assert runtime.sync_registry() == "v1"


def test_stop_request_ends_a_cycle_at_the_next_step_unpublished(runtime, settings):
    """SIGTERM (or the app dying) sets the worker's stop flag: the cycle ends within one step."""
    from rlhf_demo.worker.loop import CycleInterrupted, Worker

    settings = small(settings, steps=50)
    cast_votes(runtime.store)
    worker = Worker(settings)
    steps: list[int] = []
    original = worker.report

    def report(**changes):
        original(**changes)
        if worker.status.phase == "ppo" and "step" in changes:
            steps.append(changes["step"])
            if changes["step"] >= 1:
                worker.stop()  # what SIGTERM does inside a cycle

    worker.report = report
    with pytest.raises(CycleInterrupted):
        worker.run_once(manual=True)
    assert steps[-1] == 1, "the cycle went on after the stop request"
    run = runtime.store.list_runs(limit=1)[0]
    assert run["status"] == "failed" and "asked to stop" in run["error"]
    assert runtime.store.active_version() == "v0" and [v["version"] for v in runtime.store.list_versions()] == ["v0"]
    assert worker.status.state == "stopped"


def test_cycle_whose_first_update_passes_the_kl_stop_ends_without_a_candidate(runtime, settings):
    """Nothing left of PPO means the candidate is the active version: say so, publish nothing."""
    settings = small(settings)
    ppo = dataclasses.replace(settings.training.ppo, kl_stop=-1.0)  # any KL passes
    settings = dataclasses.replace(settings, training=dataclasses.replace(settings.training, ppo=ppo))
    cast_votes(runtime.store)
    from rlhf_demo.modeling import load_model

    summary = run_cycle(settings, runtime.store, load_model(settings), gate_config=GateConfig())
    assert summary["decision"] == "rejected" and summary["version"] is None
    assert "no PPO update kept" in summary["gate"]["reasons"][0]
    run = runtime.store.list_runs(limit=1)[0]
    assert run["status"] == "rejected" and run["candidate_version"] is None
    assert [v["version"] for v in runtime.store.list_versions()] == ["v0"]


# ----- training continues from a promising rejected candidate ------------------------------
def finished_cycle(
    store: FeedbackStore, tmp_path: Path, status: str, version: str | None, gate: dict | None, trained: bool = True
) -> None:
    """A cycle run as run_cycle records it, with its candidate registered under ``version``."""
    run_id = store.start_run("cycle")
    if version is not None:
        folder = tmp_path / version
        folder.mkdir()
        store.register_version(
            version, folder, store.active_version(), "active" if status == "succeeded" else "rejected", {"gate": gate or {}}
        )
    store.finish_run(run_id, status, summary={"ppo": {}} if trained else {"gate": {"passed": False}}, candidate_version=version)


PROMISING = {"passed": False, "improvement": 0.04, "kl": 1.2, "degenerate_fraction": 0.0}


def test_resume_point_is_the_last_promising_candidate(tmp_path):
    from rlhf_demo.worker.cycle import resume_point

    store = FeedbackStore(tmp_path / "db.sqlite")
    (tmp_path / "v0").mkdir()
    store.register_version("v0", tmp_path / "v0", None, "active", {})
    gate = GateConfig()
    assert resume_point(store, "v0", gate) is None  # nothing trained yet

    finished_cycle(store, tmp_path, "rejected", "v1", PROMISING)
    assert resume_point(store, "v0", gate)["version"] == "v1"
    finished_cycle(store, tmp_path, "rejected", None, None, trained=False)  # reward model not trusted: no training
    assert resume_point(store, "v0", gate)["version"] == "v1"

    finished_cycle(store, tmp_path, "rejected", "v2", {**PROMISING, "improvement": -0.01})  # worse on its held-out answers
    assert resume_point(store, "v0", gate) is None
    finished_cycle(store, tmp_path, "rejected", "v3", {**PROMISING, "kl": gate.max_kl + 1})
    assert resume_point(store, "v0", gate) is None
    finished_cycle(store, tmp_path, "rejected", "v4", {**PROMISING, "degenerate_fraction": 0.9})
    assert resume_point(store, "v0", gate) is None
    finished_cycle(store, tmp_path, "rejected", "v5", PROMISING)
    assert resume_point(store, "v0", gate)["version"] == "v5"

    run_id = store.start_run("cycle")  # trained, but kept no update (KL budget spent): the chain ends
    store.finish_run(run_id, "rejected", summary={"ppo": {"kept_updates": 0.0}})
    assert resume_point(store, "v0", gate) is None

    finished_cycle(store, tmp_path, "rejected", "v6", PROMISING)
    finished_cycle(store, tmp_path, "succeeded", "v7", {"passed": True, "improvement": 0.2})
    assert store.active_version() == "v7" and resume_point(store, "v7", gate) is None  # published since
    store.close()


def test_cycle_trains_on_from_a_promising_candidate(runtime, settings):
    settings = small(settings)
    cast_votes(runtime.store)
    from rlhf_demo.modeling import load_model

    loaded = load_model(settings)
    first = run_cycle(settings, runtime.store, loaded, gate_config=NEVER)
    assert first["trained_from"] == "v0" and first["decision"] == "rejected"
    candidate = first["version"]
    # Whatever the tiny model's gain was, make the gate's verdict "better, but not with confidence".
    with sqlite3.connect(settings.db_path) as db:
        metrics = json.loads(db.execute("SELECT metrics_json FROM adapter_versions WHERE version = ?", [candidate]).fetchone()[0])
        metrics["gate"].update(improvement=0.05, kl=0.5, degenerate_fraction=0.0)
        db.execute("UPDATE adapter_versions SET metrics_json = ? WHERE version = ?", [json.dumps(metrics), candidate])
    second = run_cycle(settings, runtime.store, loaded, gate_config=NEVER)
    assert second["trained_from"] == candidate
    assert next(v for v in runtime.store.list_versions() if v["version"] == second["version"])["parent"] == "v0"
    off = dataclasses.replace(settings, training=dataclasses.replace(settings.training, resume_rejected=False))
    assert run_cycle(off, runtime.store, loaded, gate_config=NEVER)["trained_from"] == "v0"
    assert runtime.store.active_version() == "v0"


def test_the_stop_signal_handler_takes_no_lock(settings):
    """A signal handler runs on top of whatever the main thread was doing, even its own
    previous run: one that takes a lock (``Event.set``) deadlocks when a second SIGTERM lands
    while the first holds it. Here the lock is held elsewhere; the handler must not wait."""
    import threading

    from rlhf_demo.worker.loop import Worker

    worker = Worker(settings)
    worker._in_cycle = True  # inside a cycle the handler only marks the stop
    returned = threading.Event()
    with worker._stop._cond:  # what the interrupted Event.set held
        threading.Thread(target=lambda: (worker.on_signal(15, None), returned.set()), daemon=True).start()
        assert returned.wait(5), "the handler waited for a lock"
    assert worker.stopping


def test_ppo_learns_from_the_preferred_answers_of_its_own_prompts_only(runtime, settings):
    """The likelihood term reads the voters' winners on PPO's prompts; the gate's held-out
    prompts stay unseen, so the gate still measures what carries over."""
    from rlhf_demo.modeling import load_model
    from rlhf_demo.reward.fairness import training_votes
    from rlhf_demo.worker.cycle import chosen_for_ppo, split_prompts

    settings = small(settings)
    cast_votes(runtime.store)
    train, held = split_prompts(runtime.store.recent_prompts(limit=256), settings.training.gate.prompts)
    votes = training_votes(runtime.store, settings.limits)
    assert chosen_for_ppo(settings, votes, train) == []  # off by default
    on = dataclasses.replace(
        settings,
        training=dataclasses.replace(settings.training, ppo=dataclasses.replace(settings.training.ppo, chosen_loss_coef=0.5)),
    )
    chosen = chosen_for_ppo(on, votes, train)
    assert sorted(c[1] for c in chosen) == sorted(f"great answer {p[0]['content'].split()[-1][:-1]}" for p in train)
    assert not {json.dumps(c[0]) for c in chosen} & {json.dumps(p) for p in held}
    summary = run_cycle(on, runtime.store, load_model(on), gate_config=ALWAYS)
    assert summary["chosen_answers"] == len(chosen) and summary["decision"] == "published"
    run = runtime.store.list_runs(limit=1)[0]
    assert any(m["phase"] == "ppo" and m["name"] == "chosen_nll" for m in runtime.store.run_metrics(run["id"]))
