"""A layer blob fetched front to back through the fetch scheduler, read in order by a thread,
never more than its window ahead of that thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from snapshotter.eager.download import DownloadError, LayerDownload
from snapshotter.scheduler import FetchScheduler, SchedulerConfig
from tests.support.lazy import MemoryBlob, running_loop, wait_until

MiB = 1 << 20
DATA = bytes(range(256)) * (40 * 4096)  # 40 MiB


class WindowCheckingBlob(MemoryBlob):
    """Records, for each request, how far it reaches beyond what the reader had taken."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.download: LayerDownload | None = None
        self.ahead: list[int] = []

    async def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        assert self.download is not None
        self.ahead.append(ranges[-1][1] - self.download.taken)
        return await super().read_ranges(ranges)


def download(loop: asyncio.AbstractEventLoop, blob: MemoryBlob, window: int) -> LayerDownload:
    async def make() -> LayerDownload:
        scheduler = FetchScheduler(loop, SchedulerConfig(max_piece_bytes=MiB))
        d = LayerDownload(blob, len(blob.data), scheduler, loop, window=window)
        if isinstance(blob, WindowCheckingBlob):
            blob.download = d
        d.start()
        return d

    return asyncio.run_coroutine_threadsafe(make(), loop).result(5)


def read_to_end(d: LayerDownload) -> bytes:
    out = bytearray()
    while part := d.read():
        out += part
    return bytes(out)


def test_bytes_arrive_in_order_within_the_window() -> None:
    window = 4 * MiB
    with running_loop() as loop:
        blob = WindowCheckingBlob(DATA)
        d = download(loop, blob, window)
        assert read_to_end(d) == DATA
    assert max(blob.ahead) <= window
    assert len(blob.requests) > 10 and blob.bytes_served == len(DATA)  # fetched once, in pieces


def test_a_reader_that_does_not_read_stops_the_fetching() -> None:
    window = 3 * MiB
    with running_loop() as loop:
        blob = MemoryBlob(DATA)
        d = download(loop, blob, window)
        assert wait_until(lambda: d.buffered >= window - MiB)
        served = blob.bytes_served
        assert served <= window
        assert read_to_end(d) == DATA  # and it goes on once read


def test_a_failed_piece_fails_the_read() -> None:
    with running_loop() as loop:
        blob = MemoryBlob(DATA)
        blob.fail = OSError("registry gone")
        d = download(loop, blob, 4 * MiB)
        with pytest.raises(DownloadError, match="registry gone"):
            read_to_end(d)


def test_close_wakes_a_waiting_reader() -> None:
    with running_loop() as loop:
        blob = MemoryBlob(DATA)
        blob.stall.clear()  # nothing ever arrives
        d = download(loop, blob, 4 * MiB)
        failed: list[BaseException] = []

        def reader() -> None:
            try:
                d.read()
            except DownloadError as exc:
                failed.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        assert wait_until(lambda: blob.arrived > 0)
        d.close()
        thread.join(10)
        assert not thread.is_alive() and failed
        blob.stall.set()
