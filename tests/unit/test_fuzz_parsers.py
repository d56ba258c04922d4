"""Property-based fuzzing of everything that parses untrusted bytes: footers, TOCs (raw and as
JSON inside a valid member), the zstd:chunked annotations and the filter language. Whatever the
input, only the documented error may escape. Example counts are bounded to keep CI fast.

The bounds of issue 14 stay closed: chunk geometry (innerOffset + size within the chunk limit,
compressed ranges within their bound, no overlapping chunks in a stream), the streamed TOC
reader agreeing with json.loads, decoding never inflating past the limit, and Nydus-like runs
never building more than their total."""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import tarfile
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.filters import FilterSyntaxError, parse_all
from snapshotter.formats import (
    Chunk,
    FormatError,
    LayerIndex,
    TocLocation,
    compressed_bound,
    decode_stream,
    locate_toc,
    nydus,
    parse_toc,
)
from snapshotter.formats.estargz import gzip_footer
from snapshotter.formats.index import Compression
from snapshotter.formats.toc import index_from_toc, index_from_toc_text
from tests.unit.formats.hostile import nydus_bootstrap

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# TOC entries made of plausible keys with arbitrary values: reaches the validator, not only JSON.
ENTRY_KEYS = [
    *("name", "type", "size", "mode", "uid", "gid", "linkName", "digest", "offset", "innerOffset"),
    *("chunkOffset", "chunkSize", "chunkDigest", "devMajor", "devMinor", "xattrs", "modtime"),
    *("endOffset", "chunkType"),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)
entries = st.lists(st.dictionaries(st.sampled_from(ENTRY_KEYS), json_values, max_size=8), max_size=6)
types = st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "bogus"])


def toc_member(toc: dict[str, object]) -> bytes:
    """A gzip member holding the tar entry stargz.index.json, as an eStargz blob carries it."""
    data = json.dumps(toc).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 10**12))
def test_footer_bytes(tail: bytes, extra: int) -> None:
    with contextlib.suppress(FormatError):
        locate_toc(tail, len(tail) + extra)


ZSTD_KEYS = [
    "io.containers.zstd-chunked.manifest-position",
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-checksum",
]


@FUZZ
@given(st.dictionaries(st.sampled_from(ZSTD_KEYS), st.text(max_size=40)), st.binary(max_size=80))
def test_zstd_annotations(annotations: dict[str, str], tail: bytes) -> None:
    with contextlib.suppress(FormatError):
        locate_toc(tail, 10**6, annotations)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([Compression.GZIP, Compression.ZSTD]))
def test_raw_toc_bytes(raw: bytes, compression: Compression) -> None:
    location = TocLocation("estargz" if compression == Compression.GZIP else "zstdchunked", compression,
                           offset=1000, length=len(raw), footer_size=51)  # fmt: skip
    with contextlib.suppress(FormatError):
        parse_toc(raw, location, blob_size=1000 + len(raw) + 51, expected_digest=None, verify=False)


@FUZZ
@given(entries, st.lists(types, max_size=6), st.integers(0, 3))
def test_toc_json_reaches_the_validator(
    raw_entries: list[dict[str, object]], kinds: list[str], version: int
) -> None:
    for entry, kind in zip(raw_entries, kinds, strict=False):
        entry["type"] = kind
    member = toc_member({"version": version, "entries": raw_entries})
    offset = 4096
    blob_size = offset + len(member) + len(gzip_footer(offset))
    location = TocLocation("estargz", Compression.GZIP, offset=offset, length=len(member), footer_size=51)
    with contextlib.suppress(FormatError):
        parse_toc(member, location, blob_size=blob_size, expected_digest=None, verify=False)


@FUZZ
@given(st.lists(st.text(alphabet=st.sampled_from('abc.=!~,"/|\\ x0_'), max_size=30), max_size=3))
def test_filters(filters: list[str]) -> None:
    with contextlib.suppress(FilterSyntaxError):
        parse_all(filters)


def test_bombs_stay_bounded() -> None:
    """A TOC member that inflates far past the limit is refused as a format error."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = bomb.compress(b"\0" * (80 << 20)) + bomb.flush()
    location = TocLocation("estargz", Compression.GZIP, offset=0, length=len(member), footer_size=51)
    try:
        parse_toc(
            member,
            location,
            blob_size=len(member) + 51,
            expected_digest=None,
            verify=False,
            max_toc_bytes=1 << 20,
        )
    except FormatError as exc:
        assert "TOC" in str(exc) or "large" in str(exc) or "limit" in str(exc)
    else:
        raise AssertionError("an 80 MiB TOC passed a 1 MiB limit")


# -- the bounds of issue 14: hostile chunk geometry, streamed TOC text, decoding --------------------

MAX_CHUNK = 1 << 20
TOC_OFFSET = 1 << 16
DIGEST = "sha256:" + "ab" * 32
# Offsets and sizes around the interesting edges: zero, small, the chunk limit, past it, huge.
edges = st.sampled_from([0, 1, 100, 4096, MAX_CHUNK - 1, MAX_CHUNK, MAX_CHUNK + 1, 1 << 40, 2**63 - 1])
offsets = st.sampled_from([0, 0, 0, 100, 5000, TOC_OFFSET - 1, TOC_OFFSET, 2**63 - 1])


@st.composite
def chunked_files(draw: st.DrawFn) -> list[dict[str, object]]:
    """Regular files whose chunks share streams, sit at odd inner offsets, carry endOffsets."""
    entries: list[dict[str, object]] = []
    for i in range(draw(st.integers(1, 5))):
        size = draw(st.one_of(st.integers(1, 5000), edges))
        entry: dict[str, object] = {
            "name": f"f{i}", "type": "reg", "size": size, "offset": draw(offsets),
            "innerOffset": draw(st.one_of(edges, st.integers(0, 10_000))), "chunkDigest": DIGEST,
        }  # fmt: skip
        if draw(st.booleans()):
            entry["endOffset"] = draw(st.one_of(offsets, st.integers(0, TOC_OFFSET)))
        entries.append(entry)
        if draw(st.booleans()) and size > 1:  # split in two chunks, the second maybe in the same stream
            entry["chunkSize"] = cut = draw(st.integers(1, size - 1)) if size < 10**6 else size // 2
            entries.append(
                {
                    "name": f"f{i}",
                    "type": "chunk",
                    "chunkOffset": cut,
                    "chunkSize": size - cut,
                    "offset": draw(offsets),
                    "innerOffset": draw(st.one_of(edges, st.integers(0, 10_000))),
                    "chunkDigest": DIGEST,
                }
            )
    return entries


def assert_chunk_bounds(index: LayerIndex, max_chunk_bytes: int) -> None:
    streams: dict[int, list[Chunk]] = {}
    for entry in index.entries.values():
        for c in entry.chunks:
            streams.setdefault(c.compressed_offset, []).append(c)
    for offset, chunks in streams.items():
        need = max(c.inner_offset + c.size for c in chunks)
        assert need <= max_chunk_bytes
        for c in chunks:
            assert 0 < c.compressed_size <= compressed_bound(need)
            assert offset + c.compressed_size <= index.toc_offset
        distinct = sorted({(c.inner_offset, c.size, c.digest) for c in chunks})
        for (a_off, a_size, _), (b_off, _, _) in itertools.pairwise(distinct):
            assert a_off + a_size <= b_off  # no two chunks of a stream overlap


@FUZZ
@given(chunked_files())
def test_chunk_geometry_stays_within_bounds(files: list[dict[str, object]]) -> None:
    toc = {"version": 1, "entries": [{"name": "", "type": "dir"}, *files]}
    for compression in (Compression.GZIP, Compression.ZSTD):
        try:
            index = index_from_toc(
                toc, format="f", compression=compression, toc_offset=TOC_OFFSET,
                blob_size=TOC_OFFSET + 100, max_chunk_bytes=MAX_CHUNK,
            )  # fmt: skip
        except FormatError:
            continue
        assert_chunk_bounds(index, MAX_CHUNK)


def _outcome(parse: Callable[[], LayerIndex]) -> LayerIndex | None:
    try:
        return parse()
    except FormatError:
        return None


toc_texts = st.one_of(
    st.builds(
        lambda files: json.dumps({"version": 1, "entries": [{"name": "", "type": "dir"}, *files]}),
        chunked_files(),
    ),
    st.builds(
        lambda doc: json.dumps(doc), st.fixed_dictionaries({"version": st.just(1), "entries": entries})
    ),
    st.builds(json.dumps, json_values),
    st.text(alphabet=st.sampled_from('{}[],:" \t\n0123456789.-eEnulltrusafversionentries'), max_size=60),
)


@FUZZ
@given(toc_texts, st.integers(0, 3), st.data())
def test_streamed_toc_text_agrees_with_json_loads(text: str, cut: int, data: st.DataObject) -> None:
    """parse_toc reads the TOC entry by entry (index_from_toc_text); whatever the text, that
    must accept and reject exactly what json.loads + index_from_toc do."""
    if cut and text:  # a truncated or spliced document
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.sampled_from(["", ",", "}", "]", '"', "{", " "])) + text[at:]
    kw: dict[str, Any] = {
        "format": "estargz",
        "compression": Compression.GZIP,
        "toc_offset": 4096,
        "blob_size": 5000,
    }
    streamed = _outcome(lambda: index_from_toc_text(text, **kw))
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        assert streamed is None
        return
    whole = _outcome(lambda: index_from_toc(doc, **kw))
    if streamed is None and whole is not None:
        # The one difference: a repeated top-level member, which json.loads silently collapses.
        with pytest.raises(FormatError, match="twice"):
            index_from_toc_text(text, **kw)
        return
    assert streamed == whole


@FUZZ
@given(
    st.integers(0, 1 << 41), st.integers(1, 1 << 41), st.sampled_from([Compression.GZIP, Compression.ZSTD])
)
def test_decoding_never_inflates_past_the_chunk_limit(
    inner: int, size: int, compression: Compression
) -> None:
    chunk = Chunk(0, size, 0, len(BOMBS[compression]), inner, DIGEST)
    tracemalloc.start()
    try:
        with contextlib.suppress(FormatError):
            decode_stream(compression, BOMBS[compression], [chunk], max_chunk_bytes=MAX_CHUNK)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The inflated prefix (at most the limit) and one chunk's copy out of it (at most the limit
    # too) may coexist; a bomb that inflated past the limit would cost its whole 64 MiB.
    assert peak < 2 * MAX_CHUNK + (1 << 20)


BOMBS = {  # 64 MiB of zeros each, a few KB compressed
    Compression.GZIP: zlib.compress(bytes(64 << 20), 9, wbits=31),
    Compression.ZSTD: zstandard.ZstdCompressor(level=3).compress(bytes(64 << 20)),
}


@FUZZ
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 3), st.integers(0, 3))
def test_nydus_runs_never_build_more_than_the_total(
    files: int, refs: int, xattrs: int, per_file: int
) -> None:
    with mock.patch.object(nydus, "MAX_RUN_RECORDS", 12):
        blob, digest = nydus_bootstrap(
            files=files, refs_per_file=refs, xattrs=xattrs, xattrs_per_file=min(per_file, xattrs)
        )
        location = nydus.locate_bootstrap(blob[-nydus.FOOTER_SIZE :], len(blob))
        raw = blob[location.offset : location.offset + location.length]
        try:
            index = nydus.parse_bootstrap(raw, location, blob_size=len(blob), expected_digest=digest)
        except FormatError:
            assert files * refs > 12 or files * min(per_file, xattrs) > 12
            return
    assert sum(len(e.chunks) for e in index.entries.values()) == files * refs <= 12
    assert sum(len(e.xattrs) for e in index.entries.values()) <= 12
