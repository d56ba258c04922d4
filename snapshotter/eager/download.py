"""One layer blob fetched front to back through its registry's fetch scheduler, for a thread that
unpacks it as the bytes arrive.

``LayerDownload`` is a scheduler ``Feeder``: when the link has room, the scheduler asks it for its
next piece (of the size the scheduler chooses from the link, in order), fetches it among all the
other work on that registry (reads containers are blocked on still go first) and hands the bytes
back, possibly out of order. The unpacking thread takes them in order with ``read``. At most
``window`` bytes are fetched or in flight beyond what that thread has taken, so memory stays
bounded and a slow unpacker leaves the link to the other layers instead of buffering.

``next_job`` and the deliveries run on the event loop; ``read`` on the unpacking thread; ``close``
from either. A failed piece (the blob reader already retried it) fails the download: ``read``
raises ``DownloadError`` with the reason.
"""

from __future__ import annotations

import asyncio
import threading

from snapshotter.scheduler import BlobSource, FetchScheduler, Job, WorkClass

# Eager layers are what a pull waits on right now: the startup class, after on-demand reads.
WORK = WorkClass.STARTUP


class DownloadError(Exception):
    """The blob could not be fetched (``cause`` says why) or the download was closed."""


class LayerDownload:
    def __init__(
        self,
        source: BlobSource,
        size: int,
        scheduler: FetchScheduler,
        loop: asyncio.AbstractEventLoop,
        *,
        window: int,
        min_piece: int = 0,
    ) -> None:
        self.source = source
        self.size = size
        self.scheduler = scheduler
        self.loop = loop
        self.window = max(1, window)
        self.min_piece = min_piece  # a floor under the scheduler's piece size (fewer requests)
        self._lock = threading.Condition()
        self._next_offset = 0  # next byte to hand out as a job (loop)
        self._read_offset = 0  # next byte the reader takes
        self._parts: dict[int, bytes] = {}  # arrived, not taken yet: offset -> bytes
        self._error: BaseException | None = None
        self._closed = False
        self.fetched = 0

    # --- on the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.size == 0:
            return
        self.scheduler.add_feeder(self)

    def next_job(self, work: WorkClass, max_bytes: int) -> Job | None:
        if work is not WORK:
            return None
        with self._lock:
            if self._closed or self._error is not None or self._next_offset >= self.size:
                return None
            room = self._read_offset + self.window - self._next_offset
            want = max(max_bytes, self.min_piece)
            if room < min(want, self.size - self._next_offset):
                return None  # the reader is behind: no more until it catches up
            start = self._next_offset
            end = min(self.size, start + want)
            self._next_offset = end
            if end >= self.size:
                self.loop.call_soon(self.scheduler.remove_feeder, self)

        async def deliver(result: list[bytes] | BaseException) -> None:
            self._delivered(start, end, result)

        return Job(self.source, [(start, end)], WORK, deliver)

    def _delivered(self, start: int, end: int, result: list[bytes] | BaseException) -> None:
        with self._lock:
            if self._closed:
                return
            if isinstance(result, BaseException):
                self._error = self._error or result
            elif len(result) != 1 or len(result[0]) != end - start:
                self._error = self._error or DownloadError(
                    f"a read of [{start}, {end}) returned {sum(len(r) for r in result)} bytes"
                )
            else:
                self._parts[start] = result[0]
                self.fetched += end - start
            self._lock.notify_all()
        if self._error is not None:
            self.scheduler.remove_feeder(self)

    # --- on the unpacking thread ----------------------------------------------------------------

    def read(self) -> bytes:
        """The next piece of the blob in order, waiting for it; b"" after the last byte."""
        with self._lock:
            while True:
                if self._closed:
                    raise DownloadError("the download was closed")
                if self._error is not None:
                    raise DownloadError(f"fetching the layer failed: {self._error}") from self._error
                if self._read_offset >= self.size:
                    return b""
                data = self._parts.pop(self._read_offset, None)
                if data is not None:
                    self._read_offset += len(data)
                    break
                self._lock.wait()
        # Room in the window again: let the scheduler hand out more.
        self.loop.call_soon_threadsafe(self.scheduler.pump)
        return data

    # --- from anywhere --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: no more jobs, pieces in flight are dropped, a waiting ``read`` raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._parts.clear()
            self._lock.notify_all()
        self.loop.call_soon_threadsafe(self.scheduler.remove_feeder, self)

    @property
    def taken(self) -> int:
        """Bytes the reader has taken."""
        with self._lock:
            return self._read_offset

    @property
    def buffered(self) -> int:
        """Bytes fetched and waiting for the reader."""
        with self._lock:
            return sum(len(p) for p in self._parts.values())
