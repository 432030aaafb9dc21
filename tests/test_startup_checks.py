"""Storage faults end in one clear sentence: starting on a full disk, and the database file
deleted or replaced while the app runs (writes would "succeed" into the deleted file)."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_demo.runtime import Runtime, StartupError, check_writable
from rlhf_demo.store import FeedbackStore, StoreError


def fill_up(folder: Path) -> None:
    """Write a file in ``folder`` until its file system has no space left."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs, filled up: writes fail with ENOSPC, creating empty files works."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        fill_up(mount)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_a_clear_start_up_error(full_disk, settings, tiny_loaded):
    with pytest.raises(StartupError, match="no space left.*free space"):
        check_writable(full_disk / "data")
    with pytest.raises(StartupError, match="no space left"):
        Runtime(dataclasses.replace(settings, data_dir=full_disk / "data"), tiny_loaded)


def test_a_full_disk_with_an_existing_database_is_a_clear_start_up_error(tmp_path, full_disk):
    data = full_disk / "data"
    os.remove(full_disk / "filler")
    FeedbackStore(data / "feedback.db").close()  # a database made while there was room
    fill_up(full_disk)
    with pytest.raises(StartupError, match="no space left"):
        check_writable(data)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_file_gone_while_running_refuses_writes(tmp_path, how):
    path = tmp_path / "feedback.db"
    store = FeedbackStore(path)
    try:
        store.new_conversation("s1")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        if how == "replaced":
            FeedbackStore(path).close()  # a fresh, empty database at the same path
        with pytest.raises(StoreError, match=f"{how}.*restart"):
            store.new_conversation("s1")
    finally:
        store.close()
