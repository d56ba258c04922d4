"""Chunk reader: "give me bytes [a, b) of file F of this layer".

Owns the path from a read to verified bytes: cache hit, or fetch (coalesced range requests) +
decompress + verify + store, with one in-flight fetch per chunk however many readers want it.
Also owns prefetch (the layer's prioritized region, in one request, at mount) and the background
fetch of the rest, which always yields to on-demand reads.

Threads: ``read()`` is called from FUSE worker threads and blocks only its caller; fetching runs
on the daemon's asyncio loop; decompression, hashing and cache I/O run in worker threads.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from snapshotter.cache import ChunkCache
from snapshotter.formats import decode_stream
from snapshotter.formats.index import Chunk, Entry, FormatError, LayerIndex

log = logging.getLogger(__name__)

ON_DEMAND, PREFETCH, BACKGROUND = "on_demand", "prefetch", "background"
PREFETCH_PARALLEL_REQUESTS = 4
SEQUENTIAL_SLACK_BYTES = 512 << 10


class BlobSource(Protocol):
    """Byte ranges of one blob; the fetcher's BlobReader satisfies it."""

    async def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]: ...


class ReadError(OSError):
    """A read cannot be served (fetch failed, timed out, or bytes failed verification)."""


@dataclass(frozen=True)
class ReaderConfig:
    read_timeout: float = 60.0  # longest a FUSE read waits before answering EIO
    readahead_bytes: int = 4 << 20  # on a miss, also fetch this much more of the same file
    # A small file's miss also fetches the chunks that follow it in the blob, up to this much.
    small_file_readahead_bytes: int = 1 << 20
    merge_gap_bytes: int = 64 << 10  # ranges closer than this are fetched in one request
    max_request_bytes: int = 16 << 20  # split larger coalesced ranges to fetch them in parallel
    prefetch: bool = True
    fetch_whole_below_bytes: int = 8 << 20  # layers this small are fetched whole at mount
    background: bool = True
    background_batch_bytes: int = 4 << 20
    background_rate_bytes: int = 0  # bytes/s cap for background fetch; 0 = no cap
    background_delay_seconds: float = 1.0  # wait after mount before background fetch starts
    # The background fetch runs only once on-demand reads have been quiet this long, so that a
    # starting container's bursts of misses never queue behind it.
    background_quiet_seconds: float = 0.5


class OnDemandActivity:
    """On-demand fetching across every lazy layer of the daemon. Background fetches of all layers
    wait for it to be quiet: a starting container's misses in one layer must not queue behind the
    background fetch of another on the same link. Used on the loop only."""

    def __init__(self) -> None:
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.last_end = 0.0

    def begin(self) -> None:
        self.active += 1
        self.idle.clear()

    def end(self, now: float) -> None:
        self.active -= 1
        self.last_end = now
        if self.active == 0:
            self.idle.set()

    async def wait_quiet(self, quiet: float, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            await self.idle.wait()
            wait = self.last_end + quiet - loop.time()
            if wait <= 0 and self.idle.is_set():
                return
            await asyncio.sleep(max(wait, 0.01))


@dataclass
class FetchStats:
    """Compressed bytes fetched from the registry, by reason; served to the admin endpoint."""

    bytes: dict[str, int] = field(default_factory=lambda: {ON_DEMAND: 0, PREFETCH: 0, BACKGROUND: 0})
    requests: dict[str, int] = field(default_factory=lambda: {ON_DEMAND: 0, PREFETCH: 0, BACKGROUND: 0})
    chunks_fetched: int = 0
    # Chunks fetched again after an earlier fetch of them (evicted from the cache meanwhile, or
    # fetched twice by mistake): a cache too small for what is read shows up here.
    chunk_refetches: int = 0
    verify_failures: int = 0
    cache_write_failures: int = 0
    prefetch_done: bool = False
    background_done: bool = False

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
        }


@dataclass(frozen=True)
class _Stream:
    """One compressed stream (gzip member / zstd frame) and the chunks decoded from it."""

    blob: str  # "" for the layer's own blob
    offset: int
    size: int
    chunks: tuple[Chunk, ...]


def _streams(chunks: Iterable[Chunk]) -> list[_Stream]:
    by_stream: dict[tuple[str, int, int], dict[str, Chunk]] = {}
    for c in chunks:
        by_stream.setdefault((c.blob, c.compressed_offset, c.compressed_size), {})[c.digest] = c
    return [_Stream(b, off, size, tuple(cs.values())) for (b, off, size), cs in sorted(by_stream.items())]


def _batches(chunks: list[Chunk], max_bytes: int) -> list[list[Chunk]]:
    """Split chunks (in blob order) into runs of at most ``max_bytes`` compressed bytes."""
    batches: list[list[Chunk]] = []
    size = 0
    for c in sorted(chunks, key=lambda c: (c.blob, c.compressed_offset)):
        if not batches or size + c.compressed_size > max_bytes or c.blob != batches[-1][-1].blob:
            batches.append([])
            size = 0
        batches[-1].append(c)
        size += c.compressed_size
    return batches


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


async def _gather_none(coros: list[Coroutine[object, object, None]]) -> None:
    await asyncio.gather(*coros)


class LayerReader:
    def __init__(
        self,
        index: LayerIndex,
        blob: BlobSource,
        cache: ChunkCache,
        loop: asyncio.AbstractEventLoop,
        *,
        layer: str,
        other_blobs: Mapping[str, BlobSource] | None = None,
        config: ReaderConfig | None = None,
        executor: Executor | None = None,
        activity: OnDemandActivity | None = None,
    ) -> None:
        self.index = index
        self.blob = blob
        # Blobs of other layers of the image that hold some of this layer's chunks, by digest.
        self.blobs: dict[str, BlobSource] = {"": blob, **(other_blobs or {})}
        missing = set(index.blobs) - set(self.blobs)
        if missing:
            raise ValueError(f"layer {layer}: no source for blobs {sorted(missing)}")
        self.cache = cache
        self.loop = loop
        self.layer = layer
        self.config = config or ReaderConfig()
        # Decompression, hashing and cache I/O; a pool of its own so that they never wait behind
        # gRPC calls or mounts that are themselves waiting for chunks.
        self.executor = executor
        self.stats = FetchStats()
        self._fetched: set[str] = set()  # digests of the chunks this layer has fetched
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self._offsets: dict[str, list[int]] = {}  # per file: its chunks' file offsets, for bisect
        self.activity = activity or OnDemandActivity()
        # Per file: where its last read ended, the chunk it reached, the chunk its sequential
        # stream began in, and the bytes that stream has read.
        self._read_state: dict[str, tuple[int, int, int, int]] = {}
        # The layer's own chunks in blob order, built at the first small-file miss.
        self._blob_order: tuple[list[Chunk], list[int]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Chunks whose fetch outlasted a read's timeout and is still running (loop only); see _give_up.
        self._timed_out: set[str] = set()

    # --- reads from FUSE threads ------------------------------------------------------------

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a regular file, short at end of file. Blocks."""
        return self.read_extents([(entry, offset, size)])[0]

    def read_cached(self, extents: Sequence[tuple[Entry, int, int]]) -> list[bytes] | None:
        """The bytes of these file ranges if every chunk they need is in the cache, else None
        (nothing is fetched). Cheap enough to answer on the FUSE server's reading thread."""
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
        return out

    def read_extents(self, extents: Sequence[tuple[Entry, int, int]]) -> list[bytes]:
        """Bytes of several file ranges (each short at its file's end), fetching every missing
        chunk they need in one go: one READ of a data blob spans many small files. Blocks."""
        plans: list[tuple[list[tuple[Chunk, tuple[int, int]]], list[bytes | None]]] = []
        missing: dict[str, Chunk] = {}
        extra: list[Chunk] = []
        for entry, offset, size in extents:
            end = min(entry.size, offset + size)
            slices = self._slices(entry, offset, end)
            pieces: list[bytes | None] = [self.cache.read_range(c.digest, lo, hi) for c, (lo, hi) in slices]
            file_missing = [c for (c, _), piece in zip(slices, pieces, strict=True) if piece is None]
            for c in file_missing:
                missing.setdefault(c.digest, c)
            if slices:
                extra += self._plan_readahead(entry, offset, end, file_missing, extents_in_read=len(extents))
            plans.append((slices, pieces))
        extra = [c for c in extra if c.digest not in missing]
        fetched: dict[str, bytes] = {}
        if missing:
            future = asyncio.run_coroutine_threadsafe(
                self._ensure(list(missing.values()), extra, ON_DEMAND), self.loop
            )
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
        elif extra:
            asyncio.run_coroutine_threadsafe(self._ensure([], extra, ON_DEMAND), self.loop)
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

    def _slices(self, entry: Entry, offset: int, end: int) -> list[tuple[Chunk, tuple[int, int]]]:
        """The chunks of ``entry`` that [offset, end) touches, each with the slice of it needed (a
        read is small, chunks are large). A file may hold one chunk twice (zeros): kept by position."""
        if offset >= end:
            return []
        chunks = entry.chunks
        offsets = self._offsets.get(entry.name)
        if offsets is None:
            offsets = self._offsets[entry.name] = [c.file_offset for c in chunks]
        first = max(0, bisect.bisect_right(offsets, offset) - 1)
        last = first
        while last < len(chunks) and chunks[last].file_offset < end:
            last += 1
        return [
            (
                c,
                (
                    max(offset, c.file_offset) - c.file_offset,
                    min(end, c.file_offset + c.size) - c.file_offset,
                ),
            )
            for c in chunks[first:last]
        ]

    def _plan_readahead(
        self, entry: Entry, offset: int, end: int, missing: list[Chunk], *, extents_in_read: int
    ) -> list[Chunk]:
        """What to fetch ahead of this read of ``entry``, besides what it misses.

        Read ahead only for a file being read sequentially, and only once the stream has gone past
        the chunk it started in: a random access (a model loader seeking to one tensor), or a short
        read inside one chunk, should not pay for chunks it will never read. The window then grows
        with what the stream has read (from readahead_bytes up to 8 times), so a long stream keeps
        the link busy, however small the chunks."""
        offsets = self._offsets[entry.name]
        first = max(0, bisect.bisect_right(offsets, offset) - 1)
        last = first
        while last < len(entry.chunks) and entry.chunks[last].file_offset < end:
            last += 1
        prev_end, _prev_chunk, first_chunk, run = self._read_state.get(entry.name, (-1, -1, -1, 0))
        touched = last - 1  # the furthest chunk this read reaches
        # The kernel issues readahead requests in parallel, so a sequential stream arrives
        # slightly out of order: "near where the last read ended" counts as sequential.
        sequential = prev_end >= 0 and abs(offset - prev_end) <= SEQUENTIAL_SLACK_BYTES
        if sequential:
            run += end - offset
        else:
            run, first_chunk = 0, first
        self._read_state[entry.name] = (end, touched, first_chunk, run)
        window = 0
        if run and touched != first_chunk:
            window = min(max(run, self.config.readahead_bytes), self.config.readahead_bytes * 8)
        extra = self._readahead(entry, last, window) if window else []
        if missing and not extra and len(entry.chunks) == 1 and extents_in_read == 1:
            # A small file read for the first time: its neighbours in the blob are most likely
            # read next (a package's files lie together), so they share its round trip. (A read
            # spanning several files comes from a data blob, whose reader reads ahead itself.)
            extra = self._neighbours(missing[-1], self.config.small_file_readahead_bytes)
        if not missing and extra and touched == _prev_chunk:
            return []  # still inside the chunk whose readahead was asked for last time
        return extra

    def _neighbours(self, chunk: Chunk, budget: int) -> list[Chunk]:
        """Uncached chunks that follow ``chunk`` in its blob, up to ``budget`` compressed bytes."""
        if budget <= 0 or chunk.blob:
            return []
        if self._blob_order is None:  # FUSE threads may race here: each builds the same pair
            chunks = [c for c in self.all_chunks() if not c.blob]
            self._blob_order = (chunks, [c.compressed_offset for c in chunks])
        order, offsets = self._blob_order
        extra: list[Chunk] = []
        i = bisect.bisect_right(offsets, chunk.compressed_offset)
        while i < len(order) and budget > 0:
            c = order[i]
            budget -= c.compressed_size
            if c.digest != chunk.digest and c.digest not in self._inflight and c.digest not in self.cache:
                extra.append(c)
            i += 1
        return extra

    def _readahead(self, entry: Entry, after: int, budget: int) -> list[Chunk]:
        """Uncached chunks of the file from index ``after``, up to ``budget`` compressed bytes."""
        extra: list[Chunk] = []
        for i in range(after, len(entry.chunks)):
            c = entry.chunks[i]
            if budget <= 0:
                break
            budget -= c.compressed_size
            if c.digest not in self._inflight and c.digest not in self.cache:
                extra.append(c)
        return extra

    # --- fetching on the loop -------------------------------------------------------------------

    async def _ensure(self, wanted: list[Chunk], extra: list[Chunk], reason: str) -> dict[str, bytes]:
        """Bytes of every ``wanted`` chunk, fetching what no one is fetching yet (plus ``extra``,
        whose failure does not fail the read)."""
        if reason == ON_DEMAND:
            self.activity.begin()
        try:
            if any(c.digest in self._timed_out for c in wanted):
                raise ReadError(f"layer {self.layer}: still fetching chunks whose read timed out")
            # A chunk may have landed between the reader's cache check and now (a readahead
            # fetched it): take it from the cache rather than fetch it twice.
            landed: dict[str, bytes] = {}
            for c in wanted:
                if c.digest not in self._inflight and c.digest not in landed and c.digest in self.cache:
                    data = await self.loop.run_in_executor(self.executor, self.cache.get, c.digest)
                    if data is not None:
                        landed[c.digest] = data
            wanted = [c for c in wanted if c.digest not in landed]
            waits = {c.digest: self._inflight[c.digest] for c in wanted if c.digest in self._inflight}
            # One fetch per distinct chunk: a file of zeros repeats the same chunk many times.
            todo = list({c.digest: c for c in [*wanted, *extra] if c.digest not in self._inflight}.values())
            if todo:
                self._start_fetch(todo, reason)
                waits.update({c.digest: self._inflight[c.digest] for c in wanted if c.digest not in waits})
            result = landed
            for digest, fut in waits.items():
                try:
                    result[digest] = await asyncio.shield(fut)
                except Exception as exc:  # registry, format and cache errors alike: EIO to the reader
                    raise ReadError(f"layer {self.layer}: {exc}") from exc
            return result
        finally:
            if reason == ON_DEMAND:
                self.activity.end(self.loop.time())

    def _start_fetch(
        self, chunks: list[Chunk], reason: str, *, gap: int | None = None, max_bytes: int | None = None
    ) -> asyncio.Task[None]:
        """Register every chunk no one is fetching yet as in flight, then fetch them in one task."""
        streams = _streams(c for c in chunks if c.digest not in self._inflight)
        for s in streams:
            for c in s.chunks:
                fut = self.loop.create_future()
                fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
                self._inflight[c.digest] = fut
        by_blob: dict[str, list[_Stream]] = {}
        for s in streams:
            by_blob.setdefault(s.blob, []).append(s)
        fetches = [
            self._fetch(
                blob,
                group,
                coalesce(
                    group,
                    self.config.merge_gap_bytes if gap is None else gap,
                    self.config.max_request_bytes if max_bytes is None else max_bytes,
                ),
                reason,
            )
            for blob, group in by_blob.items()
        ]
        task = self.loop.create_task(_gather_none(fetches))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _fetch(
        self, blob: str, streams: list[_Stream], ranges: list[tuple[int, int]], reason: str
    ) -> None:
        try:
            started = time.monotonic()
            blobs = await self.blobs[blob].read_ranges(ranges)
            self.stats.bytes[reason] += sum(len(b) for b in blobs)
            self.stats.requests[reason] += len(ranges)
            log.debug(
                "fetched",
                extra={
                    "layer": self.layer,
                    "reason": reason,
                    "ranges": len(ranges),
                    "bytes": sum(len(b) for b in blobs),
                    "ms": round((time.monotonic() - started) * 1000, 1),
                },
            )
        except asyncio.CancelledError:
            for s in streams:
                self._fail(s.chunks, ReadError(f"layer {self.layer}: fetch cancelled"))
            raise
        except Exception as exc:  # the fetcher's errors
            for s in streams:
                self._fail(s.chunks, exc)
            log.warning("fetch failed", extra={"layer": self.layer, "reason": reason, "error": str(exc)})
            return
        jobs = []
        for s in streams:
            i = bisect.bisect_right([r[0] for r in ranges], s.offset) - 1
            start = s.offset - ranges[i][0]
            jobs.append((s, blobs[i][start : start + s.size]))
        await asyncio.gather(*(self._decode(s, raw) for s, raw in jobs))

    async def _decode(self, stream: _Stream, raw: bytes) -> None:
        """Decode and verify in a worker thread, hand the bytes to the readers waiting for them,
        then store them in the cache. Until stored, the chunks stay in flight (with their result
        set), so a read arriving meanwhile takes the bytes from there instead of fetching again."""
        try:
            decoded = await self.loop.run_in_executor(self.executor, self._decode_stream, stream, raw)
        except Exception as exc:
            if isinstance(exc, FormatError):
                self.stats.verify_failures += 1
            self._fail(stream.chunks, exc)
            return
        self.stats.chunks_fetched += len(decoded)
        refetched = self._fetched.intersection(decoded)
        self.stats.chunk_refetches += len(refetched)
        self._fetched.update(decoded)
        for c in stream.chunks:  # readers go on now, not after the cache write
            fut = self._inflight.get(c.digest)
            if fut is not None and not fut.done():
                fut.set_result(decoded[c.digest])
        try:
            self.stats.cache_write_failures += await self.loop.run_in_executor(
                self.executor, self._store, decoded
            )
        finally:
            for c in stream.chunks:
                self._resolve(c.digest, decoded[c.digest])

    def _decode_stream(self, stream: _Stream, raw: bytes) -> dict[str, bytes]:
        """Every chunk of the stream, verified, from one pass over it (not one per chunk: many
        small files may share a stream, and each decode starts at the stream's beginning)."""
        try:
            pieces = decode_stream(self.index.compression, raw, stream.chunks)
        except FormatError as exc:
            log.error(
                "chunk failed verification; not served, not cached",
                extra={"layer": self.layer, "blob": stream.blob, "offset": stream.offset, "error": str(exc)},
            )
            raise
        return {c.digest: piece for c, piece in zip(stream.chunks, pieces, strict=True)}

    def _store(self, decoded: dict[str, bytes]) -> int:
        """Cache verified chunks; returns how many could not be written."""
        failures = 0
        for digest, data in decoded.items():
            try:
                self.cache.put(digest, data)
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
        fut = self._inflight.pop(digest, None)
        if fut is not None and not fut.done():
            fut.set_result(data)

    def _fail(self, chunks: Iterable[Chunk], exc: BaseException) -> None:
        for c in chunks:
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

    def start(self) -> None:
        """Begin prefetch and background fetch (on the loop); returns at once."""
        task = self.loop.create_task(self._warm())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _warm(self) -> None:
        try:
            await self._prefetch()
            if self.config.background:
                await asyncio.sleep(self.config.background_delay_seconds)
                await self._background()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("prefetch/background fetch stopped", extra={"layer": self.layer, "error": str(exc)})

    def _uncached(self, chunks: Iterable[Chunk]) -> list[Chunk]:
        return [c for c in chunks if c.digest not in self.cache and c.digest not in self._inflight]

    async def _prefetch(self) -> None:
        if not self.config.prefetch:
            self.stats.prefetch_done = True
            return
        chunks = self.all_chunks()
        if self.index.blob_size > self.config.fetch_whole_below_bytes:
            end = self.index.prefetch_end
            # Prioritized chunks stored once per image in a lower layer's blob lie outside
            # [0, prefetch_end) of this blob; the prefetch list names them.
            elsewhere = {
                c.digest
                for name in self.index.prefetch
                if (e := self.index.entries.get(name)) is not None
                for c in e.chunks
                if c.blob
            }
            if self.index.no_prefetch or (end <= 0 and not elsewhere):
                self.stats.prefetch_done = True
                return
            chunks = [
                c
                for c in chunks
                if (not c.blob and c.compressed_offset + c.compressed_size <= end) or c.digest in elsewhere
            ]
        todo = await self.loop.run_in_executor(self.executor, self._uncached, chunks)
        # Everything prioritized lies in [0, prefetch_end): few large requests, a bounded number
        # in flight (memory), each resolving its chunks as it lands so reads need not wait for all.
        batches = _batches(todo, self.config.max_request_bytes)
        in_flight = asyncio.Semaphore(PREFETCH_PARALLEL_REQUESTS)

        async def fetch(batch: list[Chunk]) -> None:
            async with in_flight:
                await self._start_fetch(batch, PREFETCH, gap=1 << 62)

        await asyncio.gather(*(fetch(b) for b in batches))
        self.stats.prefetch_done = True

    async def _background(self) -> None:
        batch: list[Chunk] = []
        batch_bytes = 0
        for c in await self.loop.run_in_executor(self.executor, self._uncached, self.all_chunks()):
            batch.append(c)
            batch_bytes += c.compressed_size
            if batch_bytes >= self.config.background_batch_bytes:
                await self._background_batch(batch, batch_bytes)
                batch, batch_bytes = [], 0
        if batch:
            await self._background_batch(batch, batch_bytes)
        self.stats.background_done = True

    async def _background_batch(self, batch: list[Chunk], nbytes: int) -> None:
        # On-demand reads, of any layer, always go first.
        await self.activity.wait_quiet(self.config.background_quiet_seconds, self.loop)
        todo = [c for c in batch if c.digest not in self._inflight]
        if todo:
            started = time.monotonic()
            await self._start_fetch(todo, BACKGROUND)
            if self.config.background_rate_bytes > 0:
                budget = nbytes / self.config.background_rate_bytes
                await asyncio.sleep(max(0.0, budget - (time.monotonic() - started)))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._fail(
            [c for e in self.index.entries.values() for c in e.chunks],
            ReadError(f"layer {self.layer}: unmounted"),
        )
