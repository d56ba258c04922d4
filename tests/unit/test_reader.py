"""The chunk reader against an in-memory blob: bytes, singleflight, prefetch, verification, faults."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from snapshotter.cache import ChunkCache
from snapshotter.fetcher import UnreachableError
from snapshotter.formats import build_estargz, build_zstdchunked, detect, locate_toc, parse_toc
from snapshotter.formats.index import Chunk, Compression, Entry, EntryType, LayerIndex
from snapshotter.reader import LayerReader, ReaderConfig, ReadError
from snapshotter.scheduler import FetchScheduler, RestPolicy, SchedulerConfig
from tests.support import oci
from tests.support.lazy import MemoryBlob, wait_until
from tests.unit.formats.hostile import packed_layer

FILES = {
    "app/big.bin": os.urandom(700_000),
    "app/main.py": b"print('hello')\n" * 100,
    "etc/config.json": b'{"model": "tiny"}\n',
    "lib/a.so": os.urandom(150_000),
    "lib/b.so": os.urandom(90_000),
    "var/zeros": bytes(300_000),  # the same chunk five times over
}
PRIORITIZED = ["app/main.py", "etc/config.json"]


def layer_tar() -> bytes:
    entries: list[oci.Entry] = [oci.Dir("app"), oci.Dir("etc"), oci.Dir("lib"), oci.Dir("var")]
    entries += [oci.File(name, data) for name, data in FILES.items()]
    return oci.layer_tar(entries)


@dataclass
class Layer:
    index: LayerIndex
    blob: MemoryBlob
    cache: ChunkCache
    loop: asyncio.AbstractEventLoop

    def reader(
        self,
        *,
        rest: RestPolicy = RestPolicy.OFF,
        start: bool = False,
        link_rtt: float = 0.010,
        startup_files: list[str] | None = None,
        **config: object,
    ) -> LayerReader:
        """A reader whose registry scheduler fetches the rest of the layer per ``rest`` (by
        default never: only what is read); ``start`` offers its startup set and rest at once.
        The scheduler assumes a 1 Gbit/s link of ``link_rtt`` (memory blobs say nothing)."""
        cfg = ReaderConfig(**{"prefetch": False, **config})  # type: ignore[arg-type]
        scheduler_config = SchedulerConfig(rest=rest, initial_rtt=link_rtt)
        future = asyncio.run_coroutine_threadsafe(
            self._make(cfg, scheduler_config, start, startup_files), self.loop
        )
        return future.result(5)

    async def _make(
        self,
        cfg: ReaderConfig,
        scheduler_config: SchedulerConfig,
        start: bool,
        startup_files: list[str] | None = None,
    ) -> LayerReader:
        scheduler = FetchScheduler(self.loop, scheduler_config)
        reader = LayerReader(
            self.index,
            self.blob,
            self.cache,
            self.loop,
            layer="sha256:test",
            scheduler=scheduler,
            config=cfg,
            startup_files=startup_files,
        )
        if start:
            reader.start()
        return reader

    def read_file(self, reader: LayerReader, name: str, step: int = 65536) -> bytes:
        entry = self.index.entries[name]
        return b"".join(reader.read(entry, off, step) for off in range(0, entry.size, step))


def make_layer(tmp_path: Path, loop: asyncio.AbstractEventLoop, compression: Compression) -> Layer:
    build = build_estargz if compression == Compression.GZIP else build_zstdchunked
    built = build(layer_tar(), chunk_size=64 << 10, prioritized_files=PRIORITIZED)
    size = len(built.blob)
    location = locate_toc(built.blob[-4096:], size, built.annotations)
    raw = built.blob[location.offset : location.offset + location.length]
    index = parse_toc(raw, location, blob_size=size, expected_digest=built.toc_digest)
    return Layer(index, MemoryBlob(built.blob), ChunkCache(tmp_path / "cache", 1 << 30), loop)


@pytest.fixture(params=[Compression.GZIP, Compression.ZSTD], ids=["estargz", "zstdchunked"])
def layer(request: pytest.FixtureRequest, tmp_path: Path, loop: asyncio.AbstractEventLoop) -> Layer:
    return make_layer(tmp_path, loop, request.param)


def test_reads_return_the_files_bytes(layer: Layer) -> None:
    reader = layer.reader()
    rnd = random.Random(1)
    for name, data in FILES.items():
        entry = layer.index.entries[name]
        assert layer.read_file(reader, name, step=rnd.choice([4096, 65536, 131072, 1 << 20])) == data
        for _ in range(20):  # arbitrary unaligned ranges, including past the end
            off = rnd.randrange(0, len(data) + 10)
            size = rnd.randrange(1, 200_000)
            assert reader.read(entry, off, size) == data[off : off + size]
    fetched = layer.blob.bytes_served
    for name, data in FILES.items():
        assert layer.read_file(reader, name) == data
    assert layer.blob.bytes_served == fetched  # second pass: all from the cache


def test_readahead_only_for_sequential_reads(layer: Layer) -> None:
    reader = layer.reader(readahead_bytes=1 << 20, start=True)
    big = layer.index.entries["app/big.bin"]
    reader.read(big, big.chunks[-1].file_offset, 100)  # a random access: only its chunk
    assert reader.stats.chunks_fetched == 1
    reader.read(big, 0, 4096)  # a jump back of 640 KB: still not sequential
    assert reader.stats.chunks_fetched == 2
    assert reader.stats.bytes["readahead"] == 0
    reader.read(big, 4096, 65536)  # continues the last read and reaches chunk 1: a stream
    # The read returns before the readahead is decoded; 1 MiB of readahead covers the rest.
    assert wait_until(lambda: reader.stats.chunks_fetched == len(big.chunks))
    assert reader.stats.bytes["readahead"] > 0


def test_repeated_chunks_are_fetched_once(layer: Layer) -> None:
    reader = layer.reader(readahead_bytes=0)
    zeros = layer.index.entries["var/zeros"]
    assert len({c.digest for c in zeros.chunks}) < len(zeros.chunks)
    assert reader.read(zeros, 0, zeros.size) == FILES["var/zeros"]
    assert layer.read_file(reader, "var/zeros", step=4096) == FILES["var/zeros"]
    assert reader.stats.chunks_fetched == len({c.digest for c in zeros.chunks})


def test_concurrent_readers_fetch_each_chunk_once(layer: Layer) -> None:
    reader = layer.reader(readahead_bytes=0, merge_gap_bytes=0)
    layer.blob.stall.clear()  # hold the first fetch until every reader is waiting
    with ThreadPoolExecutor(16) as pool:
        results = [pool.submit(layer.read_file, reader, "app/big.bin") for _ in range(16)]
        layer.loop.call_soon_threadsafe(layer.loop.call_later, 0.3, layer.blob.stall.set)
        assert all(r.result(30) == FILES["app/big.bin"] for r in results)
    ranges = [r for req in layer.blob.requests for r in req]
    assert len(ranges) == len(set(ranges))  # no byte range requested twice
    big = layer.index.entries["app/big.bin"]
    assert layer.blob.bytes_served <= sum(c.compressed_size for c in big.chunks)


def test_prefetch_fetches_prioritized_files_in_one_request(layer: Layer) -> None:
    files = [n for n in layer.index.prefetch if layer.index.entries[n].type == EntryType.REG]
    assert files == PRIORITIZED  # in access order, with their parent directories around them
    reader = layer.reader(prefetch=True, start=True)
    assert wait_until(lambda: reader.stats.prefetch_done and not reader._inflight)
    assert len(layer.blob.requests) == 1 and len(layer.blob.requests[0]) == 1  # one range
    assert layer.blob.requests[0][0][1] <= layer.index.prefetch_end
    for name in PRIORITIZED:
        assert layer.read_file(reader, name) == FILES[name]
    assert len(layer.blob.requests) == 1  # served from what prefetch cached
    assert reader.stats.bytes["on_demand"] == 0 and reader.stats.bytes["prefetch"] > 0


def test_a_startup_profile_replaces_the_prioritized_files(layer: Layer) -> None:
    """An image's startup profile (recorded, or shared through the registry) names what to fetch
    first: its files in this layer, in its order; the layer's own prefetch list is not fetched."""
    reader = layer.reader(prefetch=True, start=True, startup_files=["lib/b.so", "etc/config.json"])
    assert wait_until(lambda: reader.stats.prefetch_done and not reader._inflight)
    fetched = reader.stats.bytes["prefetch"]
    wanted = layer.index.entries["lib/b.so"].chunks + layer.index.entries["etc/config.json"].chunks
    assert fetched >= sum(c.compressed_size for c in wanted)
    assert all(c.digest in layer.cache for c in wanted)
    assert not any(c.digest in layer.cache for c in layer.index.entries["app/main.py"].chunks)
    served = len(layer.blob.requests)
    assert layer.read_file(reader, "lib/b.so") == FILES["lib/b.so"]
    assert len(layer.blob.requests) == served and reader.stats.bytes["on_demand"] == 0


def test_a_startup_profile_scattered_over_the_blob_fetches_its_files_not_the_gaps(layer: Layer) -> None:
    """A profile shared for an image not converted with it names files far apart in the blob:
    prefetch fetches their streams (not the files between), and the rest then fetches each byte
    of the blob at most once."""
    names = ["lib/b.so", "etc/config.json"]  # app/big.bin and lib/a.so lie between them
    wanted = {(c.compressed_offset, c.compressed_size) for n in names for c in layer.index.entries[n].chunks}
    between = sum(
        c.compressed_size for n in ("app/big.bin", "lib/a.so") for c in layer.index.entries[n].chunks
    )
    slack = 2 * ReaderConfig().merge_gap_bytes
    reader = layer.reader(prefetch=True, start=True, startup_files=names, rest=RestPolicy.EAGER)
    assert wait_until(lambda: reader.stats.background_done and not reader._inflight)
    assert reader.stats.bytes["prefetch"] <= sum(size for _, size in wanted) + slack < between
    assert layer.blob.bytes_served <= len(layer.blob.data)  # each byte at most once
    for name, data in FILES.items():
        assert layer.read_file(reader, name) == data
    assert reader.stats.bytes["on_demand"] == 0


def test_the_rest_of_the_layer_is_fetched_eagerly_unless_told_otherwise(layer: Layer) -> None:
    reader = layer.reader(rest=RestPolicy.EAGER, start=True)
    assert wait_until(lambda: reader.stats.background_done)
    assert reader.stats.bytes["background"] > 0 and reader.stats.bytes["on_demand"] == 0
    served = layer.blob.bytes_served
    assert served <= len(layer.blob.data)  # each byte at most once
    for name, data in FILES.items():
        assert layer.read_file(reader, name) == data
    assert layer.blob.bytes_served == served  # everything came from the cache


def test_chunk_with_wrong_digest_is_never_served_or_cached(layer: Layer) -> None:
    """The stream decodes fine but to bytes other than the TOC promised (a tampered registry)."""
    entry = layer.index.entries["lib/a.so"]
    chunk = entry.chunks[1]
    entry.chunks[1] = dataclasses.replace(chunk, digest="sha256:" + hashlib.sha256(b"other").hexdigest())
    chunk = entry.chunks[1]
    reader = layer.reader(readahead_bytes=0)
    with pytest.raises(ReadError):
        reader.read(entry, chunk.file_offset, 10)
    assert chunk.digest not in layer.cache
    assert reader.stats.verify_failures >= 1
    assert reader.read(entry, 0, 100) == FILES["lib/a.so"][:100]  # other chunks still serve


def test_a_bad_chunk_among_many_fetched_together_fails_only_itself(layer: Layer) -> None:
    """The rest of the layer arrives in a few big fetches, each decoded as one batch: a chunk that
    fails verification fails its own reads and is not cached; every other chunk of the same
    fetches is served and cached."""
    entry = layer.index.entries["lib/a.so"]
    bad = entry.chunks[1]
    entry.chunks[1] = dataclasses.replace(bad, digest="sha256:" + hashlib.sha256(b"other").hexdigest())
    bad = entry.chunks[1]
    reader = layer.reader(rest=RestPolicy.EAGER, start=True)
    assert wait_until(lambda: reader.stats.verify_failures >= 1)
    assert bad.digest not in layer.cache
    good = [c for e in layer.index.entries.values() for c in e.chunks if c.digest != bad.digest]
    assert wait_until(lambda: all(c.digest in layer.cache for c in good))
    served = layer.blob.bytes_served
    for name, data in FILES.items():
        if name != "lib/a.so":
            assert layer.read_file(reader, name) == data
    assert layer.blob.bytes_served == served  # all of it from the cache
    with pytest.raises(ReadError):
        reader.read(entry, bad.file_offset, 10)


def test_registry_failure_then_recovery(layer: Layer) -> None:
    reader = layer.reader()
    entry = layer.index.entries["lib/b.so"]
    layer.blob.fail = UnreachableError("registry went away", host="127.0.0.1:1")
    with pytest.raises(ReadError):
        reader.read(entry, 0, 100)
    layer.blob.fail = None
    assert reader.read(entry, 0, 100) == FILES["lib/b.so"][:100]


def test_corrupt_stream_is_an_error(layer: Layer) -> None:
    entry = layer.index.entries["lib/a.so"]
    chunk = entry.chunks[2]
    layer.blob.data[chunk.compressed_offset + chunk.compressed_size // 2] ^= 0xFF
    with pytest.raises(ReadError):
        layer.reader(readahead_bytes=0).read(entry, chunk.file_offset, 10)
    assert chunk.digest not in layer.cache


def test_prefetch_joins_an_on_demand_fetch_in_flight(layer: Layer) -> None:
    """A read and the prefetch racing for the same chunk: both get it, from one fetch."""
    reader = layer.reader(readahead_bytes=0, prefetch=True)
    entry = layer.index.entries["app/main.py"]
    layer.blob.stall.clear()
    with ThreadPoolExecutor(1) as pool:
        read = pool.submit(reader.read, entry, 0, entry.size)
        assert wait_until(lambda: layer.blob.arrived == 1)  # the read's fetch is in flight, stalled
        layer.loop.call_soon_threadsafe(reader.start)
        # The prefetch joined main.py's fetch and asked only for config.json, stalled too.
        assert wait_until(lambda: layer.blob.arrived == 2)
        layer.loop.call_soon_threadsafe(layer.blob.stall.set)
        assert read.result(10) == FILES["app/main.py"]
        assert wait_until(lambda: reader.stats.prefetch_done and not reader._inflight)
    ranges = [r for req in layer.blob.requests for r in req]
    assert len(ranges) == len(set(ranges))


def test_read_times_out_with_an_error(layer: Layer) -> None:
    reader = layer.reader(read_timeout=0.3)
    layer.blob.stall.clear()
    entry = layer.index.entries["lib/b.so"]
    with pytest.raises(ReadError, match="timed out"):
        reader.read(entry, 0, 100)
    # The kernel re-reads a page whose read failed at once: while the stalled fetch goes on, that
    # re-read must fail at once too ("still fetching"), not wait a second full timeout ("timed out").
    with pytest.raises(ReadError, match="still fetching"):
        reader.read(entry, 0, 100)
    layer.blob.stall.set()

    def reads_again() -> bool:  # once the fetch has landed, the same read succeeds
        try:
            return reader.read(entry, 0, 100) == FILES["lib/b.so"][:100]
        except ReadError:
            return False

    assert wait_until(reads_again, timeout=10)


def test_full_disk_degrades_caching_not_reads(layer: Layer, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(digest: str, data: bytes, *, speculative: bool = False) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(layer.cache, "put", full)
    reader = layer.reader()
    assert layer.read_file(reader, "lib/b.so") == FILES["lib/b.so"]
    # Readers get their bytes before the cache write is tried; the failure is counted after.
    assert wait_until(lambda: reader.stats.cache_write_failures > 0, timeout=5)


def test_cache_survives_restart_and_rejects_torn_chunks(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20)
    good, torn = b"a" * 1000, b"b" * 1000
    dg, dt = ("sha256:" + hashlib.sha256(x).hexdigest() for x in (good, torn))
    cache.put(dg, good)
    cache.put(dt, torn)
    path = next(p for p in (tmp_path / "chunks").rglob("*") if p.name == dt.split(":")[1])
    path.write_bytes(torn[:500])  # as if the machine crashed mid-write
    reopened = ChunkCache(tmp_path, 1 << 20)
    assert reopened.get(dg) == good
    assert reopened.get(dt) is None and dt not in reopened


def test_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 10_000)
    digests = []
    for i in range(12):
        data = bytes([i]) * 1000
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        digests.append(digest)
        cache.put(digest, data)
        if i == 0:
            continue
        assert cache.get(digests[0]) is not None  # keep the first one hot
    assert cache.total_bytes <= 10_000
    assert digests[0] in cache and digests[1] not in cache
    assert sum(1 for p in (tmp_path / "chunks").rglob("*") if p.is_file()) == len(cache._lru)


def test_chunks_in_another_blob_are_read_from_that_blob(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """A Nydus-like layer may keep some chunks in a lower layer's blob: reads, prefetch and the
    background fetch must take each chunk from the blob it names, and only from there."""
    pieces = [os.urandom(40_000), os.urandom(40_000), os.urandom(25_000)]
    own, other = bytearray(), bytearray(b"\0" * 100)  # the other blob's frames start at 100
    chunks = []
    file_offset = 0
    for i, data in enumerate(pieces):
        frame = zstandard.ZstdCompressor().compress(data)
        target = other if i == 1 else own
        chunks.append(
            Chunk(
                file_offset=file_offset,
                size=len(data),
                compressed_offset=len(target),
                compressed_size=len(frame),
                inner_offset=0,
                digest="sha256:" + hashlib.sha256(data).hexdigest(),
                blob="sha256:" + "b" * 64 if i == 1 else "",
            )
        )
        target += frame
        file_offset += len(data)
    entry = Entry("f", EntryType.REG, 0o644, size=file_offset, chunks=chunks)
    index = LayerIndex(
        "nydus",
        Compression.ZSTD,
        {"": Entry("", EntryType.DIR, 0o755), "f": entry},
        blob_size=len(own),
        blobs={"sha256:" + "b" * 64: len(other)},
    )
    own_blob, other_blob = MemoryBlob(bytes(own)), MemoryBlob(bytes(other))
    cache = ChunkCache(tmp_path / "cache", 1 << 30)

    async def make() -> LayerReader:
        cfg = ReaderConfig(prefetch=False, readahead_bytes=1)
        return LayerReader(
            index,
            own_blob,
            cache,
            loop,
            layer="sha256:test",
            scheduler=FetchScheduler(loop, SchedulerConfig(rest=RestPolicy.OFF)),
            config=cfg,
            other_blobs={"sha256:" + "b" * 64: other_blob},
        )

    reader = asyncio.run_coroutine_threadsafe(make(), loop).result(5)
    assert reader.read(entry, 0, file_offset) == b"".join(pieces)
    c1 = chunks[1]
    assert other_blob.requests == [[(c1.compressed_offset, c1.compressed_offset + c1.compressed_size)]]
    assert all(a >= 0 and b <= len(own) for req in own_blob.requests for a, b in req)
    assert sum(b - a for req in own_blob.requests for a, b in req) == len(own)

    async def no_source() -> LayerReader:
        return LayerReader(index, own_blob, cache, loop, layer="sha256:test", scheduler=FetchScheduler(loop))

    with pytest.raises(ValueError, match="no source for blobs"):
        asyncio.run_coroutine_threadsafe(no_source(), loop).result(5)


def test_a_miss_fetches_what_it_reads_and_nothing_more(layer: Layer) -> None:
    """On-demand bytes are what reads need: neighbours and the rest of the layer are the
    scheduler's business (its rest policy), counted apart."""
    reader = layer.reader(readahead_bytes=0)
    config = layer.index.entries["etc/config.json"]
    assert len(config.chunks) == 1
    assert reader.read(config, 0, 4096) == FILES["etc/config.json"]
    assert layer.blob.requests == [
        [
            (
                config.chunks[0].compressed_offset,
                config.chunks[0].compressed_offset + config.chunks[0].compressed_size,
            )
        ]
    ]
    assert reader.stats.bytes["on_demand"] == config.chunks[0].compressed_size
    assert reader.stats.chunks_fetched == 1


def test_short_sequential_reads_fetch_little_more_than_they_read(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """Readahead grows with what a stream has read, not with the number of chunks it crossed:
    with 64 KiB chunks, reading 320 KiB of a file sequentially fetches about 320 KiB plus one
    readahead window, not the 8-window maximum."""
    data = os.urandom(4 << 20)
    built = build_zstdchunked(oci.layer_tar([oci.File("big", data)]), chunk_size=64 << 10)
    size = len(built.blob)
    location = locate_toc(built.blob[-4096:], size, built.annotations)
    raw = built.blob[location.offset : location.offset + location.length]
    index = parse_toc(raw, location, blob_size=size, expected_digest=built.toc_digest)
    big = Layer(index, MemoryBlob(built.blob), ChunkCache(tmp_path / "cache", 1 << 30), loop)
    window = 128 << 10
    reader = big.reader(readahead_bytes=window, start=True, link_rtt=0.001)  # a 125 KB link
    entry = index.entries["big"]
    for off in range(0, 320 << 10, 32 << 10):  # the kernel's 32 KiB reads, in order
        assert reader.read(entry, off, 32 << 10) == data[off : off + (32 << 10)]
    assert wait_until(lambda: not reader._inflight, timeout=5)
    fetched = sum(reader.stats.bytes.values())
    # At most the read + 3 windows' worth (a window: the larger of readahead_bytes and 2 BDP).
    assert fetched <= (320 << 10) + 3 * max(window, 2 * 125_000), fetched


def test_a_chunk_that_landed_after_the_readers_cache_check_is_not_fetched_again(layer: Layer) -> None:
    """A reader missed the cache, then a readahead stored the chunk before the reader's fetch
    started: the fetch takes it from the cache instead of asking the registry again."""
    reader = layer.reader(readahead_bytes=0)
    entry = layer.index.entries["lib/b.so"]
    chunk = entry.chunks[0]
    assert reader.read(entry, 0, 10) == FILES["lib/b.so"][:10]
    assert wait_until(lambda: not reader._inflight and chunk.digest in layer.cache, timeout=5)  # stored
    served = len(layer.blob.requests)
    future = asyncio.run_coroutine_threadsafe(reader._ensure([chunk]), layer.loop)
    data = future.result(5)
    assert data[chunk.digest][:10] == FILES["lib/b.so"][:10]
    assert len(layer.blob.requests) == served


class TricklingBlob(MemoryBlob):
    """A slow link that keeps delivering: the answer takes several read timeouts in all, but a
    byte arrives well within each (as the fetcher reports through ``last_byte_at``)."""

    def __init__(self, data: bytes, beats: int, interval: float) -> None:
        super().__init__(data)
        self.beats, self.interval = beats, interval
        self.last_byte_at = 0.0

    async def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        for _ in range(self.beats):
            await asyncio.sleep(self.interval)
            self.last_byte_at = time.monotonic()
        return await super().read_ranges(ranges)


def test_a_slow_link_that_keeps_delivering_is_waited_for(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """Issue 16: a read fails only when no byte has arrived for read.timeout_seconds."""
    layer = make_layer(tmp_path, loop, Compression.GZIP)
    timeout = 0.6
    layer.blob = TricklingBlob(bytes(layer.blob.data), beats=6, interval=timeout / 3)  # 2 timeouts in all
    entry = layer.index.entries["lib/b.so"]
    reader = layer.reader(read_timeout=timeout, readahead_bytes=0)
    assert reader.read(entry, 0, 100) == FILES["lib/b.so"][:100]
    dead = TricklingBlob(bytes(layer.blob.data), beats=0, interval=0)
    dead.stall.clear()
    layer.blob = dead
    with pytest.raises(ReadError, match="no byte arrived"):
        layer.reader(read_timeout=timeout, readahead_bytes=0).read(entry, 70_000, 100)
    dead.stall.set()


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD], ids=["estargz", "zstdchunked"])
def test_a_stream_shared_by_many_chunks_is_inflated_once_per_fetch(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, compression: Compression, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ctr-remote --estargz-min-chunk-size packs many small files into one stream; decoding each
    chunk from the stream's start would inflate it once per chunk (quadratic)."""
    files = {f"pkg/f{i:03d}.py": b"# module %d\n" % i * (i + 1) for i in range(200)}
    blob, digest, annotations = packed_layer(compression, files)
    location = locate_toc(blob[-4096:], len(blob), annotations)
    raw = blob[location.offset : location.offset + location.length]
    index = parse_toc(raw, location, blob_size=len(blob), expected_digest=digest)
    inflated: list[int] = []
    real = detect.inflate_prefix

    def counting(compression: Compression, data: bytes, want: int) -> bytes:
        inflated.append(want)
        return real(compression, data, want)

    monkeypatch.setattr(detect, "inflate_prefix", counting)
    layer = Layer(index, MemoryBlob(blob), ChunkCache(tmp_path / "cache", 1 << 30), loop)
    reader = layer.reader(rest=RestPolicy.EAGER, start=True)
    assert wait_until(lambda: reader.stats.background_done)
    assert len(layer.blob.requests) == 1
    stream_end = max(c.inner_offset + c.size for e in index.entries.values() for c in e.chunks)
    assert inflated == [stream_end]  # one pass over the stream for all 200 chunks
    for name, data in files.items():
        assert layer.read_file(reader, name) == data
    assert len(layer.blob.requests) == 1


def test_chunks_in_the_tail_fetched_at_mount_are_not_fetched_again(layer: Layer) -> None:
    """The mount fetched the blob's tail for the footer and TOC; the chunks it holds are used."""
    reader = layer.reader()
    tail_start = max(0, layer.index.toc_offset - (256 << 10))
    tail = bytes(layer.blob.data[tail_start : layer.index.toc_offset])
    layer.loop.call_soon_threadsafe(reader.seed, tail_start, tail)
    inside = [
        c
        for e in layer.index.entries.values()
        for c in e.chunks
        if c.compressed_offset >= tail_start
        and c.compressed_offset + c.compressed_size <= layer.index.toc_offset
    ]
    assert inside
    assert wait_until(lambda: all(c.digest in layer.cache for c in inside))
    for entry in {
        e.name: e for e in layer.index.entries.values() if set(e.chunks) <= set(inside) and e.chunks
    }.values():
        assert reader.read(entry, 0, entry.size) == FILES[entry.name]
    assert layer.blob.requests == []  # nothing fetched


class SlowFailingBlob(MemoryBlob):
    """A registry that answers nothing for a while, then gives up: a stall."""

    def __init__(self, data: bytes, delay: float) -> None:
        super().__init__(data)
        self.delay = delay

    async def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.arrived += 1
        await asyncio.sleep(self.delay)
        raise UnreachableError("no data; gave up", host="127.0.0.1:1")


def test_a_re_read_right_after_a_stall_fails_at_once(layer: Layer) -> None:
    """The kernel re-reads a page whose read failed at once; after a stall that must not start
    another full wait. A fetch that fails fast is tried again (see the recovery test above)."""
    layer.blob = SlowFailingBlob(bytes(layer.blob.data), delay=0.4)
    reader = layer.reader(read_timeout=0.5)
    entry = layer.index.entries["lib/b.so"]
    with pytest.raises(ReadError):
        reader.read(entry, 0, 100)
    assert wait_until(lambda: not reader._inflight)
    with pytest.raises(ReadError, match="fetch failed moments ago"):
        reader.read(entry, 0, 100)
    assert layer.blob.arrived == 1  # no second request


def make_gzindex_layer(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> Layer:
    """The same files as a plain gzip layer with a gzip index of 64 KiB spans."""
    import gzip

    from snapshotter.formats.build_gzindex import build_index
    from tests.support.gzindex import parsed

    blob = gzip.compress(layer_tar(), 6, mtime=0)
    built = build_index(blob, span=64 << 10, threads=1)
    index = parsed(built.data, built.layer, len(blob))
    return Layer(index, MemoryBlob(blob), ChunkCache(tmp_path / "cache", 1 << 30), loop)


def test_a_gzip_index_layer_reads_right_and_decodes_each_span_once(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    layer = make_gzindex_layer(tmp_path, loop)
    assert layer.index.whole_streams and len(layer.index.resume_points) > 5
    reader = layer.reader()
    rnd = random.Random(2)
    for name, data in FILES.items():
        entry = layer.index.entries[name]
        assert layer.read_file(reader, name, step=rnd.choice([4096, 65536, 1 << 20])) == data
        off = rnd.randrange(0, len(data))
        assert reader.read(entry, off, 5000) == data[off : off + 5000]
    # Every span was fetched once: the chunks nobody asked for came along with the first read of
    # their span and were kept (as fetched ahead).
    spans = {(c.compressed_offset, c.compressed_size) for e in layer.index.entries.values() for c in e.chunks}
    assert layer.blob.bytes_served <= sum(size for _, size in spans)
    assert reader.stats.chunk_refetches == 0


def test_small_files_of_one_span_cost_one_fetch(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    layer = make_gzindex_layer(tmp_path, loop)
    reader = layer.reader()
    main, config = layer.index.entries["app/main.py"], layer.index.entries["etc/config.json"]
    assert main.chunks[0].compressed_offset == config.chunks[-1].compressed_offset  # same span
    assert reader.read(main, 0, 100) == FILES["app/main.py"][:100]
    served = layer.blob.bytes_served
    assert reader.read(config, 0, 100) == FILES["etc/config.json"]
    assert layer.blob.bytes_served == served
