"""Publish what the crowd taught to the Hugging Face Hub: an adapter version as a PEFT model
repo, and the feedback as a TRL-ready dataset repo, each with a card.

Why a separate step from the Spaces sync (``hub_sync``): that one is a private backup of the
whole data directory; this one makes a *reusable* artifact. So the adapter's config must name
the base by its hub id (the worker saves it with whatever local folder the base was loaded
from, e.g. the GGUF conversion), and the dataset must carry no visitor identifiers.
The token comes from ``HF_TOKEN`` only; nothing here stores or prints it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlhf_demo.config import TINY_MODEL
from rlhf_demo.modeling.adapters import ADAPTER_CONFIG, AdapterError, check_adapter_folder
from rlhf_demo.store import SERVABLE_STATUSES, FeedbackStore, export_preferences, export_unpaired
from rlhf_demo.store.validate import REASON_TAGS

DATA_CONFIGS = {"preferences": "preferences/train.jsonl", "unpaired": "unpaired/train.jsonl"}


class HubError(Exception):
    """A push that cannot run as asked; the message says what to fix."""


def hub_token(env: dict[str, str] | None = None) -> str:
    """The write token from ``HF_TOKEN``; refuse before any upload work without one."""
    token = (os.environ if env is None else env).get("HF_TOKEN", "").strip()
    if not token:
        raise HubError("no Hub token: set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens)")
    return token


def hub_base_model(model: str, override: str | None = None) -> str:
    """The hub id of the base model; a local folder or the test model cannot be named in a card."""
    name = (override or model).strip()
    looks_local = (
        name == TINY_MODEL or Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") != 1
    )
    if looks_local:
        raise HubError(
            f"base model {name!r} is not a Hub id (owner/name); pass --base-model with the id of the model the adapter was trained on"
        )
    return name


def publishable_version(store: FeedbackStore, version: str) -> dict[str, Any]:
    """The registry row of ``version`` when it may be published, else HubError saying why not."""
    row = store.get_version(version)
    if row is None:
        known = ", ".join(r["version"] for r in store.list_versions() if r["status"] in SERVABLE_STATUSES) or "none yet"
        raise HubError(f"unknown version {version!r}; publishable versions: {known}")
    if row["status"] not in SERVABLE_STATUSES:
        why = f": {row['broken_reason']}" if row.get("broken_reason") else ""
        raise HubError(
            f"version {version} is {row['status']}{why}; only versions that were served (active or retired) are published"
        )
    try:
        check_adapter_folder(Path(row["path"]))
    except AdapterError as exc:
        raise HubError(f"version {version} has no usable files: {exc}") from None
    return row


def _front_matter(meta: dict[str, Any]) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def model_card(repo_id: str, base: str, row: dict[str, Any], counts: dict[str, int], license_id: str) -> str:
    """README.md of an adapter repo: what it was trained on and how well it did, from the registry."""
    metrics = row.get("metrics") or {}
    gate, reward = metrics.get("gate") or {}, metrics.get("reward") or {}
    meta = {
        "base_model": base,
        "library_name": "peft",
        "license": license_id,
        "pipeline_tag": "text-generation",
        "tags": ["rlhf", "lora", "ppo", "peft", "rlhf-demo"],
    }
    gate_rows = [
        ("passed", gate.get("passed")),
        ("candidate reward (held-out prompts)", gate.get("candidate_score")),
        ("previous version's reward", gate.get("active_score")),
        ("mean paired improvement", gate.get("improvement")),
        (f"lower bound ({_fmt(gate.get('confidence'), 2)} confidence)", gate.get("lower_bound")),
        ("paired units", gate.get("units")),
        ("KL to the base (nats)", gate.get("kl")),
        ("degenerate answers", gate.get("degenerate_fraction")),
    ]
    lines = [
        _front_matter(meta),
        f"# {repo_id.split('/')[-1]}: version {row['version']} of an rlhf-demo policy\n",
        f"A LoRA adapter for [{base}](https://huggingface.co/{base}), trained with PPO against a reward model learned from the votes of the "
        "visitors of a live rlhf-demo chat. It was published only after passing the demo's gate "
        "(its answers beat the previous version's on held-out prompts, within a KL budget).\n",
        "## Training data\n",
        f"- {counts.get('preferences', 0)} A/B preference votes ({counts.get('ties', 0)} ties, {counts.get('both_bad', 0)} both-bad)",
        f"- {counts.get('thumbs_up', 0)} thumbs up, {counts.get('thumbs_down', 0)} thumbs down",
        f"- from {counts.get('visitors', 0)} visitors (counts at push time; the adapter saw the votes up to its training run)\n",
        "## Reward model (held-out accuracy)\n",
        f"- pairwise accuracy: {_fmt(reward.get('pairwise_accuracy'))}",
        f"- thumb accuracy: {_fmt(reward.get('thumb_accuracy'))}\n",
        "## Gate\n",
        "| figure | value |",
        "|---|---|",
        *(f"| {name} | {_fmt(value)} |" for name, value in gate_rows),
        "",
        f"Parent version: {row.get('parent') or 'the base model'}; training run: {metrics.get('run_id', 'n/a')}.\n",
        "## Usage\n",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}")',
        "```\n",
    ]
    return "\n".join(lines)


def stage_adapter(folder: Path, target: Path, base: str, card: str) -> Path:
    """Copy the adapter's files to ``target`` with the config naming ``base`` and the card beside it."""
    target.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
    config = json.loads((target / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = base
    (target / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    (target / "README.md").write_text(card)
    return target


def push_adapter(
    store: FeedbackStore,
    model: str,
    version: str,
    repo_id: str,
    token: str,
    private: bool = False,
    base_model: str | None = None,
    license_id: str = "apache-2.0",
) -> str:
    """Upload ``version`` as a PEFT model repo; returns the commit URL."""
    from huggingface_hub import HfApi

    base = hub_base_model(model, base_model)
    row = publishable_version(store, version)
    card = model_card(repo_id, base, row, store.counts(), license_id)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="rlhf-push-") as tmp:
        staged = stage_adapter(Path(row["path"]), Path(tmp) / version, base, card)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=staged, repo_id=repo_id, repo_type="model", commit_message=f"rlhf-demo adapter {version}"
        )
    return str(info)


def dataset_card(repo_id: str, rows: dict[str, int], counts: dict[str, int], license_id: str) -> str:
    """README.md of the feedback dataset: its two TRL configs (so ``load_dataset(repo, name)`` works) and counts."""
    meta = {
        "license": license_id,
        "tags": ["rlhf", "preferences", "trl", "human-feedback", "rlhf-demo"],
        "configs": [
            {"config_name": name, "data_files": [{"split": "train", "path": path}]} for name, path in DATA_CONFIGS.items()
        ],
    }
    lines = [
        _front_matter(meta),
        f"# {repo_id.split('/')[-1]}: votes from a live rlhf-demo chat\n",
        "Visitors chatted with a small model and voted on its answers. No visitor or network identifiers are included.\n",
        "| config | format (TRL) | rows |",
        "|---|---|---|",
        f"| `preferences` | conversational preference: `prompt`, `chosen`, `rejected` (decisive A/B votes) | {rows['preferences']} |",
        f"| `unpaired` | unpaired preference (KTO): `prompt`, `completion`, `label` (thumbs, both-bad) | {rows['unpaired']} |",
        "",
        f"Both configs also carry `reasons` (the rater's optional tags on a 👎 or an A/B vote: {', '.join(REASON_TAGS)}; "
        "a list, empty when none) and `comment` (the rater's optional note, \"\" when none); TRL's trainers ignore them.\n",
        f"Votes behind them: {counts.get('preferences', 0)} A/B, {counts.get('ties', 0)} ties, {counts.get('both_bad', 0)} both-bad, "
        f"{counts.get('thumbs_up', 0)} thumbs up, {counts.get('thumbs_down', 0)} thumbs down, from {counts.get('visitors', 0)} visitors.\n",
        "```python",
        "from datasets import load_dataset\n",
        f'pairs = load_dataset("{repo_id}", "preferences", split="train")',
        f'thumbs = load_dataset("{repo_id}", "unpaired", split="train")',
        "```\n",
        f"License: {license_id}.\n",
    ]
    return "\n".join(lines)


def push_dataset(store: FeedbackStore, repo_id: str, token: str, private: bool = False, license_id: str = "apache-2.0") -> str:
    """Upload the store's TRL exports (without visitor ids) as a dataset repo; returns the commit URL.

    The repo's history is squashed to this one commit: a push after visitors deleted their
    data then leaves no older commit holding what they deleted."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="rlhf-push-data-") as tmp:
        folder = Path(tmp)
        rows = {
            "preferences": export_preferences(store, folder / DATA_CONFIGS["preferences"], include_visitor_ids=False),
            "unpaired": export_unpaired(store, folder / DATA_CONFIGS["unpaired"], include_visitor_ids=False),
        }
        (folder / "README.md").write_text(dataset_card(repo_id, rows, store.counts(), license_id))
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=folder, repo_id=repo_id, repo_type="dataset", commit_message="rlhf-demo feedback export"
        )
    api.super_squash_history(repo_id, repo_type="dataset", commit_message="rlhf-demo feedback export")
    return str(info)
