"""Compare's "continue both": a follow-up that each side of a pair answers in its own conversation.

Why a module of its own: a continuation is not a new pair. Its two sides are fixed
conversations (A's history holds A's answers, B's holds B's), so there is no pair to choose:
each side gets one sample of its own history, from the version that wrote it. The server's
pair call takes one prompt; two single streams, advanced in turn, still share the engine's
decoding steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from rlhf_demo.modeling.adapters import AdapterError
from rlhf_demo.serving import Generation
from rlhf_demo.store.votes import same_questions
from rlhf_demo.ui.handlers.checks import UserError

NOT_A_PAIR = "These two answers are not a pair of this page; start a new round."
VERSION_GONE = "A version that wrote this pair is no longer served; start a new round."


def side_histories(rows: tuple[dict[str, Any], dict[str, Any]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Each side's conversation as the server recorded it: the prompt it answered, then its answer."""
    a, b = ([*row["prompt"], {"role": "assistant", "content": row["text"]}] for row in rows)
    if not same_questions(a, b):  # a forged state naming two of the visitor's unrelated answers
        raise UserError(NOT_A_PAIR)
    return a, b


def stream_both(
    server: Any,
    prompts: tuple[list[dict[str, str]], list[dict[str, str]]],
    versions: tuple[str, str],
    sampling: Any,
    should_stop: Callable[[], bool],
) -> Iterator[tuple[str, str] | list[Generation]]:
    """One answer per side to its own prompt: ``(text_a, text_b)`` as both grow, then both
    finished :class:`Generation` s. ``should_stop`` ends both at their next token."""
    streams = [server.stream(p, v, sampling, should_stop=should_stop) for p, v in zip(prompts, versions, strict=True)]
    texts = ["", ""]
    done: list[Generation | None] = [None, None]
    try:
        while None in done:
            for side, stream in enumerate(streams):
                if done[side] is None:
                    item = next(stream)
                    if isinstance(item, Generation):
                        done[side] = item
                    else:
                        texts[side] = item
            yield texts[0], texts[1]
    except AdapterError:  # evicted since the pair was written
        raise UserError(VERSION_GONE) from None
    finally:
        for stream in streams:
            stream.close()  # a side left early (Stop, an error, a client gone) cancels its request
    yield [g for g in done if g is not None]
