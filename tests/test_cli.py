"""The command line: errors name what is wrong, help shows defaults, nothing is created by mistake."""

from __future__ import annotations

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


@pytest.mark.parametrize("command", ["serve", "export", "worker"])
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
