"""Hub publishing and the Spaces sync, end to end against the local fake Hub (never the network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlhf_demo.config import Settings
from rlhf_demo.reward.model import PROBE_FILE
from rlhf_demo.store import FeedbackStore
from tests import fake_hub as fake_hub_module
from tests.conftest import write_random_adapter
from tests.fake_hub import TOKEN, FakeHub

fake_hub = fake_hub_module.fake_hub  # the fixture, usable in this module

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
METRICS = {
    "gate": {
        "passed": True,
        "candidate_score": 0.61,
        "active_score": 0.42,
        "improvement": 0.19,
        "lower_bound": 0.05,
        "confidence": 0.9,
        "units": 12,
        "kl": 0.031,
        "degenerate_fraction": 0.0,
        "reasons": [],
    },
    "reward": {"pairwise_accuracy": 0.72, "thumb_accuracy": 0.66},
    "run_id": 7,
}


def add_feedback(store: FeedbackStore) -> None:
    """Two thumbs and one decisive A/B vote, from sessions with ip keys (which must never leave)."""
    prompt = [{"role": "user", "content": "Say hi"}]
    ids = [
        store.log_response(
            visitor_id="secret-session",
            prompt=prompt,
            text=text,
            adapter_version="v0",
            sampling={},
            prompt_tokens=1,
            completion_tokens=1,
            latency_s=0.1,
        )
        for text in ("Hi there!", "Go away.")
    ]
    store.rate("secret-session", ids[0], 1, ip_key="secret-ip")
    store.rate("secret-session", ids[1], -1, ip_key="secret-ip")
    store.record_preference(
        visitor_id="other-secret",
        response_a_id=ids[0],
        response_b_id=ids[1],
        outcome="A",
        source="two_samples",
        ip_key="secret-ip-2",
    )
    store.annotate_rating("secret-session", ids[1], ["rude"], "Not friendly.")
    store.annotate_preference("other-secret", ids[0], ids[1], ["unhelpful", "rude"], "B refuses.")


@pytest.fixture
def published(settings: Settings, tiny_loaded) -> tuple[FeedbackStore, Path]:
    """A store with votes and a published (active) non-identity adapter v1 whose config names a local folder."""
    store = FeedbackStore(settings.db_path)
    add_feedback(store)
    folder = write_random_adapter(tiny_loaded, settings, "v1", seed=3)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(settings.model)  # the local folder: what the issue is about
    store.register_version("v1", str(folder), None, "active", METRICS)
    yield store, folder
    store.close()


def download(hub: FakeHub, repo_id: str, repo_type: str, target: Path) -> Path:
    """Every file of the repo, through huggingface_hub's own download path."""
    from huggingface_hub import HfApi, hf_hub_download

    for name in HfApi(token=hub.token).list_repo_files(repo_id, repo_type=repo_type):
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hf_hub_download(repo_id, name, repo_type=repo_type, token=hub.token), dest)
    return target


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# ----- push: the adapter as a PEFT model repo ------------------------------------------------


def test_push_uploads_an_adapter_peft_loads_with_the_hub_base_and_a_card(fake_hub, published, settings, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_demo.hub_push import push_adapter

    store, folder = published
    push_adapter(store, HUB_BASE, "v1", "user/smol-rlhf", TOKEN, private=True)
    assert fake_hub.repo("user/smol-rlhf").private
    local = download(fake_hub, "user/smol-rlhf", "model", tmp_path / "dl")

    assert json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_BASE
    card = (local / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == HUB_BASE and meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert {"rlhf", "lora"} <= set(meta["tags"])
    for figure in (
        "0.720",
        "0.660",
        "0.031",
        "0.610",
        "0.050",
        "PeftModel.from_pretrained",
        "1 A/B preference votes",
        "1 thumbs up",
    ):
        assert figure in card, figure

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, "user/smol-rlhf", token=TOKEN)  # straight from the (fake) Hub
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(folder))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits)
        with model.disable_adapter():
            assert not torch.allclose(model(ids).logits, original(ids).logits)  # the adapter does something


def copy_version(folder: Path, settings: Settings, version: str) -> Path:
    """Another version's files (one random adapter per tiny model: the fixture's model keeps no second)."""
    return Path(shutil.copytree(folder, settings.adapters_dir / version))


def test_push_refuses_unknown_rejected_broken_versions_missing_token_and_a_local_base(fake_hub, published, settings):
    from rlhf_demo.hub_push import HubError, hub_token, push_adapter

    store, folder = published
    rejected = copy_version(folder, settings, "v2")
    store.register_version("v2", str(rejected), "v1", "rejected", METRICS)
    broken = copy_version(folder, settings, "v3")
    store.register_version("v3", str(broken), "v1", "retired", METRICS)
    store.mark_broken("v3", "shape mismatch")
    with pytest.raises(HubError, match="unknown version 'v9'.*v1"):
        push_adapter(store, HUB_BASE, "v9", "user/x", TOKEN)
    with pytest.raises(HubError, match="v2 is rejected"):
        push_adapter(store, HUB_BASE, "v2", "user/x", TOKEN)
    with pytest.raises(HubError, match="v3 is broken: shape mismatch"):
        push_adapter(store, HUB_BASE, "v3", "user/x", TOKEN)
    with pytest.raises(HubError, match="not a Hub id"):
        push_adapter(store, str(settings.model), "v1", "user/x", TOKEN)
    with pytest.raises(HubError, match="HF_TOKEN"):
        hub_token({})
    assert not [r for r in fake_hub.requests if r[0] == "POST"]  # refused before any upload


def test_push_cli_reads_the_token_from_the_environment_and_explains_refusals(fake_hub, published, settings, monkeypatch, capsys):
    from rlhf_demo.cli import main

    argv = ["push", "--data-dir", str(settings.data_dir), "--model", str(settings.model), "--repo", "user/cli-rlhf"]
    main([*argv, "--version", "v1", "--base-model", HUB_BASE])
    assert "pushed to user/cli-rlhf" in capsys.readouterr().out
    assert "adapter_model.safetensors" in fake_hub.files("user/cli-rlhf")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--version", "v7", "--base-model", HUB_BASE])
    assert exit_info.value.code == 2 and "unknown version 'v7'" in capsys.readouterr().err
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(SystemExit):
        main([*argv, "--version", "v1", "--base-model", HUB_BASE])
    assert "no Hub token" in capsys.readouterr().err


# ----- push-data: the feedback as a dataset repo ---------------------------------------------


def test_push_data_makes_a_dataset_with_two_configs_and_no_visitor_ids(fake_hub, published, tmp_path):
    import datasets

    from rlhf_demo.hub_push import push_dataset

    store, _ = published
    push_dataset(store, "user/votes", TOKEN)
    local = download(fake_hub, "user/votes", "dataset", tmp_path / "dl")
    raw = b"".join(fake_hub.files("user/votes", "dataset").values())
    for secret in (b"secret-session", b"other-secret", b"secret-ip"):
        assert secret not in raw

    meta = front_matter((local / "README.md").read_text())
    configs = {c["config_name"]: c["data_files"][0]["path"] for c in meta["configs"]}
    assert set(configs) == {"preferences", "unpaired"} and meta["license"] == "apache-2.0"
    prefs = datasets.load_dataset(
        "json", data_files=str(local / configs["preferences"]), split="train", cache_dir=str(tmp_path / "ds-cache")
    )
    unpaired = datasets.load_dataset(
        "json", data_files=str(local / configs["unpaired"]), split="train", cache_dir=str(tmp_path / "ds-cache")
    )
    assert prefs.column_names == ["prompt", "chosen", "rejected", "reasons", "comment"] and len(prefs) == 1
    assert prefs[0]["chosen"] == [{"role": "assistant", "content": "Hi there!"}]
    assert (prefs[0]["reasons"], prefs[0]["comment"]) == (["unhelpful", "rude"], "B refuses.")  # why, as the rater said
    assert sorted(unpaired.column_names) == ["comment", "completion", "label", "prompt", "reasons"] and sorted(
        unpaired["label"]
    ) == [False, True]
    assert sorted(unpaired["comment"]) == ["", "Not friendly."]
    assert "`reasons`" in (local / "README.md").read_text()
    # The card's ``configs:`` as the datasets library reads them (a downloaded repo folder, like the Hub's).
    assert datasets.load_dataset(str(local), "preferences", split="train", cache_dir=str(tmp_path / "ds-cache"))[0] == prefs[0]
    assert len(datasets.load_dataset(str(local), "unpaired", split="train", cache_dir=str(tmp_path / "ds-cache"))) == 2


# ----- Spaces sync: the models survive a restart ---------------------------------------------


def test_sync_round_trip_restores_the_active_version_and_reward_model_after_a_wipe(fake_hub, published, settings, tiny_loaded):
    from rlhf_demo.hub_sync import HubSync, restore_from_hub
    from rlhf_demo.runtime import Runtime

    store, folder = published
    reward = settings.data_dir / "reward" / "run-7"
    reward.mkdir(parents=True)
    (reward / PROBE_FILE).write_bytes(b"probe")
    (reward / "normalizer.json").write_text('{"mean": 0, "std": 1}')
    original = {p.name: p.read_bytes() for p in folder.iterdir()}
    store.close()

    sync = HubSync(settings.data_dir, settings.db_path, "user/space-data", TOKEN, every_minutes=60)
    assert sync.push()
    assert not sync.push()  # nothing changed: no commit
    more = FeedbackStore(settings.db_path)
    add_feedback(more)
    more.close()
    assert sync.push()  # the DB snapshot again, the adapter not
    files = fake_hub.files("user/space-data", "dataset")
    assert {"snapshot/feedback.db", "adapters/v1/adapter_model.safetensors", f"reward/run-7/{PROBE_FILE}"} <= set(files)
    sent = [path for _, paths in fake_hub.commits for path in paths]
    assert sent.count("adapters/v1/adapter_model.safetensors") == 1 and sent.count("snapshot/feedback.db") == 2

    shutil.rmtree(settings.data_dir)  # a fresh Space container
    assert restore_from_hub(settings.db_path, "user/space-data", TOKEN, data_dir=settings.data_dir)
    assert {p.name: p.read_bytes() for p in (settings.adapters_dir / "v1").iterdir()} == original
    assert (settings.data_dir / "reward" / "run-7" / PROBE_FILE).read_bytes() == b"probe"

    runtime = Runtime(settings, tiny_loaded)
    try:
        assert runtime.store.active_version() == "v1"
        assert runtime.server.active == "v1" and not runtime.status.refused
    finally:
        runtime.close()


def test_restore_points_the_registry_at_the_new_data_dir_and_skips_rejected(fake_hub, published, settings, tmp_path):
    from rlhf_demo.hub_sync import HubSync, restore_from_hub

    store, folder = published
    rejected = copy_version(folder, settings, "v2")
    store.register_version("v2", str(rejected), "v1", "rejected", METRICS)
    store.close()
    HubSync(settings.data_dir, settings.db_path, "user/space-data", TOKEN, every_minutes=60).push()
    assert not any(name.startswith("adapters/v2/") for name in fake_hub.files("user/space-data", "dataset"))

    elsewhere = tmp_path / "moved"
    assert restore_from_hub(elsewhere / "feedback.db", "user/space-data", TOKEN, data_dir=elsewhere)
    moved = FeedbackStore(elsewhere / "feedback.db")
    try:
        row = next(v for v in moved.list_versions() if v["version"] == "v1")
        assert Path(row["path"]) == elsewhere / "adapters" / "v1" and (Path(row["path"]) / "adapter_config.json").is_file()
    finally:
        moved.close()


# ----- Spaces sync: a deletion reaches the Hub, a failed restore never overwrites it -----------


def test_delete_my_data_reaches_the_hub_snapshot_its_history_and_the_next_start(fake_hub, runtime, settings, tmp_path):
    """Vote, push, "Delete my data", shut down, start on a fresh disk: nothing of the visitor is
    left in the Hub's files, in any commit of its history, or in what a new start restores."""
    from rlhf_demo.hub_sync import HubSync, restore_from_hub
    from rlhf_demo.ui.handlers import ChatState, Handlers
    from rlhf_demo.visitors import Visitor

    handlers = Handlers(runtime)
    leaving, staying = Visitor("a" * 32, "ip-a"), Visitor("b" * 32, "ip-b")
    for visitor, text in ((leaving, "my secret plan zebra-42"), (staying, "a public question")):
        state = ChatState()
        list(handlers.chat(visitor, text, [], state, 0.7, 0.9, 2))
        handlers.like(visitor, state, 1, True)
    sync = HubSync(settings.data_dir, settings.db_path, "user/space-data", TOKEN, every_minutes=60).start()
    try:
        assert sync.push()
        assert any(b"zebra-42" in data for data in fake_hub.every_version("user/space-data", "dataset"))
        said = handlers.delete_my_data(leaving)
    finally:
        sync.close()
    assert "Hub backup no longer holds it" in said
    history = fake_hub.every_version("user/space-data", "dataset")
    assert history and not any(
        b"zebra-42" in data for data in history
    )  # neither the snapshot (free pages included) nor an older commit
    assert any(b"a public question" in data for data in history)
    assert len(fake_hub.repo("user/space-data", "dataset").commits) == 1 and fake_hub.squashes

    fresh = tmp_path / "fresh"
    assert restore_from_hub(fresh / "feedback.db", "user/space-data", TOKEN, data_dir=fresh)
    restored = FeedbackStore(fresh / "feedback.db")
    try:
        assert restored.counts()["thumbs_up"] == 1
    finally:
        restored.close()
    assert b"zebra-42" not in (fresh / "feedback.db").read_bytes()


def test_a_restore_that_fails_turns_syncing_off_instead_of_overwriting_the_hub(
    fake_hub, published, settings, tmp_path, monkeypatch
):
    from rlhf_demo.hub_sync import HubSync, HubUnavailable, restore_from_hub

    store, _ = published
    store.close()
    HubSync(settings.data_dir, settings.db_path, "user/space-data", TOKEN).push()
    assert not restore_from_hub(tmp_path / "new" / "feedback.db", "user/no-such-repo", TOKEN)  # nothing there yet: start empty
    monkeypatch.setattr(fake_hub, "_route", lambda *args: (503, {}, {"error": "down for maintenance"}))
    with pytest.raises(HubUnavailable, match="could not read the snapshot"):
        restore_from_hub(tmp_path / "new" / "feedback.db", "user/space-data", TOKEN)
    assert not (tmp_path / "new" / "feedback.db").exists()


def test_the_final_push_gives_up_after_its_grace_period_and_says_so(fake_hub, published, settings, monkeypatch, caplog):
    """A Hub that never answers cannot hold the shutdown past the grace period."""
    import logging
    import threading

    from rlhf_demo.hub_sync import HubSync

    caplog.set_level(logging.INFO, logger="rlhf_demo.hub_sync")
    store, _ = published
    store.close()
    release = threading.Event()
    route = fake_hub._route

    def stalled(*args):
        release.wait(60)
        return route(*args)

    monkeypatch.setattr(fake_hub, "_route", stalled)
    sync = HubSync(settings.data_dir, settings.db_path, "user/space-data", TOKEN).start()
    try:
        assert sync.close(grace_s=0.5) is False
    finally:
        release.set()
    assert "did not finish within" in caplog.text and "final push to user/space-data NOT done" in caplog.text


def test_push_data_after_a_deletion_leaves_no_deleted_text_in_the_dataset_history(fake_hub, published):
    from rlhf_demo.hub_push import push_dataset

    store, _ = published
    push_dataset(store, "user/votes", TOKEN)
    assert any(b"B refuses." in data for data in fake_hub.every_version("user/votes", "dataset"))
    store.delete_visitor_data("other-secret")  # the visitor who wrote "B refuses."
    push_dataset(store, "user/votes", TOKEN)
    history = fake_hub.every_version("user/votes", "dataset")
    assert not any(b"B refuses." in data for data in history) and any(b"Not friendly." in data for data in history)
