"""All settings in one dataclass tree, with environment overrides and per-device defaults.

Every field can be set from the environment as ``RLHF_DEMO_<FIELD>`` (upper case); the CLI
maps its flags onto the same fields. Defaults are chosen for a free 2-vCPU Space and are
upgraded automatically on CUDA (see ``resolve_precision``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_demo.config_env import SettingError, coerce, from_env

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL = "tiny"
QUANTIZATIONS = ("auto", "nf4", "bf16", "fp32")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
ENGINES = ("embedded", "vllm")  # the policy in this process, or a vLLM server (docs/serving.md)


@dataclass(frozen=True)
class SamplingBounds:
    """Defaults and hard bounds for generation; requests outside are clamped, not refused."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 160
    min_temperature: float = 0.0
    max_temperature: float = 1.5
    min_top_p: float = 0.05
    max_max_new_tokens: int = 512


@dataclass(frozen=True)
class Limits:
    """Abuse limits for a public demo: each breach is a clear message, never a crash."""

    max_message_chars: int = 4000
    max_turns: int = 20
    votes_per_minute: int = 30  # per visitor (server-issued id)
    max_concurrent_generations: int = (
        8  # generation events Gradio runs at once; they share the engine's decode steps (load p95 14 -> 11 s, docs/benchmarks.md)
    )
    votes_per_minute_per_ip: int = 120  # per client address: bounds cookie-dropping clients
    max_training_share: float = 0.10  # of the reward model's rows, per visitor and per address
    max_training_votes: int = 60  # per visitor and kind (pairs, thumbs): one visitor cannot dominate the RM
    max_request_bytes: int = 1 << 20  # any request body; 20 turns of 4000-character messages fit


@dataclass(frozen=True)
class LoraSettings:
    """LoRA shape of the policy adapters (small: they are retrained often)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class RewardConfig:
    """Reward-model settings: a linear probe on the frozen base's answer features (see
    :mod:`rlhf_demo.reward.model` for why), refit on all votes every cycle."""

    l2: float = 1e-2
    """L2 penalty on the probe's weights (over standardised features). Measured flat from
    1e-3 to 1 on 200 votes of eight raters (docs/learning.md)."""
    layer: int | None = None
    """Hidden layer whose answer-mean the probe reads; None: two thirds of the depth."""
    thumb_weight: float = 0.5
    """Weight of the logistic thumb loss next to Bradley-Terry on pairs; 0 ignores thumbs
    (they still form 👍 x 👎 pairs). Below 1 because a thumb is a noisier absolute signal."""
    max_thumb_pairs_per_prompt: int = 4
    """Cap on pairs made from 👍 x 👎 answers to one prompt, so a prompt with many
    thumbs does not outweigh the rest of the data."""
    folds: int = 5
    """Cross-validation folds (by prompt) that measure how well the probe predicts votes it
    was not fitted on; the final probe is fitted on all votes."""
    confidence: float = 0.8
    """One-sided confidence of the reported lower bound on that agreement."""
    batch_size: int = 16
    """Answers per forward pass when reading features."""
    max_length: int = 512
    """Tokens per sequence; longer ones lose tokens on the LEFT (the prompt's start), so
    the answer is always kept."""
    max_iterations: int = 200
    """L-BFGS iterations of one fit (a fit on a few thousand votes takes well under a second)."""
    max_seconds: float | None = None
    """Time budget for reading features; None: unlimited. Answers not read by then are
    left out of training (logged in the metrics)."""
    ensemble: int = 8
    """Bootstrap probes fitted beside the main one: their spread is the reward model's
    epistemic uncertainty, which Compare's double Thompson sampling explores; 0: none."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 8 or self.folds < 2 or self.max_iterations < 1:
            raise ValueError("need batch_size >= 1, max_length >= 8, folds >= 2 and max_iterations >= 1")
        if self.l2 < 0 or self.thumb_weight < 0 or self.ensemble < 0:
            raise ValueError("l2, thumb_weight and ensemble must be >= 0")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")


@dataclass(frozen=True)
class PPOConfig:
    """PPO settings in the spirit of TRL's (<= 0.11) ``PPOConfig``, sized for a live demo
    with a LoRA policy that learns from a few hundred votes on a small CPU (figures:
    docs/learning.md). ``PPOTrainer.train`` runs ``steps`` of these per worker cycle."""

    learning_rate: float = 1e-3
    """Adam LR for the LoRA adapter (and the value head with ``advantage="gae"``). TRL's
    1.41e-5 is for full fine-tuning; a LoRA delta trained from zero wants much more, and a
    cycle has only a few steps: 1e-4 did not move the policy in 15 steps, 1e-3 did."""
    steps: int = 6
    """PPO iterations (rollout batch + updates) per ``PPOTrainer.train`` call (a cycle)."""
    batch_size: int = 32
    """Rollouts (answers) per step: ``batch_size / samples_per_prompt`` prompts, sampled in
    together by the serving engine (on a CPU batch 32 decodes ~8x the tokens/s of batch 1)."""
    samples_per_prompt: int = 4
    """Answers sampled per prompt in a step: the group that RLOO's baseline is taken over."""
    mini_batch_size: int = 8
    """Rollouts per gradient step; must divide ``batch_size``."""
    ppo_epochs: int = 2
    """Passes over each rollout batch (TRL: 4 on batches of hundreds; here 2 on 32)."""
    advantage: str = "rloo"
    """``"rloo"``: REINFORCE leave-one-out (Ahmadian et al. 2024) - the advantage of an answer
    is its KL-penalised score minus the mean of the other answers to the same prompt, no
    value head; ``"gae"``: GAE on a value head trained alongside and kept with each version
    (classic RLHF PPO). On the same runs neither won (docs/learning.md, RLOO vs GAE)."""
    gamma: float = 1.0
    """Discount (GAE); 1.0: the score comes once, at the end of a short episode (TRL)."""
    lam: float = 0.95
    """GAE lambda (TRL default)."""
    cliprange: float = 0.2
    """Policy ratio clip (TRL default)."""
    cliprange_value: float = 0.2
    """Value clip around the rollout values (TRL default)."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss (TRL default)."""
    init_kl_coef: float = 0.0
    """Initial beta of the KL penalty in the reward (Ziegler et al., TRL <= 0.11: minus beta
    times the answer's sampled KL, summed over its tokens). Off by default: ``kl_loss_coef``
    does that job without its noise (docs/learning.md, the KL as a loss term)."""
    kl_loss_coef: float = 0.2
    """Weight of the exact KL to the reference (over the vocabulary, at every state the
    rollouts visited, token mean) in the loss. The reward's penalty is a one-sample estimate
    per answer; this term has no sampling noise at a state, so it pulls back the directions
    the policy drifted in on noise alone (docs/learning.md: 0.2 measured best of
    0.2 / 0.5 / 1.0). 0: off."""
    target_kl: float = 6.0
    """Target KL per answer (summed over its tokens) of the adaptive controller."""
    horizon: int = 10000
    """Adaptive KL horizon in responses (TRL default)."""
    adap_kl_ctrl: bool = True
    """Adapt the reward's KL coefficient toward ``target_kl``; False keeps ``init_kl_coef``
    (a coefficient of 0 stays 0)."""
    kl_stop: float | None = 4.8
    """Stop training once a step's rollouts show a KL to the reference above this (nats per
    answer), and undo the update that led there (CleanRL's ``target_kl`` break, per step).
    Kept below ``GateConfig.max_kl`` so a cycle hands the gate a candidate it can accept."""
    chosen_loss_coef: float = 0.0
    """The answers voters preferred on PPO's own prompts (A/B winners, 👍 answers) join every
    epoch once each, their tokens weighted in the loss like rollout tokens with this advantage
    (whitened units: 1.0 = one standard deviation better than the rollouts' mean). The crowd's
    own picks pull the policy toward what they show, where the reward model can only score
    what the rollouts happen to write (InstructGPT's PPO-ptx term, with the votes as its
    data). 0: off."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    early_stop_kl: float | None = 0.1
    """Skip the remaining minibatches of a PPO step when the per-token ``approx_kl``
    (0.5 * mean(dlogp^2)) exceeds this: it fires only on runaway updates. None disables it."""
    temperature: float = 0.7
    """Sampling temperature for rollouts; the same value must scale the logits when
    computing logprobs for training (Huang et al.: temperature detail)."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts; 1.0 keeps sampling on-policy."""
    max_new_tokens: int = 40
    """Response length cap for rollouts, the gate and the Compare pairs' training use."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses truncated before EOS; None: no penalty."""
    whiten_rewards: bool = False
    """Whiten per-token rewards (shift_mean=False) before GAE (TRL default False)."""

    def __post_init__(self) -> None:
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"mini_batch_size {self.mini_batch_size} must divide batch_size {self.batch_size}")
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(f"samples_per_prompt {self.samples_per_prompt} must divide batch_size {self.batch_size}")
        if self.advantage not in ("rloo", "gae"):
            raise ValueError(f"advantage must be 'rloo' or 'gae', got {self.advantage!r}")
        if self.chosen_loss_coef < 0:
            raise ValueError(f"chosen_loss_coef must be >= 0, got {self.chosen_loss_coef}")
        if self.advantage == "rloo" and self.samples_per_prompt < 2:
            raise ValueError("advantage 'rloo' needs samples_per_prompt >= 2 (a leave-one-out baseline)")


@dataclass(frozen=True)
class GateConfig:
    """When a candidate is served: better than the active version with confidence, close
    enough to the reference, and sane (worker/gate.py)."""

    prompts: int = 16
    """Held-out store prompts the gate samples on (never used by PPO)."""
    samples_per_prompt: int = 4
    """Answers per prompt and side (candidate, active): the comparison is paired by prompt.
    More while the store holds fewer prompts (:meth:`answers_per_prompt`)."""
    confidence: float = 0.8
    """One-sided level of the bootstrap lower bound on the candidate's mean reward gain."""
    min_improvement: float = 0.0
    """That lower bound must exceed this (normalized reward units, ~std of the RM's scores)."""
    max_kl: float = 6.0
    """Nats per answer to the reference, mean over the held-out answers."""
    max_degenerate_fraction: float = 0.25
    min_reward_agreement: float = 0.5
    """No PPO while the reward model's lower bound on agreeing with votes it was not fitted
    on (cross-validated, ``RewardConfig.confidence``) is at or below this: optimising a
    reward model that cannot yet predict the voters only moves the policy at random."""
    min_distinct_ratio: float = 0.3
    """Distinct word 3-grams / all 3-grams under which one answer counts as looping."""

    def answers_per_prompt(self, held_out: int) -> int:
        """Answers per held-out prompt and side when the store holds ``held_out`` of them:
        fewer than ``prompts`` get more each, up to the answers a full set would get (at most
        4x ``samples_per_prompt``). At 10-20 votes there are 3-4, and 4 answers each (12-16
        paired units) left candidates the reward model found better (+0.075) just under the
        bound (docs/benchmarks.md, live loop)."""
        wanted = -(-self.prompts * self.samples_per_prompt // max(1, held_out))  # ceil
        return min(4 * self.samples_per_prompt, max(self.samples_per_prompt, wanted))


@dataclass(frozen=True)
class TrainingSettings:
    """When and how much the background worker trains (small: a cycle must fit a free CPU).

    Every field, nested ones too, is an environment variable:
    ``RLHF_DEMO_TRAINING__EVERY_VOTES=20``, ``RLHF_DEMO_TRAINING__PPO__LEARNING_RATE=5e-4``."""

    every_votes: int = 10  # train after this many new votes ...
    every_minutes: float = 15.0  # ... or this long after the last cycle if any vote came in
    min_votes: int = 8  # no cycle below this many votes in total
    time_budget_s: float = 900.0  # whole cycle; each phase stops early to respect it
    nice: int = 10  # worker CPU priority, so chat stays responsive
    resume_rejected: bool = True  # PPO continues from the last promising rejected candidate (worker/cycle.resume_point)
    vote_poll_seconds: float = 5.0  # how often the idle worker looks for new votes and a train-now request
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    gate: GateConfig = field(default_factory=GateConfig)


SELECTION_RULES = ("dts", "passive")


@dataclass(frozen=True)
class SelectionSettings:
    """Which answers visitors see (rlhf_demo/selection.py; figures: docs/learning.md).

    ``RLHF_DEMO_SELECTION__RULE=passive`` shows two plain samples in Compare, as before."""

    rule: str = "dts"
    """Compare's pair: ``dts`` picks 2 of ``candidates`` samples by double Thompson sampling
    over the reward ensemble (two plain samples until the first ensemble exists);
    ``passive``: two samples. On base answers, 67 votes, 3 seeds: decisive pairs 0.33 vs 0.26
    (enthusiasm) and 0.16 vs 0.14 (keyword) for ``dts`` vs ``passive`` (docs/learning.md, pair selection)."""
    candidates: int = 4
    """Samples a ``dts`` Compare round draws, in one batched call. 4: a decisive pair exists
    among 4 base samples about as often as among 8 (keyword 20 / 23 %, enthusiasm 40 / 47 %),
    and a round of 4 plus the reward model's reading took 1.31x today's two samples on this
    CPU (docs/learning.md, pair selection)."""
    candidate_temperature: float | None = None
    """Temperature of those samples; None: the visitor's (the served policy's)."""
    best_of: int | None = None
    """A chat answer is the trusted reward model's pick of this many samples (1: one
    streamed sample; until a trusted reward model exists every answer is one). None: the
    device's (:data:`DEVICE_DEFAULTS`: 4 on a CPU, 8 on CUDA). ``RLHF_DEMO_SELECTION__BEST_OF=1``
    streams again."""

    def __post_init__(self) -> None:
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"selection rule must be one of {SELECTION_RULES}, got {self.rule!r}")
        if not 2 <= self.candidates <= 16 or (self.best_of is not None and not 1 <= self.best_of <= 16):
            raise ValueError("need 2 <= candidates <= 16 and 1 <= best_of <= 16")


@dataclass(frozen=True)
class UiSettings:
    """What the Space owner says to visitors: ``RLHF_DEMO_UI__GUIDELINES`` (Markdown) wins over
    a ``guidelines.md`` in the data dir; with neither, a default text (rlhf_demo/ui/guidelines.py)."""

    guidelines: str = ""


@dataclass(frozen=True)
class Settings:
    """Everything the app, the worker and the CLI need to know."""

    model: str = DEFAULT_MODEL
    data_dir: Path = Path("data")
    quantization: str = "auto"
    compute_dtype: str = "auto"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    admin_token: str = ""
    trust_proxy: bool = False  # read X-Forwarded-For (behind a proxy that sets it, e.g. Spaces)
    worker: bool = True
    registry_poll_seconds: float = 3.0  # how often the server looks for a newly published version
    adapter_cache: int = 3
    max_batch: int | None = None
    """Answers the embedded engine decodes in one step; more wait for a free row. None: the
    device's (:data:`DEVICE_DEFAULTS`: 32 on a CPU, 64 on CUDA)."""
    engine: str = "embedded"
    engine_url: str = ""  # the vLLM server's base URL, e.g. http://127.0.0.1:8123
    sampling: SamplingBounds = field(default_factory=SamplingBounds)
    limits: Limits = field(default_factory=Limits)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    ui: UiSettings = field(default_factory=UiSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "feedback.db"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def worker_dir(self) -> Path:
        return self.data_dir / "worker"

    def validate(self) -> Settings:
        """Fail early with a message that names the setting, instead of deep in torch."""
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "vllm" and not self.engine_url.startswith(("http://", "https://")):
            raise ValueError(f"engine vllm needs engine_url, the vLLM server's http(s) URL; got {self.engine_url!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        return self


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Defaults, then ``RLHF_DEMO_*`` / platform variables, then explicit overrides (CLI)."""
    env = dict(os.environ if env is None else env)
    values = from_env(Settings(), "RLHF_DEMO_", env)
    # Platform conventions: Spaces/Docker set these, and they win over our defaults.
    for key in ("GRADIO_SERVER_PORT", "PORT"):
        if key in env and "port" not in values:
            values["port"] = coerce(env[key], "int", key)
    if "GRADIO_SERVER_NAME" in env and "host" not in values:
        values["host"] = env["GRADIO_SERVER_NAME"]
    if "trust_proxy" not in values and env.get("SPACE_ID"):
        values["trust_proxy"] = True  # Spaces' proxy sets X-Forwarded-For
    if "admin_token" not in values and env.get("ADMIN_TOKEN"):
        values["admin_token"] = env["ADMIN_TOKEN"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"])
    return dataclasses.replace(Settings(), **values).validate()


def resolve_device(requested: str = "auto") -> str:
    """``cuda`` when present unless told otherwise; the code runs the same on CPU. A device
    this machine cannot use is a SettingError that says what to pass instead."""
    if requested == "cpu":
        return requested
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = requested.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise SettingError(f"device {requested!r} is not one of auto, cpu, cuda, cuda:N (RLHF_DEMO_DEVICE / --device)")
    if not torch.cuda.is_available():
        raise SettingError(f"device {requested!r}: this torch {torch.__version__} sees no CUDA GPU; use --device cpu or auto")
    if int(index or 0) >= torch.cuda.device_count():
        raise SettingError(
            f"device {requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return requested


@dataclass(frozen=True)
class DeviceDefaults:
    """Settings whose best value differs between a CPU and a GPU, each measured on both; a
    setting left None takes its device's (:func:`for_device`)."""

    max_batch: int
    """Engine rows per decode step. CPU 32: 8 visitors' best-of-4 answers at once; at 32
    streams on 2 threads it decodes 1.26x (NF4) and 1.44x (fp32) the tokens of 16, first
    tokens 2.8 s instead of 7.2 s. CUDA 64: 8 visitors' best-of-8; at 64 streams an H200
    decoded 821 tokens/s against 469 at 32, first tokens 0.16 s instead of 2.6 s
    (bench/results/serve-batch.json)."""
    best_of: int
    """Samples a chat answer is picked from. On the versions and reward models that 200 votes
    taught (2 seeds x 3 raters), best of 4 served won +0.20 (brevity), +0.05 (enthusiasm),
    +0.05 (keyword) more against the base than one sample, best of 8 another +0.06 / +0.02 /
    +0.03. CPU 4: 4 answers of 160 tokens and their reading took 1.40x one answer on 2
    threads, 8 took 1.73x, and each answer holds n rows of a 2-core engine that 8 visitors
    share. CUDA 8: on an H200 (NF4, bfloat16) 4 took 1.24x one answer and 8 took 1.21x: a
    step of 8 rows costs what a step of one does (docs/benchmarks.md, "On a GPU";
    bench/results/best-of.json)."""


DEVICE_DEFAULTS = {"cpu": DeviceDefaults(max_batch=32, best_of=4), "cuda": DeviceDefaults(max_batch=64, best_of=8)}


def device_defaults(device: str) -> DeviceDefaults:
    """The defaults of ``device`` (``cpu``, ``cuda`` or ``cuda:N``)."""
    return DEVICE_DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]


def for_device(settings: Settings, device: str) -> Settings:
    """``settings`` with every field left None to its device's default filled in: what the
    serving process runs and what a benchmark records."""
    chosen = device_defaults(device)
    return dataclasses.replace(
        settings,
        max_batch=chosen.max_batch if settings.max_batch is None else settings.max_batch,
        selection=dataclasses.replace(
            settings.selection, best_of=chosen.best_of if settings.selection.best_of is None else settings.selection.best_of
        ),
    )


def resolve_precision(quantization: str, compute_dtype: str, device: str, role: str = "serve") -> tuple[str, str]:
    """Pick storage and compute precision per device and role (figures: docs/precision.md).

    Serving: NF4 storage; on CUDA with bfloat16 compute (the QLoRA recipe), on CPU with
    float32 compute. On CPU ``load_model`` then refines ``auto`` for the machine at hand
    (modeling/precision.py: a short timed decode of each candidate; the fastest serves). Training on CPU (``role="train"``,
    the worker): float32, because a bfloat16 backward is ~30x slower there and NF4's
    backward takes the slower dequantize path.
    """
    cuda = device.startswith("cuda")
    if quantization == "auto":
        quantization = "fp32" if role == "train" and not cuda else "nf4"
    if compute_dtype == "auto":
        compute_dtype = "bfloat16" if quantization == "bf16" or cuda else "float32"
    return quantization, compute_dtype
