"""Registry look-ups made once per key for a while and shared by every layer that asks meanwhile.

containerd prepares an image's layers one after another; each needs the same answers about the
image (its manifest, the gzip indexes and the startup profile attached to it). ``Lookups`` keeps
one task per key (a reference or a manifest digest) for ``ttl`` seconds; a task that failed or was
cancelled is started again by the next caller. Use it on the event loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Lookups(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop, ttl: float) -> None:
        self.loop = loop
        self.ttl = ttl
        self._tasks: dict[str, tuple[float, asyncio.Task[T]]] = {}

    def task(self, key: str, start: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Task[T]:
        """The running or finished look-up for ``key``; ``start()`` makes one when there is none,
        when it is older than ``ttl`` or when it failed. Await it through ``asyncio.shield``: a
        caller that gives up must not cancel it for the others."""
        now = time.monotonic()
        for old in [k for k, (when, _) in self._tasks.items() if now - when > self.ttl]:
            del self._tasks[old]
        cached = self._tasks.get(key)
        if cached is not None:
            task = cached[1]
            if task.done() and (task.cancelled() or task.exception() is not None):
                cached = None
        if cached is None:
            cached = (now, self.loop.create_task(start()))
            # Nobody may await a look-up whose callers all gave up: its failure is not an error.
            cached[1].add_done_callback(lambda t: t.cancelled() or t.exception())
            self._tasks[key] = cached
        return cached[1]

    def peek(self, key: str) -> asyncio.Task[T] | None:
        """The look-up for ``key`` if one was started (and not yet forgotten), without starting one."""
        cached = self._tasks.get(key)
        return cached[1] if cached is not None else None

    def __len__(self) -> int:
        return len(self._tasks)
