"""``python app.py`` exactly as a user starts it, for the benchmarks and tests that drive
the real entry point (live loop, Hub restarts, the vLLM engine's browser test): one place
that says how the app is started and when it is up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def start_app(data_dir: Path, port: int, output: Any, *flags: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """``python app.py`` on loopback; ``flags`` are its own (``--model``, ``--quantization``
    …); stdout and stderr go to ``output``. ``env`` replaces the default environment (this
    process's, offline)."""
    if env is None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    command = [
        sys.executable,
        str(ROOT / "app.py"),
        "--data-dir",
        str(data_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *flags,
    ]
    return subprocess.Popen(command, cwd=ROOT, env=dict(env), stdout=output, stderr=subprocess.STDOUT)


def wait_for_http(url: str, app: subprocess.Popen, timeout_s: float) -> None:
    """Until ``url`` answers 200 (the loading page before Gradio answers 503); raises if the
    app exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise RuntimeError(f"app.py exited with {app.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")
