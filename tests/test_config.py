"""Settings: one dataclass tree, every field settable from the environment at any depth."""

from __future__ import annotations

import dataclasses

import pytest

from rlhf_demo.config import (
    GateConfig,
    PPOConfig,
    RewardConfig,
    SelectionSettings,
    SettingError,
    TrainingSettings,
    for_device,
    load_settings,
)


def test_the_training_tree_holds_each_default_once():
    training = load_settings(env={}).training
    assert (
        isinstance(training.ppo, PPOConfig)
        and isinstance(training.reward, RewardConfig)
        and isinstance(training.gate, GateConfig)
    )
    assert training == TrainingSettings()  # no second copy of a default anywhere on the way
    assert training.ppo.kl_stop < training.gate.max_kl  # PPO hands the gate a candidate it can accept


def test_nested_settings_come_from_the_environment_typed_by_their_annotation():
    env = {
        "RLHF_DEMO_TRAINING__EVERY_VOTES": "20",
        "RLHF_DEMO_TRAINING__PPO__LEARNING_RATE": "5e-4",
        "RLHF_DEMO_TRAINING__PPO__KL_STOP": "none",
        "RLHF_DEMO_TRAINING__PPO__ADVANTAGE": "gae",
        "RLHF_DEMO_TRAINING__PPO__SAMPLES_PER_PROMPT": "1",
        "RLHF_DEMO_TRAINING__REWARD__L2": "0.1",
        "RLHF_DEMO_TRAINING__REWARD__LAYER": "12",
        "RLHF_DEMO_TRAINING__GATE__CONFIDENCE": "0.9",
        "RLHF_DEMO_LORA__TARGET_MODULES": "q_proj, v_proj",
        "RLHF_DEMO_WORKER": "off",
    }
    s = load_settings(env=env)
    assert s.training.every_votes == 20 and s.training.ppo.learning_rate == 5e-4 and s.training.ppo.kl_stop is None
    assert (
        s.training.ppo.advantage == "gae"
        and s.training.reward.l2 == 0.1
        and s.training.reward.layer == 12
        and s.training.gate.confidence == 0.9
    )
    assert s.lora.target_modules == ("q_proj", "v_proj") and s.worker is False


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("RLHF_DEMO_TRAINING__EVERY_VOTES", "abc"),
        ("RLHF_DEMO_TRAINING__PPO__LEARNING_RATE", "nan"),
        ("RLHF_DEMO_TRAINING__PPO__LEARNING_RATE", "fast"),
        ("RLHF_DEMO_WORKER", "maybe"),
        ("RLHF_DEMO_PORT", "http"),
        ("PORT", "80a"),
    ],
)
def test_a_bad_value_names_the_variable(key, value):
    with pytest.raises(SettingError, match=key):
        load_settings(env={key: value})


def test_an_inconsistent_nested_setting_names_its_group():
    with pytest.raises(SettingError, match="RLHF_DEMO_TRAINING__PPO__"):
        load_settings(env={"RLHF_DEMO_TRAINING__PPO__SAMPLES_PER_PROMPT": "3"})  # does not divide the batch


def test_every_settings_dataclass_is_frozen():
    """A setting changes by ``dataclasses.replace``, never in place: a trainer holding the
    worker's PPOConfig cannot change what the next cycle reads."""

    def tree(obj):
        yield obj
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from tree(value)

    settings = load_settings(env={})
    for node in tree(settings):
        name = dataclasses.fields(node)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(node, name, getattr(node, name))
    assert dataclasses.replace(settings.training.ppo, steps=2).steps == 2


def test_each_poll_interval_and_vote_cap_has_one_field_of_its_own():
    env = {
        "RLHF_DEMO_REGISTRY_POLL_SECONDS": "1",
        "RLHF_DEMO_TRAINING__VOTE_POLL_SECONDS": "2",
        "RLHF_DEMO_LIMITS__MAX_TRAINING_VOTES": "7",
    }
    s = load_settings(env=env)
    assert (s.registry_poll_seconds, s.training.vote_poll_seconds, s.limits.max_training_votes) == (1.0, 2.0, 7)
    assert (
        not hasattr(s, "poll_seconds")
        and not hasattr(s.training, "poll_seconds")
        and not hasattr(s.training, "max_votes_per_session")
    )


def test_settings_left_to_the_device_take_its_measured_defaults():
    """Best-of-n and the engine's batch cost a CPU 4 rows a visitor and a GPU nearly nothing
    (docs/learning.md): each device gets its own, and a value the owner sets wins on both."""
    cpu, cuda = for_device(load_settings(env={}), "cpu"), for_device(load_settings(env={}), "cuda:0")
    assert (cpu.selection.best_of, cpu.max_batch) == (4, 32)
    assert (cuda.selection.best_of, cuda.max_batch) == (8, 64)
    assert cuda.selection.candidates == cpu.selection.candidates == SelectionSettings().candidates  # nothing else moves
    owner = load_settings(env={"RLHF_DEMO_SELECTION__BEST_OF": "1", "RLHF_DEMO_MAX_BATCH": "16"})
    for device in ("cpu", "cuda"):
        chosen = for_device(owner, device)
        assert (chosen.selection.best_of, chosen.max_batch) == (1, 16)
    with pytest.raises(SettingError, match="SELECTION.*best_of"):
        load_settings(env={"RLHF_DEMO_SELECTION__BEST_OF": "0"})
