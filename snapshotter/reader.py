"""Chunk reader: "give me bytes [a, b) of file F of this layer".

Owns the path from a read to verified bytes: cache hit, or fetch + decompress + verify + store,
with one in-flight fetch per chunk however many readers want it. What to fetch besides what a
reader is blocked on is decided with the registry's fetch scheduler (``snapshotter.scheduler``):
the reader is a ``Feeder`` that offers it the layer's startup set (prioritized files), the chunks
ahead of files being read front to back, and the rest of the layer; the scheduler takes them when
and as fast as the link allows, on-demand reads always first.

Threads: ``read()`` is called from FUSE worker threads and blocks only its caller; fetching runs
on the daemon's asyncio loop; decompression, hashing and cache I/O run in worker threads.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from snapshotter.cache import ChunkCache
from snapshotter.formats import decode_stream
from snapshotter.formats.index import Chunk, Entry, FormatError, LayerIndex
from snapshotter.scheduler import BlobSource, FetchScheduler, Job, WorkClass

log = logging.getLogger(__name__)

SEQUENTIAL_SLACK_BYTES = 512 << 10
MAX_STREAMS = 32  # files tracked as read front to back, most recent first
REST_RESCAN_SECONDS = 5.0  # after a pass that left chunks uncached (failures), look again this late
# A chunk whose fetch failed after a long wait (a stalled registry) fails reads at once for this
# long: the kernel re-reads a page whose read failed straight away (twice over with EROFS: its
# file, then the data blob), and each re-read must not wait another read timeout. A fetch that
# failed fast (connection refused) is simply tried again.
RECENT_FAILURE_SECONDS = 2.0
AHEAD = (WorkClass.STREAM, WorkClass.REST)  # fetched before anyone reads it: must fit the cache


class ReadError(OSError):
    """A read cannot be served (fetch failed, timed out, or bytes failed verification)."""


@dataclass(frozen=True)
class ReaderConfig:
    read_timeout: float = 60.0  # a read fails once no byte has arrived for this long
    readahead_bytes: int = 4 << 20  # a file read front to back is fetched at least this far ahead
    merge_gap_bytes: int = 64 << 10  # on-demand ranges closer than this are fetched in one request
    max_request_bytes: int = 16 << 20  # on-demand coalescing stops at this size
    prefetch: bool = True  # offer the layer's startup set (prioritized files) to the scheduler


_CLASS_NAMES = [w.name_for_stats for w in WorkClass]


@dataclass
class FetchStats:
    """Compressed bytes fetched from the registry, by reason; served to the admin endpoint."""

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_CLASS_NAMES, 0))
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_CLASS_NAMES, 0))
    chunks_fetched: int = 0
    # Chunks fetched again after an earlier fetch of them (evicted from the cache meanwhile, or
    # fetched twice by mistake): a cache too small for what is read shows up here.
    chunk_refetches: int = 0
    verify_failures: int = 0
    cache_write_failures: int = 0
    prefetch_done: bool = False
    background_done: bool = False
    # The rest of the layer does not fit the cache budget: only what is read is fetched.
    rest_stopped: bool = False

    def snapshot(self) -> dict[str, object]:
        return {
            "bytes": dict(self.bytes),
            "requests": dict(self.requests),
            "chunks_fetched": self.chunks_fetched,
            "chunk_refetches": self.chunk_refetches,
            "verify_failures": self.verify_failures,
            "cache_write_failures": self.cache_write_failures,
            "prefetch_done": self.prefetch_done,
            "background_done": self.background_done,
            "rest_stopped": self.rest_stopped,
        }


@dataclass(frozen=True)
class _Stream:
    """One compressed stream (gzip member / zstd frame) and the chunks decoded from it."""

    blob: str  # "" for the layer's own blob
    offset: int
    size: int
    chunks: tuple[Chunk, ...]
    # Chunks nobody asked for that come along because the whole stream is decoded anyway
    # (``LayerIndex.whole_streams``): kept as fetched ahead, not as read.
    along: frozenset[str] = frozenset()


def _streams(chunks: Iterable[Chunk]) -> list[_Stream]:
    by_stream: dict[tuple[str, int, int], dict[str, Chunk]] = {}
    for c in chunks:
        by_stream.setdefault((c.blob, c.compressed_offset, c.compressed_size), {})[c.digest] = c
    return [_Stream(b, off, size, tuple(cs.values())) for (b, off, size), cs in sorted(by_stream.items())]


def coalesce(streams: Sequence[_Stream], gap: int, max_bytes: int) -> list[tuple[int, int]]:
    """Merge sorted stream extents into few [start, end) ranges: neighbours closer than ``gap``
    share a request, but no request grows beyond ``max_bytes`` unless one stream alone does."""
    ranges: list[list[int]] = []
    for s in streams:
        start, end = s.offset, s.offset + s.size
        if ranges and start - ranges[-1][1] <= gap and end - ranges[-1][0] <= max_bytes:
            ranges[-1][1] = max(ranges[-1][1], end)
        else:
            ranges.append([start, end])
    return [(a, b) for a, b in ranges]


@dataclass
class _FileStream:
    """A file being read front to back: where its reader is, and what has been offered ahead."""

    entry: Entry
    position: int  # where the last read ended
    run: int  # bytes read sequentially so far
    next_chunk: int  # the first chunk not offered to the scheduler yet
    streaming: bool = False  # the run went past the chunk it began in


class LayerReader:
    def __init__(
        self,
        index: LayerIndex,
        blob: BlobSource,
        cache: ChunkCache,
        loop: asyncio.AbstractEventLoop,
        *,
        layer: str,
        scheduler: FetchScheduler,
        other_blobs: Mapping[str, BlobSource] | None = None,
        config: ReaderConfig | None = None,
        executor: Executor | None = None,
        startup_files: Sequence[str] | None = None,
    ) -> None:
        self.index = index
        # The image's startup profile's files in this layer (index names, first-read order): the
        # startup set instead of the index's prefetch list. None: the index's list.
        self.startup_files = startup_files
        self.blob = blob
        # Blobs of other layers of the image that hold some of this layer's chunks, by digest.
        self.blobs: dict[str, BlobSource] = {"": blob, **(other_blobs or {})}
        missing = set(index.blobs) - set(self.blobs)
        if missing:
            raise ValueError(f"layer {layer}: no source for blobs {sorted(missing)}")
        self.cache = cache
        self.loop = loop
        self.layer = layer
        self.scheduler = scheduler
        self.config = config or ReaderConfig()
        # Decompression, hashing and cache I/O; a pool of its own so that they never wait behind
        # gRPC calls or mounts that are themselves waiting for chunks.
        self.executor = executor
        self.stats = FetchStats()
        self._fetched: set[str] = set()  # digests of the chunks this layer has fetched
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self._offsets: dict[str, list[int]] = {}  # per file: its chunks' file offsets, for bisect
        # Files read front to back, most recently read last (touched from reader threads).
        self._streams: collections.OrderedDict[str, _FileStream] = collections.OrderedDict()
        self._streams_lock = threading.Lock()
        # Work offered to the scheduler, in order: the startup set, then every chunk.
        self._startup: list[Chunk] = self._startup_chunks() if self.config.prefetch else []
        self._startup_pos = 0
        self._rest: list[Chunk] = []  # built when the scheduler first asks
        self._by_stream: dict[tuple[str, int, int], list[Chunk]] | None = None  # whole streams only
        self._rest_pos = 0
        self._rest_resume_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        # Chunks whose fetch outlasted a read's timeout and is still running (loop only); see _give_up.
        self._timed_out: set[str] = set()
        # Chunks whose fetch failed lately: digest -> (until when, why) (loop only).
        self._failed: dict[str, tuple[float, BaseException]] = {}
        self._started = False
        self.stats.prefetch_done = not self._startup
        # Called on the loop once every chunk of the layer is in the cache.
        self.on_complete: Callable[[], None] | None = None

    # --- reads from FUSE threads ------------------------------------------------------------

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a regular file, short at end of file. Blocks."""
        return self.read_extents([(entry, offset, size)])[0]

    def read_cached(
        self, extents: Sequence[tuple[Entry, int, int]], *, by_reader: bool = True
    ) -> list[bytes] | None:
        """The bytes of these file ranges if every chunk they need is in the cache, else None
        (nothing is fetched). Cheap enough to answer on the FUSE server's reading thread. Not
        ``by_reader`` (copying the layer elsewhere): no stream is detected from it."""
        out: list[bytes] = []
        for entry, offset, size in extents:
            end = min(entry.size, offset + size)
            parts: list[bytes] = []
            for c, (lo, hi) in self._slices(entry, offset, end):
                piece = self.cache.read_range(c.digest, lo, hi)
                if piece is None:
                    return None
                parts.append(piece)
            out.append(b"".join(parts))
        if by_reader:
            for entry, offset, size in extents:
                self._note_read(entry, offset, min(entry.size, offset + size))
        return out

    def read_extents(self, extents: Sequence[tuple[Entry, int, int]]) -> list[bytes]:
        """Bytes of several file ranges (each short at its file's end), fetching every missing
        chunk they need in one go: one READ of a data blob spans many small files. Blocks."""
        plans: list[tuple[list[tuple[Chunk, tuple[int, int]]], list[bytes | None]]] = []
        missing: dict[str, Chunk] = {}
        for entry, offset, size in extents:
            end = min(entry.size, offset + size)
            slices = self._slices(entry, offset, end)
            pieces: list[bytes | None] = [self.cache.read_range(c.digest, lo, hi) for c, (lo, hi) in slices]
            for (c, _), piece in zip(slices, pieces, strict=True):
                if piece is None:
                    missing.setdefault(c.digest, c)
            plans.append((slices, pieces))
        streaming = False
        for entry, offset, size in extents:
            streaming |= self._note_read(entry, offset, min(entry.size, offset + size))
        if streaming:  # new work ahead of a stream: let the scheduler see it
            self.loop.call_soon_threadsafe(self.scheduler.pump)
        fetched: dict[str, bytes] = {}
        if missing:
            future = asyncio.run_coroutine_threadsafe(self._ensure(list(missing.values())), self.loop)
            try:
                fetched = self._wait(future)
            except TimeoutError:
                future.cancel()
                self.loop.call_soon_threadsafe(self._give_up, list(missing))
                names = ", ".join(repr(e.name) for e, _, _ in extents[:3])
                raise ReadError(
                    f"layer {self.layer}: read of {names} timed out: no byte arrived for "
                    f"{self.config.read_timeout}s"
                ) from None
        out: list[bytes] = []
        for slices, pieces in plans:
            for i, (c, (lo, hi)) in enumerate(slices):
                if pieces[i] is None:
                    pieces[i] = fetched[c.digest][lo:hi]
            out.append(b"".join(p for p in pieces if p is not None))
        return out

    def _wait(self, future: concurrent.futures.Future[dict[str, bytes]]) -> dict[str, bytes]:
        """The fetch's result. A slow link that keeps delivering is waited for; TimeoutError once
        no byte of this layer's blobs has arrived for ``read_timeout`` (a dead link, a stall)."""
        timeout = self.config.read_timeout
        waited_from = time.monotonic()
        while True:
            try:
                return future.result(timeout=max(0.0, waited_from + timeout - time.monotonic()))
            except TimeoutError:
                last = max((getattr(b, "last_byte_at", 0.0) for b in self.blobs.values()), default=0.0)
                if time.monotonic() - max(last, waited_from) >= timeout:
                    raise
                waited_from = max(last, waited_from)

    def _chunk_offsets(self, entry: Entry) -> list[int]:
        offsets = self._offsets.get(entry.name)
        if offsets is None:
            offsets = self._offsets[entry.name] = [c.file_offset for c in entry.chunks]
        return offsets

    def _slices(self, entry: Entry, offset: int, end: int) -> list[tuple[Chunk, tuple[int, int]]]:
        """The chunks of ``entry`` that [offset, end) touches, each with the slice of it needed (a
        read is small, chunks are large). A file may hold one chunk twice (zeros): kept by position."""
        if offset >= end:
            return []
        chunks = entry.chunks
        first = max(0, bisect.bisect_right(self._chunk_offsets(entry), offset) - 1)
        last = first
        while last < len(chunks) and chunks[last].file_offset < end:
            last += 1
        return [
            (c, (lo - c.file_offset, min(end, c.file_offset + c.size) - c.file_offset))
            for c in chunks[first:last]
            for lo in (max(offset, c.file_offset),)
        ]

    def _note_read(self, entry: Entry, offset: int, end: int) -> bool:
        """Follow files read front to back. A file becomes a stream once a sequential run of reads
        has gone past the chunk it began in (a random access, or a short read inside one chunk,
        is not one: a model loader seeking to one tensor must not pay for the rest of the file).
        True when this read made new work ahead of a stream."""
        if offset >= end or len(entry.chunks) < 2:
            return False
        with self._streams_lock:
            stream = self._streams.get(entry.name)
            # The kernel reads ahead in parallel, so a stream arrives slightly out of order:
            # "near where the last read ended" counts as sequential.
            if stream is not None and abs(offset - stream.position) <= SEQUENTIAL_SLACK_BYTES:
                stream.run += end - offset
                stream.position = max(stream.position, end)
                self._streams.move_to_end(entry.name)
                first = bisect.bisect_right(self._chunk_offsets(entry), end - stream.run) - 1
                touched = bisect.bisect_right(self._chunk_offsets(entry), end - 1) - 1
                if touched > max(first, 0):  # past the chunk the run began in: a stream
                    stream.streaming = True
                    stream.next_chunk = max(stream.next_chunk, touched + 1)
                    return True
                return False
            self._streams[entry.name] = _FileStream(entry, end, 0, 0)
            while len(self._streams) > MAX_STREAMS:
                self._streams.popitem(last=False)
            return False

    # --- what the scheduler may fetch besides reads (the Feeder) ----------------------------

    def next_job(self, work: WorkClass, max_bytes: int) -> Job | None:
        """The next piece of ``work`` this layer has, chunks not cached or in flight, in one blob."""
        if work is WorkClass.STARTUP:
            chunks, self._startup_pos = self._take(self._startup, self._startup_pos, max_bytes)
            if not chunks:
                self.stats.prefetch_done = True
        elif work is WorkClass.STREAM:
            chunks = self._take_stream(max_bytes)
        elif work is WorkClass.REST:
            chunks = self._take_rest(max_bytes)
        else:
            return None
        if not chunks:
            return None
        return self._job(chunks, work)

    def _take(self, order: list[Chunk], pos: int, max_bytes: int) -> tuple[list[Chunk], int]:
        """Chunks of ``order`` from ``pos`` on that nobody has or is fetching, all in one blob and
        at most ``max_bytes`` of compressed streams (at least one); and where to go on next time."""
        taken: list[Chunk] = []
        streams: set[tuple[int, int]] = set()
        size = 0
        while pos < len(order):
            c = order[pos]
            if c.digest in self._inflight or c.digest in self.cache:
                pos += 1
                continue
            if taken and c.blob != taken[0].blob:
                break
            key = (c.compressed_offset, c.compressed_size)
            extra = 0 if key in streams else c.compressed_size
            if taken and size + extra > max_bytes:
                break
            taken.append(c)
            streams.add(key)
            size += extra
            pos += 1
        return taken, pos

    def _take_stream(self, max_bytes: int) -> list[Chunk]:
        """Chunks ahead of the most recently read stream that still has some within its window:
        at least ``readahead_bytes`` ahead, and as much as the stream has read and the link holds
        (two bandwidth-delay products), so a file read front to back arrives at link speed; never
        more than ``8 * readahead_bytes`` (a link measured wrong must not fetch a whole file)."""
        limit = 8 * self.config.readahead_bytes
        link_ahead = min(int(2 * self.scheduler.link.bdp), limit)
        with self._streams_lock:
            for stream in reversed(self._streams.values()):
                if not stream.streaming:
                    continue
                entry = stream.entry
                window = max(self.config.readahead_bytes, min(stream.run, limit))
                horizon = stream.position + max(window, link_ahead)
                ahead = [c for c in entry.chunks[stream.next_chunk :] if c.file_offset < horizon]
                taken, used = self._take(ahead, 0, max_bytes)
                if taken and not self.cache.reserve_ahead(sum(c.size for c in taken)):
                    continue  # it could not stay until read: the stream goes on by its reads
                stream.next_chunk += used
                if taken:
                    return taken
        return []

    def _take_rest(self, max_bytes: int) -> list[Chunk]:
        if self.stats.background_done or self.stats.rest_stopped or self.loop.time() < self._rest_resume_at:
            return []
        if not self._rest:
            self._rest = self.all_chunks()
        taken, pos = self._take(self._rest, self._rest_pos, max_bytes)
        if taken and not self.cache.reserve_ahead(sum(c.size for c in taken)):
            # What it would bring could not stay without pushing out chunks that were read (or
            # fetched ahead before): fetching it would only turn into fetching it again later.
            self.stats.rest_stopped = True
            log.warning(
                "the rest of this layer does not fit the cache; fetching only what is read",
                extra={"layer": self.layer, "cache_max_bytes": self.cache.max_bytes},
            )
            return []
        self._rest_pos = pos
        if taken or self._inflight:
            return taken
        # A whole pass found nothing to fetch: done, unless chunks went missing (failed fetches,
        # evictions); look again later rather than spin.
        self._rest_pos = 0
        if all(c.digest in self.cache for c in self._rest):
            self.stats.background_done = True
            log.info("layer complete in the cache", extra={"layer": self.layer})
            if self.on_complete is not None:
                self.on_complete()
        else:
            self._rest_resume_at = self.loop.time() + REST_RESCAN_SECONDS
            self.loop.call_later(REST_RESCAN_SECONDS, self.scheduler.pump)
        return []

    def _job(self, chunks: list[Chunk], work: WorkClass) -> Job:
        streams = self._register(chunks)
        blob = streams[0].blob
        # Lower-class pieces are sized by the scheduler. Their chunks need not lie together in the
        # blob (an image profile's files in an image not converted with it; the rest around what
        # was read or prefetched): a gap wider than merge_gap_bytes is not fetched, as it would be
        # fetched twice (or before the workload is ready, for nothing).
        ranges = coalesce(streams, self.config.merge_gap_bytes, 1 << 62)
        reserved = sum(c.size for c in chunks) if work in AHEAD else 0

        async def deliver(result: list[bytes] | BaseException) -> None:
            try:
                await self._delivered(streams, ranges, work, result)
            finally:
                if reserved:
                    self.cache.unreserve_ahead(reserved)

        return Job(self.blobs[blob], ranges, work, deliver)

    # --- fetching on the loop -------------------------------------------------------------------

    async def _ensure(self, wanted: list[Chunk]) -> dict[str, bytes]:
        """Bytes of every ``wanted`` chunk, fetching on demand what no one is fetching yet."""
        if any(c.digest in self._timed_out for c in wanted):
            raise ReadError(f"layer {self.layer}: still fetching chunks whose read timed out")
        now = self.loop.time()
        for c in wanted:
            failed = self._failed.get(c.digest)
            if failed is not None and failed[0] > now:
                raise ReadError(f"layer {self.layer}: fetch failed moments ago: {failed[1]}")
        # A chunk may have landed between the reader's cache check and now (fetched ahead of a
        # stream, say): take it from the cache rather than fetch it twice.
        landed: dict[str, bytes] = {}
        for c in wanted:
            if c.digest not in self._inflight and c.digest not in landed and c.digest in self.cache:
                data = await self.loop.run_in_executor(self.executor, self.cache.get, c.digest)
                if data is not None:
                    landed[c.digest] = data
        wanted = [c for c in wanted if c.digest not in landed]
        waits = {c.digest: self._inflight[c.digest] for c in wanted if c.digest in self._inflight}
        # One fetch per distinct chunk: a file of zeros repeats the same chunk many times.
        todo = list({c.digest: c for c in wanted if c.digest not in self._inflight}.values())
        if todo:
            self._fetch_on_demand(todo)
            waits.update({c.digest: self._inflight[c.digest] for c in wanted if c.digest not in waits})
        result = landed
        for digest, fut in waits.items():
            try:
                result[digest] = await asyncio.shield(fut)
            except Exception as exc:  # registry, format and cache errors alike: EIO to the reader
                raise ReadError(f"layer {self.layer}: {exc}") from exc
        return result

    def _register(self, chunks: Iterable[Chunk]) -> list[_Stream]:
        """Count these chunks as in flight (one future each) and group them by stream; with
        whole streams, the stream's other chunks not cached or in flight come along."""
        asked = [c for c in chunks if c.digest not in self._inflight]
        along: list[Chunk] = []
        if self.index.whole_streams and asked:
            along = self._stream_mates(asked)
        streams = _streams([*asked, *along])
        if along:
            extra = {c.digest for c in along}
            streams = [
                dataclasses.replace(s, along=frozenset(c.digest for c in s.chunks) & extra) for s in streams
            ]
        for s in streams:
            for c in s.chunks:
                fut = self.loop.create_future()
                fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
                self._inflight[c.digest] = fut
        return streams

    def _stream_mates(self, asked: list[Chunk]) -> list[Chunk]:
        """The chunks sharing a stream with ``asked`` that are neither asked, cached nor in flight."""
        if self._by_stream is None:
            self._by_stream = {}
            for c in self.all_chunks():
                self._by_stream.setdefault((c.blob, c.compressed_offset, c.compressed_size), []).append(c)
        wanted = {c.digest for c in asked}
        keys = {(c.blob, c.compressed_offset, c.compressed_size) for c in asked}
        mates: dict[str, Chunk] = {}
        for key in keys:
            for c in self._by_stream.get(key, ()):
                if c.digest not in wanted and c.digest not in self._inflight and c.digest not in self.cache:
                    mates.setdefault(c.digest, c)
        return list(mates.values())

    def _fetch_on_demand(self, chunks: list[Chunk]) -> None:
        by_blob: dict[str, list[_Stream]] = {}
        for s in self._register(chunks):
            by_blob.setdefault(s.blob, []).append(s)
        for blob, group in by_blob.items():
            ranges = coalesce(group, self.config.merge_gap_bytes, self.config.max_request_bytes)
            task = self.loop.create_task(self._fetch(blob, group, ranges))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fetch(self, blob: str, streams: list[_Stream], ranges: list[tuple[int, int]]) -> None:
        started = self.loop.time()
        try:
            result = await self.scheduler.fetch(self.blobs[blob], ranges)
        except asyncio.CancelledError:
            self._fail_streams(streams, ReadError(f"layer {self.layer}: fetch cancelled"))
            raise
        except Exception as exc:  # the fetcher's errors
            slow = self.loop.time() - started >= self.config.read_timeout / 2
            for s in streams:
                self._fail(s.chunks, exc, remember=slow)
            log.warning("fetch failed", extra={"layer": self.layer, "reason": "on_demand", "error": str(exc)})
            return
        await self._delivered(streams, ranges, WorkClass.ON_DEMAND, result)

    async def _delivered(
        self,
        streams: list[_Stream],
        ranges: list[tuple[int, int]],
        work: WorkClass,
        result: list[bytes] | BaseException,
    ) -> None:
        """Bytes (or the error) of a fetch: cut them into streams, decode, verify, store."""
        reason = work.name_for_stats
        if isinstance(result, BaseException):
            self._fail_streams(streams, result)
            if not isinstance(result, asyncio.CancelledError):
                log.warning(
                    "fetch failed", extra={"layer": self.layer, "reason": reason, "error": str(result)}
                )
            return
        self.stats.bytes[reason] += sum(len(b) for b in result)
        self.stats.requests[reason] += len(ranges)
        log.debug(
            "fetched",
            extra={
                "layer": self.layer,
                "reason": reason,
                "ranges": len(ranges),
                "bytes": sum(map(len, result)),
            },
        )
        starts = [r[0] for r in ranges]
        jobs = []
        for s in streams:
            i = bisect.bisect_right(starts, s.offset) - 1
            start = s.offset - ranges[i][0]
            jobs.append((s, result[i][start : start + s.size]))
        await self._decode(jobs, speculative=work in AHEAD)

    def _fail_streams(self, streams: list[_Stream], exc: BaseException) -> None:
        for s in streams:
            self._fail(s.chunks, exc)

    async def _decode(self, jobs: list[tuple[_Stream, bytes]], *, speculative: bool = False) -> None:
        """Decode and verify the streams of one fetch in a worker thread (one job, not one per
        stream: a fetch of small files holds hundreds, and each hand-off to a thread costs more
        than decoding a small file), hand the bytes to the readers waiting for them, then store
        them in the cache. Until stored, the chunks stay in flight (with their result set), so a
        read arriving meanwhile takes the bytes from there instead of fetching again."""
        try:
            outcomes = await self.loop.run_in_executor(self.executor, self._decode_streams, jobs)
        except Exception as exc:  # no thread to decode in (the pool is shutting down): fail, never hang
            self._fail_streams([stream for stream, _ in jobs], exc)
            return
        decoded: dict[str, bytes] = {}
        along: set[str] = set()
        for stream, outcome in outcomes:
            if isinstance(outcome, Exception):
                if isinstance(outcome, FormatError):
                    self.stats.verify_failures += 1
                self._fail(stream.chunks, outcome)
                continue
            decoded.update(outcome)
            along.update(stream.along)
            for c in stream.chunks:  # readers go on now, not after the cache write
                fut = self._inflight.get(c.digest)
                if fut is not None and not fut.done():
                    fut.set_result(outcome[c.digest])
        if not decoded:
            return
        self.stats.chunks_fetched += len(decoded)
        self.stats.chunk_refetches += len(self._fetched.intersection(decoded))
        self._fetched.update(decoded)
        try:
            self.stats.cache_write_failures += await self.loop.run_in_executor(
                self.executor, self._store, decoded, speculative, frozenset(along)
            )
        finally:
            for digest, data in decoded.items():
                self._resolve(digest, data)

    def _decode_streams(
        self, jobs: list[tuple[_Stream, bytes]]
    ) -> list[tuple[_Stream, dict[str, bytes] | Exception]]:
        """Each stream's chunks, verified, or the error that fails that stream alone."""
        outcomes: list[tuple[_Stream, dict[str, bytes] | Exception]] = []
        for stream, raw in jobs:
            try:
                outcomes.append((stream, self._decode_stream(stream, raw)))
            except Exception as exc:
                outcomes.append((stream, exc))
        return outcomes

    def _decode_stream(self, stream: _Stream, raw: bytes) -> dict[str, bytes]:
        """Every chunk of the stream, verified, from one pass over it (not one per chunk: many
        small files may share a stream, and each decode starts at the stream's beginning)."""
        try:
            pieces = decode_stream(
                self.index.compression,
                raw,
                stream.chunks,
                resume=self.index.resume_points.get(stream.offset) if not stream.blob else None,
            )
        except FormatError as exc:
            log.error(
                "chunk failed verification; not served, not cached",
                extra={"layer": self.layer, "blob": stream.blob, "offset": stream.offset, "error": str(exc)},
            )
            raise
        return {c.digest: piece for c, piece in zip(stream.chunks, pieces, strict=True)}

    def _store(
        self, decoded: dict[str, bytes], speculative: bool = False, along: frozenset[str] = frozenset()
    ) -> int:
        """Cache verified chunks (``along``: fetched without being asked for); returns how many
        could not be written."""
        failures = 0
        for digest, data in decoded.items():
            try:
                self.cache.put(digest, data, speculative=speculative or digest in along)
            except OSError as exc:  # a full disk degrades caching, never the read itself
                failures += 1
                log.warning("cannot cache chunk", extra={"layer": self.layer, "error": str(exc)})
        return failures

    def _give_up(self, digests: list[str]) -> None:
        """A read timed out waiting for these chunks. Until their fetch ends, reads of them fail at
        once: the kernel retries a failed read straight away, which must not wait a second timeout."""
        self._timed_out.update(d for d in digests if d in self._inflight)

    def _resolve(self, digest: str, data: bytes) -> None:
        self._timed_out.discard(digest)
        self._failed.pop(digest, None)
        fut = self._inflight.pop(digest, None)
        if fut is not None and not fut.done():
            fut.set_result(data)

    def _fail(self, chunks: Iterable[Chunk], exc: BaseException, *, remember: bool = False) -> None:
        recent = remember and not isinstance(exc, ReadError | asyncio.CancelledError)
        until = self.loop.time() + RECENT_FAILURE_SECONDS
        if len(self._failed) > 4096:  # bounded: forget the expired
            now = self.loop.time()
            self._failed = {d: f for d, f in self._failed.items() if f[0] > now}
        for c in chunks:
            if recent:
                self._failed[c.digest] = (until, exc)
            self._timed_out.discard(c.digest)
            fut = self._inflight.pop(c.digest, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)

    # --- prefetch and background fetch ----------------------------------------------------------

    def all_chunks(self) -> list[Chunk]:
        seen: dict[str, Chunk] = {}
        for e in self.index.entries.values():
            for c in e.chunks:
                seen.setdefault(c.digest, c)
        return sorted(seen.values(), key=lambda c: (c.blob, c.compressed_offset, c.inner_offset))

    def _startup_chunks(self) -> list[Chunk]:
        """The layer's startup set in the order it is wanted: the chunks of its prioritized files
        in access order (eStargz: everything before the landmark, which [0, prefetch_end) holds;
        those in lower layers' blobs, for the Nydus-like format, by the prefetch list), or those of
        the startup profile's files."""
        seen: dict[str, Chunk] = {}
        if self.startup_files is not None:
            for name in self.startup_files:
                entry = self.index.entries.get(name)
                if entry is not None:
                    for c in entry.chunks:
                        seen.setdefault(c.digest, c)
            return list(seen.values())
        if self.index.no_prefetch:
            return []
        for name in self.index.prefetch:
            entry = self.index.entries.get(name)
            if entry is not None:
                for c in entry.chunks:
                    seen.setdefault(c.digest, c)
        end = self.index.prefetch_end
        if end > 0:
            for c in self.all_chunks():
                if not c.blob and c.compressed_offset + c.compressed_size <= end:
                    seen.setdefault(c.digest, c)
        return list(seen.values())

    def seed(self, offset: int, data: bytes) -> None:
        """Blob bytes [offset, offset + len(data)) of this layer's own blob fetched already (the
        mount fetched the blob's tail for the footer and TOC, and with it the last chunks): decode
        and keep the chunks whose streams lie inside, instead of fetching them again. On the loop."""
        end = offset + len(data)
        inside = [
            c
            for c in self.all_chunks()
            if not c.blob and offset <= c.compressed_offset and c.compressed_offset + c.compressed_size <= end
        ]
        streams = self._register(c for c in inside if c.digest not in self.cache)
        jobs = [(st, data[st.offset - offset : st.offset - offset + st.size]) for st in streams]
        if jobs:
            task = self.loop.create_task(self._decode(jobs))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        """Offer the scheduler this layer's startup set, streams and rest (call on the loop)."""
        if not self._started:
            self._started = True
            self.scheduler.add_feeder(self)

    async def close(self, *, release: bool = True) -> None:
        """The layer is unmounted: stop fetching, fail waiting reads, and (``release``) let its
        chunks be the first the cache evicts. A manager handing its mounts over keeps them."""
        self.scheduler.remove_feeder(self)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        chunks = [c for e in self.index.entries.values() for c in e.chunks]
        self._fail(chunks, ReadError(f"layer {self.layer}: unmounted"))
        if release:
            await self.loop.run_in_executor(self.executor, self.cache.release, [c.digest for c in chunks])
