"""Helpers for tests of the lazy path: an in-memory blob, a background event loop, polling."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class MemoryBlob:
    """A blob served from memory, recording requests; can fail or stall on demand."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.requests: list[list[tuple[int, int]]] = []
        self.arrived = 0  # requests that reached the blob, stalled ones included
        self.fail: Exception | None = None
        self.stall = asyncio.Event()
        self.stall.set()

    @property
    def bytes_served(self) -> int:
        return sum(b - a for req in self.requests for a, b in req)

    async def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.arrived += 1
        await self.stall.wait()
        if self.fail is not None:
            raise self.fail
        self.requests.append(list(ranges))
        return [bytes(self.data[a:b]) for a, b in ranges]


@contextmanager
def running_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread, as the daemon's loop runs beside FUSE threads; pending
    tasks are cancelled before it stops."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:

        async def cancel_pending() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_pending(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
