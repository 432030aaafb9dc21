"""Kill the app with SIGTERM at random moments, restart it on a fresh data dir (as a Space
restart does) against a local fake Hub, and count the acknowledged votes that come back.

A vote is acknowledged when the API call that cast it returned "recorded". Every cycle
starts ``python app.py`` on an empty data directory with Hub sync on, votes (chat + 👍)
until a SIGTERM sent at a random moment (during start-up in about one cycle in four, else
within ``window_s`` of the first acknowledged vote, while votes are being cast), and waits for the exit. The next cycle restores from the Hub;
at the end one more restore reads the Hub's snapshot. Nothing leaves 127.0.0.1.

    OMP_NUM_THREADS=1 python bench/hub_restarts.py --cycles 10 --out bench/results/hub_restarts.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.app_process import start_app, wait_for_http  # noqa: E402

REPO = "user/space-data"
FINAL_PUSH = re.compile(r"^(\S+ \S+) INFO \S+: final push to \S+ (done|NOT done) after ([0-9.]+) s", re.M)
SHUTTING_DOWN = re.compile(r"^(\S+ \S+) INFO \S+: shutting down", re.M)


def seconds_between(start: str, end: str) -> float:
    """Seconds between two log timestamps (``2026-12-03 12:42:28,054``)."""
    from datetime import datetime

    parse = lambda stamp: datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    return round((parse(end) - parse(start)).total_seconds(), 2)


def hub_env(endpoint: str, token: str, home: Path) -> dict[str, str]:
    """The app's environment: Hub sync on, huggingface_hub pointed at the fake Hub."""
    return dict(
        os.environ,
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN=token,
        HF_HOME=str(home),
        RLHF_DEMO_HUB_DATASET=REPO,
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_DISABLE_TELEMETRY="1",
    )


def voted_markers(db_path: Path) -> set[str]:
    """The markers (prompt texts) of the 👍 votes a database holds."""
    if not db_path.exists():
        return set()
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT r.prompt_json FROM ratings t JOIN responses r ON r.id = t.response_id WHERE t.value = 1"
        ).fetchall()
    finally:
        con.close()
    return {json.loads(prompt)[-1]["content"] for (prompt,) in rows}


def vote_until_stopped(url: str, cycle: int, app: subprocess.Popen, acknowledged: list[str], first_vote: threading.Timer) -> None:
    """Chat and 👍 until the app goes away; a vote counts once its call returned "recorded".
    ``first_vote`` (the SIGTERM timer) starts with the first acknowledged vote, so the signal
    lands among the votes; it starts anyway if no vote gets through in 120 s."""
    from gradio_client import Client

    deadline = time.monotonic() + 120
    try:
        client = Client(url, verbose=False)
        for j in range(10_000):
            if app.poll() is not None or (not acknowledged and time.monotonic() > deadline):
                break
            marker = f"cycle {cycle} vote {j}"
            client.predict(marker, [], 0.7, 0.9, 2, api_name="/chat")
            if "recorded" in str(client.predict(1, True, api_name="/rate")):
                acknowledged.append(marker)
                if len(acknowledged) == 1:
                    first_vote.start()
    except Exception:  # noqa: BLE001 - the app is shutting down
        pass
    finally:
        if first_vote.ident is None:  # not started yet
            first_vote.start()


def one_cycle(
    cycle: int, rng: random.Random, work: Path, env: dict[str, str], model: str, port: int, window_s: float
) -> dict[str, Any]:
    """Start, (maybe) vote, SIGTERM at a random moment, wait; what was acknowledged and what was restored at start."""
    data_dir = work / f"data-{cycle}"
    log = (work / f"app-{cycle}.log").open("wb")
    app = start_app(data_dir, port, log, "--model", model, "--quantization", "fp32", "--no-worker", env=env)
    url, acknowledged, restored = f"http://127.0.0.1:{port}/", [], set()
    during_startup = rng.random() < 0.25
    started = time.monotonic()
    try:
        if during_startup:
            time.sleep(rng.uniform(0.5, 40.0))  # imports, restore, model load, Gradio start
            app.send_signal(signal.SIGTERM)
        else:
            wait_for_http(url, app, 600 - (time.monotonic() - started))
            restored = voted_markers(data_dir / "feedback.db")
            killer = threading.Timer(rng.uniform(0.0, window_s), app.send_signal, [signal.SIGTERM])
            vote_until_stopped(url, cycle, app, acknowledged, killer)
            killer.join()  # one SIGTERM per cycle, as a Space sends
        stopping = time.monotonic()
        code = app.wait(90)
        stop_s = round(time.monotonic() - stopping, 2)
    finally:
        if app.poll() is None:
            app.kill()
        log.close()
    text = (work / f"app-{cycle}.log").read_text(errors="replace")
    pushed, stopping_at = FINAL_PUSH.search(text), SHUTTING_DOWN.search(text)
    final_push = "none (killed before Hub sync started)"
    if pushed:
        after = f", {seconds_between(stopping_at.group(1), pushed.group(1))} s after the signal" if stopping_at else ""
        final_push = f"{pushed.group(2)} in {pushed.group(3)} s{after}"
    return {
        "cycle": cycle,
        "killed": "starting" if during_startup else "serving",
        "acknowledged": acknowledged,
        "restored_at_start": sorted(restored),
        "exit_code": code,
        "stop_s": stop_s,
        "final_push": final_push,
    }


def run(hub: Any, model: str, work: Path, cycles: int, seed: int = 0, window_s: float = 6.0) -> dict[str, Any]:
    """``cycles`` kill/restart cycles against ``hub`` (a running tests.fake_hub.FakeHub); the figures."""
    from rlhf_demo.ui.app import free_port

    rng = random.Random(seed)
    env = hub_env(hub.endpoint, hub.token, work / "hf-home")
    results, acknowledged = [], []
    for cycle in range(cycles):
        result = one_cycle(cycle, rng, work, env, model, free_port(), window_s)
        if result["killed"] == "serving":  # what a start restored: every vote acknowledged before it
            result["lost_before_this_start"] = sorted(set(acknowledged) - set(result["restored_at_start"]))
        acknowledged += result["acknowledged"]
        results.append(result)
    final = work / "final" / "feedback.db"
    final_db = hub.files(REPO, "dataset").get("snapshot/feedback.db")
    if final_db is not None:
        final.parent.mkdir(parents=True)
        final.write_bytes(final_db)
    restored = voted_markers(final)
    return {
        "cycles": cycles,
        "seed": seed,
        "acknowledged": len(acknowledged),
        "restored": len(set(acknowledged) & restored),
        "lost": sorted(set(acknowledged) - restored),
        "exit_codes": [r["exit_code"] for r in results],
        "stop_s_max": max(r["stop_s"] for r in results),
        "final_pushes": [r["final_push"] for r in results],
        "history_commits": len(hub.repo(REPO, "dataset").commits),
        "per_cycle": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from rlhf_demo.modeling.tiny import build_tiny_model
    from tests.fake_hub import FakeHub

    with tempfile.TemporaryDirectory(prefix="hub-restarts-") as tmp:
        work = Path(tmp)
        model = str(build_tiny_model(work / "tiny"))
        hub = FakeHub().start()
        try:
            figures = run(hub, model, work, args.cycles, args.seed)
        finally:
            hub.close()
    summary = {k: v for k, v in figures.items() if k != "per_cycle"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
