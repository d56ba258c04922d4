"""A simulated link in virtual time, for testing the fetch scheduler deterministically.

``VirtualTimeLoop`` is an asyncio loop whose clock jumps to the next timer whenever nothing is
ready to run, so a simulated second takes microseconds and every run gives the same times.
``SimLink`` is a bottleneck link: a request costs one round trip before its first byte, then all
transfers in flight share the bandwidth equally (processor sharing, as competing TCP flows do);
``SimBlob`` is a blob behind it whose bytes are a function of their offset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from snapshotter.fetcher.timing import response_started


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._virtual_now = 0.0

    def time(self) -> float:
        return self._virtual_now

    def _run_once(self) -> None:
        ready = self._ready  # type: ignore[attr-defined]
        scheduled = self._scheduled  # type: ignore[attr-defined]
        if not ready and scheduled:
            when = scheduled[0].when()
            if when > self._virtual_now:
                self._virtual_now = when
        super()._run_once()  # type: ignore[misc]


@contextmanager
def virtual_time() -> Iterator[VirtualTimeLoop]:
    loop = VirtualTimeLoop()
    try:
        yield loop
    finally:
        loop.close()


@dataclass
class _Transfer:
    remaining: float
    done: asyncio.Future[None]


@dataclass
class SimLink:
    """One bottleneck: ``rtt`` seconds to the first byte, then ``bandwidth`` bytes/s shared."""

    loop: asyncio.AbstractEventLoop
    rtt: float
    bandwidth: float
    requests: list[tuple[float, int]] = field(default_factory=list)  # (start time, bytes)
    _active: list[_Transfer] = field(default_factory=list)
    _updated: float = 0.0
    _timer: asyncio.TimerHandle | None = None

    async def transfer(self, nbytes: int) -> None:
        self.requests.append((self.loop.time(), nbytes))
        await asyncio.sleep(self.rtt)
        response_started()
        if nbytes <= 0:
            return
        self._advance()
        transfer = _Transfer(float(nbytes), self.loop.create_future())
        self._active.append(transfer)
        self._schedule()
        await transfer.done

    def _advance(self) -> None:
        now = self.loop.time()
        if self._active:
            share = self.bandwidth / len(self._active) * (now - self._updated)
            for t in self._active:
                t.remaining -= share
        self._updated = now
        for t in [t for t in self._active if t.remaining <= 1e-6]:
            self._active.remove(t)
            if not t.done.done():
                t.done.set_result(None)

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._active:
            shortest = min(t.remaining for t in self._active)
            self._timer = self.loop.call_later(shortest * len(self._active) / self.bandwidth, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._advance()
        self._schedule()

    @property
    def in_flight(self) -> int:
        return len(self._active)


_BYTES = bytes(range(256))


def pattern(start: int, end: int) -> bytes:
    """Bytes [start, end) of a blob whose byte at offset i is i mod 256 (cheap for large ranges)."""
    n = end - start
    first = start % 256
    return ((_BYTES[first:] + _BYTES[:first]) * (n // 256 + 2))[:n]


@dataclass
class SimBlob:
    """A blob reached over ``link``: one request per ``read_ranges`` call."""

    link: SimLink
    size: int
    calls: int = 0

    async def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.calls += 1
        await self.link.transfer(sum(b - a for a, b in ranges))
        return [pattern(a, b) for a, b in ranges]
