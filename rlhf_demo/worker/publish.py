"""Atomic publishing of adapter versions, and clean-up of what a killed worker left behind.

Order matters (the invariant "an adapter is published only whole"): write the adapter to a
hidden temporary folder, check it and load it once, rename it to ``adapters/vN``, and only
then write the registry row, with the sha256 of the files (:func:`content_hash`) that the
server checks before it serves the version. A crash before the row leaves an unreferenced
folder; the served version never changes.

A version folder is never deleted, only moved aside to ``adapters/quarantine``: a folder no
row names may still be one the registry published (the database was lost, a restore went
wrong), and its files are the only copy.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from rlhf_demo.modeling.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, check_adapter_folder, save_adapter
from rlhf_demo.store import FeedbackStore

log = logging.getLogger(__name__)
REJECTED_DIR = "rejected"
QUARANTINE_DIR = "quarantine"
HASHED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)  # what loading an adapter reads


def content_hash(folder: Path) -> str:
    """sha256 over an adapter's config and weights (each file's name, size and bytes)."""
    digest = hashlib.sha256()
    for name in HASHED_FILES:
        path = Path(folder) / name
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def check_content(row: Mapping[str, Any]) -> None:
    """Refuse a registered version whose files are not the ones registered (changed on disk,
    corrupted, replaced); a row without a hash (registered before hashes) is not checked."""
    expected = row.get("content_hash")
    if not expected:
        return
    actual = content_hash(Path(row["path"]))
    if actual != expected:
        raise AdapterError(
            f"the files of {row['version']} changed since it was registered "
            f"(sha256 {actual[:12]}…, registered {expected[:12]}…); not serving them"
        )


def set_aside(folder: Path, adapters_dir: Path) -> Path:
    """Move ``folder`` into ``adapters/quarantine`` under a new name; returns where it went."""
    target_dir = adapters_dir / QUARANTINE_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = target_dir / f"{folder.name}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = target_dir / f"{folder.name}-{stamp}-{n}"
    folder.replace(target)
    log.warning("moved %s aside to %s (no registry row names it)", folder, target)
    return target


def verify_loads(model: Any, folder: Path) -> None:
    """Load the written adapter into the model under a scratch name, then drop it."""
    scratch = "__verify__"
    try:
        model.load_adapter(str(folder), adapter_name=scratch, is_trainable=False)
    except Exception as exc:  # noqa: BLE001 - any failure means "do not publish"
        raise AdapterError(f"{folder} does not load back: {exc}") from exc
    finally:
        if scratch in getattr(model, "peft_config", {}):
            model.delete_adapter(scratch)


Writer = Callable[[Path], Any]
"""Writes a version's folder (which must not exist yet); default: the adapter alone
(``save_adapter``). The worker passes ``PPOTrainer.save_policy``: adapter and, with GAE, its
value head."""


def publish(
    store: FeedbackStore,
    model: Any,
    adapter: str,
    adapters_dir: Path,
    parent: str | None,
    metrics: dict[str, Any],
    write: Writer | None = None,
) -> str:
    """Publish adapter ``adapter`` of ``model`` as the next version and make it active."""
    version = store.next_version_name()
    final = adapters_dir / version
    staging = adapters_dir / f".{version}.staging"
    shutil.rmtree(staging, ignore_errors=True)  # never renamed, so never published
    (write or partial(save_adapter, model, adapter))(staging)
    check_adapter_folder(staging)
    verify_loads(model, staging)
    if final.exists():  # no row names it (the name is free): a crash's leftover, or a lost registry's
        set_aside(final, adapters_dir)
    staging.replace(final)
    digest = content_hash(final)
    store.register_version(version, str(final), parent, "active", metrics, content_hash=digest)  # last: the commit point
    log.info("published %s (parent %s)", version, parent)
    return version


def keep_rejected(
    store: FeedbackStore,
    model: Any,
    adapter: str,
    adapters_dir: Path,
    parent: str | None,
    metrics: dict[str, Any],
    write: Writer | None = None,
) -> str:
    """Keep a rejected candidate for inspection (and for the next cycle to train on from)
    under ``adapters/rejected``; never served."""
    version = store.next_version_name()
    folder = adapters_dir / REJECTED_DIR / version
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        set_aside(folder, adapters_dir)
    (write or partial(save_adapter, model, adapter))(folder)
    store.register_version(version, str(folder), parent, "rejected", metrics, content_hash=content_hash(folder))
    return version


def clean_partial(adapters_dir: Path, store: FeedbackStore) -> list[str]:
    """Tidy what a killed worker left: remove staging folders (never published), move
    version folders no registry row names aside (see :func:`set_aside`); returns their names."""
    if not adapters_dir.exists():
        return []
    registered = {Path(v["path"]).resolve() for v in store.list_versions()}
    handled = []
    for folder in [*adapters_dir.iterdir(), *(adapters_dir / REJECTED_DIR).glob("*")]:
        if not folder.is_dir() or folder.name in (REJECTED_DIR, QUARANTINE_DIR) or folder.resolve() in registered:
            continue
        if folder.name.startswith("."):
            shutil.rmtree(folder, ignore_errors=True)
        else:
            set_aside(folder, adapters_dir)
        handled.append(folder.name)
    if handled:
        log.warning("tidied partial adapter folders: %s", ", ".join(handled))
    return handled
