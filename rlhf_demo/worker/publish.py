"""Atomic publishing of adapter versions, and clean-up of what a killed worker left behind.

Order matters (the invariant "an adapter is published only whole"): write the adapter to a
hidden temporary folder, check it and load it once, rename it to ``adapters/vN``, and only
then write the registry row. A crash before the row leaves an unreferenced folder that the
next start removes; the served version never changes.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from rlhf_demo.modeling.adapters import AdapterError, check_adapter_folder, save_adapter
from rlhf_demo.store import FeedbackStore

log = logging.getLogger(__name__)
REJECTED_DIR = "rejected"


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
    shutil.rmtree(staging, ignore_errors=True)
    (write or partial(save_adapter, model, adapter))(staging)
    check_adapter_folder(staging)
    verify_loads(model, staging)
    if final.exists():  # left by a crash between rename and registry row: not registered, so not served
        shutil.rmtree(final)
    staging.replace(final)
    store.register_version(version, str(final), parent, "active", metrics)  # last: the commit point
    log.info("published %s (parent %s)", version, parent)
    return version


def keep_rejected(store: FeedbackStore, model: Any, adapter: str, adapters_dir: Path, parent: str | None, metrics: dict[str, Any], write: Writer | None = None) -> str:
    """Keep a rejected candidate for inspection (and for the next cycle to train on from)
    under ``adapters/rejected``; never served."""
    version = store.next_version_name()
    folder = adapters_dir / REJECTED_DIR / version
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    (write or partial(save_adapter, model, adapter))(folder)
    store.register_version(version, str(folder), parent, "rejected", metrics)
    return version


def clean_partial(adapters_dir: Path, store: FeedbackStore) -> list[str]:
    """Remove staging folders and unregistered version folders (a killed worker's leftovers)."""
    if not adapters_dir.exists():
        return []
    registered = {Path(v["path"]).resolve() for v in store.list_versions()}
    removed = []
    for folder in [*adapters_dir.iterdir(), *(adapters_dir / REJECTED_DIR).glob("*")]:
        if not folder.is_dir() or folder.name == REJECTED_DIR:
            continue
        if folder.name.startswith(".") or folder.resolve() not in registered:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    if removed:
        log.warning("removed partial adapter folders: %s", ", ".join(removed))
    return removed
