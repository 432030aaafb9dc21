"""What every tab's event adapters share: who the visitor is, and errors the visitor can read.

:class:`UserError` and store errors become ``gr.Error`` messages for the visitor (logged in
one line, no traceback); anything else becomes a generic message, never Python's exception
text. Who the visitor is comes from the signed cookie the
:class:`~rlhf_demo.visitors.VisitorMiddleware` issues, never from Gradio's session hash.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from rlhf_demo.runtime import Runtime
from rlhf_demo.serving import PromptRefused
from rlhf_demo.serving.interface import EngineError
from rlhf_demo.store import InvalidInputError, StoreBusyError, StoreError, UnknownIdError
from rlhf_demo.ui.handlers import UserError
from rlhf_demo.visitors import Visitor, identify

log = logging.getLogger(__name__)
GENERIC_ERROR = "The server could not complete this request; please try again."
# Toasts are page-wide in Gradio: short-lived, so that they neither pile up ("Error (2)") nor
# follow the visitor to another tab for long.
TOAST_SECONDS = 5
# Store errors whose messages are written for people; others may carry SQLite's text.
PLAIN_STORE_ERRORS = (InvalidInputError, UnknownIdError, StoreBusyError)


def translate(exc: Exception, where: str) -> gr.Error:
    """A visitor-facing ``gr.Error``: our own refusals as they are (one log line, no
    traceback: they are expected), anything else generic (with a traceback in the log:
    that is a bug)."""
    if isinstance(exc, (UserError, PromptRefused, EngineError)) or isinstance(exc, PLAIN_STORE_ERRORS):
        log.info("refused %s: %s", where, str(exc)[:200])
        return gr.Error(str(exc), duration=TOAST_SECONDS, print_exception=False)
    if isinstance(exc, StoreError):
        log.warning("store error in %s: %s", where, str(exc)[:200])
    else:
        log.error("unexpected error in %s", where, exc_info=exc)
    return gr.Error(GENERIC_ERROR, duration=TOAST_SECONDS, print_exception=False)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every error into a visible ``gr.Error`` (plain or generator handlers)."""
    where = getattr(fn, "__name__", "handler")

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:  # noqa: BLE001 - translated, never shown raw
                raise translate(exc, where) from None

        return gen

    @functools.wraps(fn)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - translated, never shown raw
            raise translate(exc, where) from None

    return plain


def visitor_of(runtime: Runtime, request: gr.Request | None) -> Visitor:
    """The visitor behind a request, from the server-signed cookie."""
    return identify(request, runtime.signer, runtime.settings.trust_proxy)


PRIVATE: dict[str, Any] = {"api_visibility": "private"}  # events no API client needs
