"""Folders built once per data dir (the tiny model, a converted GGUF), safe when several
processes start on a fresh data dir at the same moment (app and worker, two replicas)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def build_folder_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first with ``build(tmp)`` unless ``target / marker`` exists.

    One process builds at a time (a file lock beside the folder; the OS releases it when a
    process dies), into a temp folder renamed into place, so a reader sees the whole folder
    or none; the others wait and find it built. ``marker`` is a file ``build`` writes.
    """
    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if (target / marker).exists():  # built while this process waited
            return target
        tmp = target.with_name(f".{target.name}.tmp")
        for stale in (tmp, target):  # left by a process that died mid-build
            shutil.rmtree(stale, ignore_errors=True)
        build(tmp)
        tmp.replace(target)
    return target
