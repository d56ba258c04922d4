"""What a hostile eStargz / zstd:chunked layer can cost: each chunk's stream prefix is bounded by
the chunk limit (innerOffset bombs), each chunk's compressed range by what its stream can need
(no 10 GiB request for a 4 KiB chunk), chunks sharing a stream decode it once, and no two chunks
of a stream overlap. Memory is measured in a subprocess (``tests.support.memory``)."""

from __future__ import annotations

import dataclasses
import os
import tracemalloc
from pathlib import Path

import pytest

from benchmarks import toc_cost
from snapshotter.formats import (
    DEFAULT_MAX_CHUNK_BYTES,
    Chunk,
    ChunkDigestError,
    Compression,
    FormatError,
    compressed_bound,
    decode_stream,
    decompress_chunk,
)
from snapshotter.formats.toc import index_from_toc
from tests.support.memory import peak_growth
from tests.unit.formats import COMPRESSIONS, file_bytes, parse_blob
from tests.unit.formats.hostile import compress, inner_offset_bomb, packed_layer, sha256

GIB = 1 << 30


@pytest.fixture(params=COMPRESSIONS, ids=["estargz", "zstdchunked"])
def compression(request: pytest.FixtureRequest) -> Compression:
    return request.param  # type: ignore[no-any-return]


# -- innerOffset bombs (issue 14.4) ----------------------------------------------------------------

_BOMB = """
from snapshotter.formats.index import Compression
from tests.unit.formats import file_bytes, parse_blob
from tests.unit.formats.hostile import inner_offset_bomb
blob, digest, annotations = inner_offset_bomb(Compression.{name}, 256 << 20)
"""
_PARSE_AND_READ = """
index = parse_blob(blob, digest, annotations)
result = len(file_bytes(blob, index, "bomb"))
"""


def test_inner_offset_bomb_costs_no_memory(compression: Compression) -> None:
    """A ~0.26 MB stream whose only chunk lies 256 MiB into it: refused at parse time, before
    a byte of it is inflated."""
    measured = peak_growth(_BOMB.format(name=compression.name), _PARSE_AND_READ)
    assert measured.error is not None, f"read {measured.result} bytes"
    assert measured.error[0] == "FormatError"
    assert "'bomb'" in measured.error[1] and "chunk limit" in measured.error[1]
    assert measured.growth < 32 << 20, f"{measured.growth_mib:.0f} MiB"


def test_inner_offset_plus_size_within_the_chunk_limit(compression: Compression) -> None:
    blob, digest, annotations = inner_offset_bomb(compression, 1 << 20, size=16)
    index = parse_blob(blob, digest, annotations, max_chunk_bytes=1 << 20)  # exactly at the limit
    assert file_bytes(blob, index, "bomb") == bytes(16)
    with pytest.raises(FormatError, match=r"'bomb'.*innerOffset 1048560 \+ size 16.*(1048575|chunk limit)"):
        parse_blob(blob, digest, annotations, max_chunk_bytes=(1 << 20) - 1)


def test_decode_refuses_a_chunk_beyond_the_limit_without_inflating() -> None:
    # Chunks that did not come from our parser (a cached index, a test) are checked again.
    bomb = compress(Compression.GZIP, bytes(64 << 20))
    chunk = Chunk(0, 10, 0, len(bomb), (64 << 20) - 5, sha256(bytes(10)))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=r"chunk limit"):
            decompress_chunk(Compression.GZIP, bomb, chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# -- compressed ranges (issue 14.3) -----------------------------------------------------------------


def test_a_lonely_chunk_is_not_a_10_gib_request(compression: Compression) -> None:
    """The chunk's range used to run up to the next stream start: here the TOC, 10 GiB later."""
    data = os.urandom(4096)
    toc = {
        "version": 1,
        "entries": [
            {"name": "f", "type": "reg", "size": 4096, "offset": 0, "chunkDigest": sha256(data)},
        ],
    }
    index = index_from_toc(
        toc, format="estargz", compression=compression, toc_offset=10 * GIB, blob_size=11 * GIB
    )
    (chunk,) = index.entries["f"].chunks
    assert chunk.compressed_size == compressed_bound(4096) < 1 << 20


def test_range_bound_is_linear_in_what_the_stream_must_yield() -> None:
    assert compressed_bound(0) > 128 << 10  # a whole zstd block may hold a chunk's last byte
    assert compressed_bound(4 << 20) - compressed_bound(2 << 20) == 2 * (2 << 20)
    assert compressed_bound(DEFAULT_MAX_CHUNK_BYTES) < 3 * DEFAULT_MAX_CHUNK_BYTES


def test_stream_with_trailing_headers_is_capped_and_still_decodes(compression: Compression) -> None:
    """An honest stream may go on after its last chunk (SGZ writes the tar headers of the
    entries that follow into the same stream): the range is cut to what the chunks need."""
    files = {f"f{i}": os.urandom(1000 + i) for i in range(5)}
    trailer = os.urandom(2 << 20)  # incompressible: the stream is > 2 MiB
    blob, digest, annotations = packed_layer(compression, files, trailer=trailer)
    index = parse_blob(blob, digest, annotations)
    chunks = [index.entries[name].chunks[0] for name in files]
    need = max(c.inner_offset + c.size for c in chunks)
    assert {c.compressed_size for c in chunks} == {compressed_bound(need)}  # one range per stream
    assert compressed_bound(need) < index.toc_offset
    for name, data in files.items():
        assert file_bytes(blob, index, name) == data


def test_end_offset_is_capped_too() -> None:
    data = os.urandom(100)
    stream = compress(Compression.ZSTD, data)
    entry = {
        "name": "f",
        "type": "reg",
        "size": 100,
        "offset": 0,
        "endOffset": 5 * GIB,
        "chunkDigest": sha256(data),
    }
    toc = {"version": 1, "entries": [entry]}
    index = index_from_toc(
        toc, format="zstdchunked", compression=Compression.ZSTD, toc_offset=10 * GIB, blob_size=11 * GIB
    )
    chunk = index.entries["f"].chunks[0]
    assert chunk.compressed_size == compressed_bound(100)
    assert decompress_chunk(Compression.ZSTD, stream, chunk) == data


# -- chunks sharing a stream -------------------------------------------------------------------------


def test_overlapping_chunks_in_one_stream_are_refused(compression: Compression) -> None:
    """Chunk i at innerOffset i of one stream: N chunks, N distinct contents, N copies of the
    stream in memory when fetched together. Honest writers never overlap chunks."""
    data = os.urandom(4096)
    stream = compress(compression, data)
    entries: list[dict[str, object]] = [
        {
            "name": f"f{i}",
            "type": "reg",
            "size": 4000,
            "offset": 0,
            "innerOffset": i,
            "chunkDigest": sha256(data[i : i + 4000]),
        }
        for i in range(3)
    ]
    toc = {"version": 1, "entries": entries}
    with pytest.raises(FormatError, match=r"'f1'.*overlaps.*'f0'"):
        index_from_toc(
            toc, format="x", compression=compression, toc_offset=len(stream), blob_size=len(stream) + 64
        )
    # The same chunk listed twice (same place, same digest) is one chunk, not an overlap.
    entries[1].update(innerOffset=0, chunkDigest=entries[0]["chunkDigest"])
    entries[2].update(innerOffset=0, chunkDigest=entries[0]["chunkDigest"])
    index = index_from_toc(
        toc, format="x", compression=compression, toc_offset=len(stream), blob_size=len(stream) + 64
    )
    assert len({c for e in index.entries.values() for c in e.chunks}) == 1


def test_decode_stream_inflates_a_shared_stream_once(
    compression: Compression, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"f{i}": os.urandom(3000) for i in range(50)}
    blob, digest, annotations = packed_layer(compression, files)
    index = parse_blob(blob, digest, annotations)
    chunks = [index.entries[name].chunks[0] for name in files]
    raw = blob[chunks[0].compressed_offset : chunks[0].compressed_offset + chunks[0].compressed_size]
    calls: list[int] = []
    from snapshotter.formats import detect

    real = detect.inflate_prefix

    def counting(compression: Compression, data: bytes, want: int) -> bytes:
        calls.append(want)
        return real(compression, data, want)

    monkeypatch.setattr(detect, "inflate_prefix", counting)
    pieces = decode_stream(compression, raw, chunks)
    assert pieces == list(files.values())
    assert calls == [max(c.inner_offset + c.size for c in chunks)]


def test_decode_stream_names_the_chunk_that_fails(compression: Compression) -> None:
    files = {"a": b"A" * 100, "b": b"B" * 100}
    blob, digest, annotations = packed_layer(compression, files)
    index = parse_blob(blob, digest, annotations)
    a, b = index.entries["a"].chunks[0], index.entries["b"].chunks[0]
    raw = blob[a.compressed_offset : a.compressed_offset + a.compressed_size]
    wrong = dataclasses.replace(b, digest=sha256(b"nope"))
    with pytest.raises(ChunkDigestError, match=rf"inner offset {b.inner_offset}.*digest mismatch"):
        decode_stream(compression, raw, [a, wrong])


# -- what a TOC costs (issue 14.5) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "peak_per_entry", "kept_per_entry"),
    [("realistic-20000", 2048, 900), ("dirs-2", 640, 350)],
)
def test_toc_parse_memory_per_entry(
    tmp_path: Path, case: str, peak_per_entry: int, kept_per_entry: int
) -> None:
    """Parsing held the whole JSON document as Python objects beside the index, and the JSON
    twice: 2.5 KB per entry at peak and 1 KB kept for a realistic TOC (820 and 400 for the
    cheapest entries). ``benchmarks.toc_cost`` measures it in subprocesses."""
    (row,) = toc_cost.measure([case], tmp_path)
    assert row["peak_bytes_per_entry"] < peak_per_entry, row
    assert row["retained_bytes_per_entry"] < kept_per_entry, row
