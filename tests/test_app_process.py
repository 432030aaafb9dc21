"""``python app.py`` as a process: stopping it (SIGTERM, or even ``kill -9``) stops its worker.

An orphaned worker would go on training against a data directory nobody serves, and on a
restart two workers would train at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import pytest
from conftest import wait_until

from bench import app_process
from rlhf_demo import cli
from rlhf_demo.ui.app import free_port

ROOT = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its exit status is left


def worker_pid(data_dir: Path) -> int | None:
    try:
        return int(json.loads((data_dir / "worker" / "status.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the parent-death signal is Linux-only")
@pytest.mark.parametrize(
    "stop, when",
    [("SIGTERM", "starting"), ("SIGTERM", "serving"), ("SIGKILL", "serving")],
)
def test_stopping_the_app_stops_its_worker(stop: str, when: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """``starting``: the signal comes as soon as the worker runs, while Gradio is still starting
    (a SIGTERM there once ended the app with a traceback and status 1)."""
    port = free_port()
    app = app_process.start_app(
        tmp_path / "data", port, subprocess.DEVNULL, "--model", str(tiny_model_dir), "--quantization", "fp32"
    )
    try:
        wait_until(lambda: worker_pid(tmp_path / "data") is not None or app.poll() is not None, 120, "the worker's status file")
        if when == "serving":
            app_process.wait_for_http(f"http://127.0.0.1:{port}/", app, 120)
        assert app.poll() is None, f"app.py exited early with {app.returncode}"
        pid = worker_pid(tmp_path / "data")
        assert pid is not None and alive(pid)
        app.send_signal(getattr(signal, stop))
        app.wait(60)
        if stop == "SIGTERM":
            assert app.returncode == 0, "SIGTERM must shut down cleanly, like Ctrl+C"
        wait_until(lambda: not alive(pid), 30, f"worker {pid} to exit after the app's {stop}")
    finally:
        if app.poll() is None:
            app.kill()


def test_worker_started_for_a_dead_app_exits_at_once():
    """The app may die between starting the worker and the worker's prctl call."""
    script = (
        "import os, sys; from rlhf_demo.worker.loop import follow_parent; follow_parent(int(sys.argv[1])); print('following')"
    )
    gone = subprocess.run(
        [sys.executable, "-c", script, str(os.getpid() + 10**6)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert gone.returncode != 0 and "is gone" in gone.stderr
    alive = subprocess.run([sys.executable, "-c", script, str(os.getpid())], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert alive.returncode == 0 and "following" in alive.stdout, alive.stderr


def test_sigterm_while_gradio_starts_is_a_clean_stop(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exact moment the subprocess tests above can only hit by chance: SIGTERM inside
    ``launch`` before it serves. ``serve`` must return (exit 0), not raise a traceback."""
    launched: list[bool] = []

    def launch(self: gr.Blocks, *args: object, **kwargs: object) -> None:
        launched.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises in this frame
        raise AssertionError("SIGTERM did not interrupt the start-up")

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        cli.main(
            [
                "serve",
                "--model",
                str(tiny_model_dir),
                "--quantization",
                "fp32",
                "--data-dir",
                str(tmp_path / "data"),
                "--no-worker",
            ]
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert launched


def test_a_worker_stopped_before_its_first_cycle_leaves_at_once(tmp_path: Path) -> None:
    """SIGTERM while the worker's first check is still under way (importing torch takes
    minutes for a niced worker on a busy 2-core machine) ends the process then, not after
    the check, and a burst of them does too: a worker that outlived its ``kill -9``-ed app
    was found hung in its own handler, a second SIGTERM inside the first one's ``Event.set``."""
    script = (
        "import sys, time\n"
        "from rlhf_demo.config import load_settings\n"
        "from rlhf_demo.worker import loop\n"
        "def first_check_under_way(self, manual=False):\n"
        "    print('checking', flush=True)\n"
        "    while True:\n"
        "        time.sleep(0.05)\n"
        "loop.Worker.run_once = first_check_under_way\n"
        "loop.main(load_settings(data_dir=sys.argv[1]))\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "data")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "checking"
        for _ in range(20):  # the app's death signals the worker once per exiting thread, in a burst
            worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, "a stop request is a clean exit"
        assert json.loads((tmp_path / "data" / "worker" / "status.json").read_text())["state"] == "stopped"
    finally:
        if worker.poll() is None:
            worker.kill()
