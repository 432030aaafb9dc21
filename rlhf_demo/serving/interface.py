"""The serving engine as the rest of the app sees it: one interface, two implementations.

:class:`~rlhf_demo.serving.server.PolicyServer` (embedded: the policy in this process) and
:class:`~rlhf_demo.serving.vllm_engine.VllmEngine` (a vLLM server over its OpenAI-compatible
API) both satisfy :class:`ServingEngine`; the UI, handlers, store and benches call only this,
so none of them knows which engine runs. :class:`EngineBase` holds what both do the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rlhf_demo.config import SamplingBounds
from rlhf_demo.serving import prompts
from rlhf_demo.serving.prompts import PromptBudget
from rlhf_demo.serving.sampling import Generation, Sampling


class EngineError(RuntimeError):
    """The engine could not answer; the message is written for visitors (no server internals)."""


@runtime_checkable
class ServingEngine(Protocol):
    """Versions by name (the registry's), one pinned per request; answers as text and :class:`Generation`."""

    @property
    def active(self) -> str:
        """The version a request without one is served by."""

    @property
    def loaded_versions(self) -> list[str]:
        """Versions that can be served now without a load."""

    @property
    def last_load_ms(self) -> float:
        """How long the last load held up generation (0 for a hot-swap)."""

    @property
    def last_prepare_ms(self) -> float:
        """How long the last load took in all."""

    @property
    def last_load_mode(self) -> str:
        """How the last load ran (shown on the dashboard)."""

    def load_version(self, version: str, path: str | Path) -> None:
        """Make ``version`` (a PEFT folder) servable; AdapterError when the engine refuses it."""

    def swap_to(self, version: str) -> None:
        """Serve ``version`` (already loaded) to new requests; running answers keep theirs."""

    def unload_unused(self, keep: int) -> list[str]:
        """Drop versions nobody serves beyond the newest ``keep``; returns the ones dropped."""

    def close(self) -> None: ...

    def sampling(
        self, temperature: float | None = None, top_p: float | None = None, max_new_tokens: int | None = None
    ) -> Sampling:
        """Loose values (None: the default) within the configured bounds."""

    def encode(self, messages: Any) -> tuple[list[dict[str, str]], Any]:
        """The conversation within the prompt budget and its token ids (PromptRefused beyond)."""

    def stream(
        self,
        messages: list[dict[str, str]],
        version: str | None = None,
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[str | Generation]:
        """The answer's text as it grows, then the finished :class:`Generation`; ``should_stop``
        (or leaving the iterator) ends it early, ``finish_reason="cancelled"``."""

    def generate(
        self, messages: list[dict[str, str]], version: str | None = None, sampling: Sampling | None = None
    ) -> Generation: ...

    def stream_pair(
        self,
        messages: list[dict[str, str]],
        versions: tuple[str, str],
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[str, ...] | list[Generation]]:
        """Answers to one prompt, one per version: the texts as they grow, then the list of
        results; ``should_stop`` ends every row at its next token (Compare's Stop)."""

    def generate_pair(
        self, messages: list[dict[str, str]], versions: tuple[str, str], sampling: Sampling | None = None
    ) -> list[Generation]: ...

    def stream_samples(
        self,
        messages: list[dict[str, str]],
        count: int,
        version: str | None = None,
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[str, ...] | list[Generation]]:
        """``count`` answers of one version to one prompt, decoded together (Compare's candidates,
        best-of-n): the texts as they grow, then the finished answers."""

    def generate_many(
        self, conversations: list[list[dict[str, str]]], version: str | None = None, sampling: Sampling | None = None
    ) -> list[Generation]:
        """One answer per conversation, decoded together; the same conversation n times is n
        samples of one prompt (best-of-n, k candidates), which an engine may send as one request."""


class EngineBase:
    """What every engine does the same way, whatever decodes: sampling within the configured
    bounds, the conversation within the prompt budget, and the non-streaming forms of its
    streams. A subclass sets ``tokenizer``, ``bounds`` and ``budget`` and writes the streams."""

    tokenizer: Any
    bounds: SamplingBounds
    budget: PromptBudget

    def sampling(
        self, temperature: float | None = None, top_p: float | None = None, max_new_tokens: int | None = None
    ) -> Sampling:
        """Loose values (None: the default) as a :class:`Sampling` within the configured bounds."""
        return Sampling.clamp(self.bounds, temperature, top_p, max_new_tokens)

    def encode(self, messages: Any) -> tuple[list[dict[str, str]], Any]:
        """The conversation within the prompt budget and its token ids (PromptRefused beyond)."""
        return prompts.encode(self.tokenizer, messages, self.budget)

    def stream(
        self,
        messages: list[dict[str, str]],
        version: str | None = None,
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[str | Generation]:
        raise NotImplementedError

    def stream_pair(
        self,
        messages: list[dict[str, str]],
        versions: tuple[str, str],
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[str, ...] | list[Generation]]:
        raise NotImplementedError

    def generate(
        self, messages: list[dict[str, str]], version: str | None = None, sampling: Sampling | None = None
    ) -> Generation:
        """The non-streaming form of :meth:`stream`."""
        *_, result = self.stream(messages, version, sampling)
        assert isinstance(result, Generation)
        return result

    def generate_pair(
        self, messages: list[dict[str, str]], versions: tuple[str, str], sampling: Sampling | None = None
    ) -> list[Generation]:
        """The non-streaming form of :meth:`stream_pair`."""
        *_, result = self.stream_pair(messages, versions, sampling)
        assert isinstance(result, list)
        return result
