"""When a range request's response began: a hook for whoever measures the link.

The fetch scheduler sets ``on_response`` (a context variable, so it follows the one request its
task makes and nothing else) before it asks a blob for bytes; the blob reader calls it when the
response's status line and headers have arrived, before reading the body. Time to first byte is
one round trip plus the server's latency; the body's duration is the transfer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

on_response: ContextVar[Callable[[], None] | None] = ContextVar("on_response", default=None)


def response_started() -> None:
    """Tell the current task's hook (if any) that a response has begun."""
    hook = on_response.get()
    if hook is not None:
        hook()
