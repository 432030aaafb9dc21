"""The command line: errors name what is wrong, help shows defaults, nothing is created by mistake."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_demo.cli import main, serve_parser

ROOT = Path(__file__).resolve().parents[1]


def test_export_from_a_missing_data_dir_names_it_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(SystemExit) as stop:
        main(["export", "--data-dir", str(missing), "--out", str(tmp_path / "out.jsonl")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and "wrote" not in err
    assert not missing.exists() and not (tmp_path / "out.jsonl").exists()


def test_export_from_a_dir_without_database_says_so_and_creates_none(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out.jsonl")])
    assert stop.value.code == 2
    assert "no feedback database" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_of_an_existing_database_still_works(settings, tmp_path, capsys):
    from rlhf_demo.store import FeedbackStore

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    FeedbackStore(settings.db_path).close()
    main(["export", "--data-dir", str(settings.data_dir), "--kind", "unpaired", "--out", str(tmp_path / "u.jsonl")])
    assert "wrote 0 rows" in capsys.readouterr().out and (tmp_path / "u.jsonl").exists()


def test_a_bad_environment_variable_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RLHF_DEMO_PORT", "seventy")
    with pytest.raises(SystemExit) as stop:
        main(["export", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o.jsonl")])
    assert stop.value.code == 2
    assert "RLHF_DEMO_PORT" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_help_shows_defaults_and_every_flag_has_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--data-dir", "--quantization", "--compute-dtype", "--device"):
        assert flag in text
    assert "default: HuggingFaceTB/SmolLM2-135M-Instruct" in text and "RLHF_DEMO_DATA_DIR" in text
    assert "(default: auto; env RLHF_DEMO_COMPUTE_DTYPE)" in text
    if command == "serve":
        assert "(default: 127.0.0.1;" in text and "(default: 7860;" in text


def test_app_py_help_names_itself(capsys):
    help_text = serve_parser().format_help()
    assert help_text.startswith("usage: app.py") and "rlhf_demo serve" not in help_text
    assert "--port" in help_text and "--no-worker" in help_text
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: app.py")


def _empty_data_dir(tmp_path: Path) -> Path:
    from rlhf_demo.store import FeedbackStore

    data = tmp_path / "data"
    FeedbackStore(data / "feedback.db").close()
    return data


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "rlhf_demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda"])
def test_an_unusable_device_is_one_line_and_a_failure(device, tmp_path, capsys):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as stop:
        main(["train-once", "--model", "tiny", "--device", device, "--data-dir", str(_empty_data_dir(tmp_path))])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "device" in err and "cpu" in err, err


def test_push_without_a_reachable_hub_is_one_line_and_a_failure(tmp_path):
    data = _empty_data_dir(tmp_path)
    with socket.socket() as s:  # a port nobody listens on: connection refused, as without network
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    for hub_env in ({"HF_ENDPOINT": closed, "HF_HUB_OFFLINE": "0"}, {"HF_HUB_OFFLINE": "1"}):
        done = _run_cli("push-data", "--repo", "someone/votes", "--data-dir", str(data), env={"HF_TOKEN": "hf_test", **hub_env})
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and "someone/votes" in done.stderr, done.stderr
        assert len([line for line in done.stderr.splitlines() if "error" in line]) == 1, done.stderr


@pytest.mark.parametrize("command", ["serve", "worker", "train-once", "export", "push", "push-data"])
def test_each_command_has_a_description_and_only_the_options_that_apply(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]  # argparse: usage, then the description, then options
    assert not description.startswith("options:") and len(description.split()) >= 8, out
    text = " ".join(out.split())
    model_options = ("--quantization", "--compute-dtype", "--device")
    if command in ("serve", "worker", "train-once"):
        assert all(flag in text for flag in model_options)
    else:
        assert not any(flag in text for flag in model_options), text
    assert ("--model" in text) == (command not in ("export", "push-data"))
