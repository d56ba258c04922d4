"""Gzip indexes: resuming inflate at any bit with stdlib zlib, the one-pass builder, the bounded
parser, and decoding from checkpoints against real gzip layers (Python's gzip at several levels,
the gzip tool, several members). Hostile indexes (a wrong window, a bit offset out of range, a
chunk digest that does not match) fail with FormatError, never with wrong bytes; fuzzed index
bytes never raise anything but FormatError and stay within bounded memory."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import shutil
import struct
import subprocess
import tarfile
import tracemalloc
import zlib
from collections import defaultdict

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.erofs.layout import tar_layout
from snapshotter.formats import FormatError, decode_stream, gzindex, registry
from snapshotter.formats.build_gzindex import build_index
from snapshotter.formats.deflate_resume import inflate_from, primed
from snapshotter.formats.detect import ChunkDigestError
from snapshotter.formats.gzindex import HEADER, HEADER_SIZE, IndexLocation, parse_index
from snapshotter.formats.index import Compression, EntryType, LayerIndex
from snapshotter.layertree import LayerTree
from tests.support.gzindex import decode, encode, parsed, rewrite, span_of
from tests.support.oci import pseudo_random

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPAN = 64 << 10


def _text(n: int, seed: int) -> bytes:
    lines = (f"{seed}:{i:06d} {'lorem ipsum dolor ' * (i % 7)}{i * 7919 % 104729}\n" for i in range(n))
    return "".join(lines).encode()


def layer_tar() -> bytes:
    """A layer with text (deflate's dynamic blocks), random bytes (stored blocks), zeros (long
    matches), a hardlink, a symlink, xattrs, an empty file and nested directories."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes | None = None, **kw: object) -> None:
            info = tarfile.TarInfo(name)
            for key, value in kw.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        add("etc", type=tarfile.DIRTYPE, mode=0o755)
        add("etc/text.txt", _text(9000, 1), mode=0o644, mtime=1700000000)
        add("etc/random.bin", pseudo_random(300 << 10, b"r"), mode=0o600, uid=1000, gid=1000)
        add("etc/zeros.bin", bytes(200 << 10))
        add("etc/empty", b"")
        add("etc/link", type=tarfile.LNKTYPE, linkname="etc/text.txt")
        add("etc/sym", type=tarfile.SYMTYPE, linkname="text.txt")
        add("deep/a/b/c.txt", _text(800, 2), pax_headers={"SCHILY.xattr.user.k": "v"})
        add("etc/more.txt", _text(4000, 3))
    return buf.getvalue()


TAR = layer_tar()


def _gzip_tool(data: bytes, level: int) -> bytes:
    return subprocess.run(
        ["gzip", f"-{level}", "-c", "-n"], input=data, capture_output=True, check=True
    ).stdout


COMPRESSORS = {
    "python-1": lambda data: gzip.compress(data, 1, mtime=0),
    "python-9": lambda data: gzip.compress(data, 9, mtime=0),
    "members": lambda data: (
        gzip.compress(data[: len(data) // 3], 6, mtime=0) + gzip.compress(data[len(data) // 3 :], 6, mtime=0)
    ),
}
if shutil.which("gzip"):
    COMPRESSORS["gzip-tool-6"] = lambda data: _gzip_tool(data, 6)


def build(blob: bytes, span: int = SPAN) -> tuple[bytes, LayerIndex]:
    built = build_index(blob, span=span, threads=1, diff_id="sha256:" + hashlib.sha256(TAR).hexdigest())
    return built.data, parsed(built.data, built.layer, len(blob))


def decode_all(index: LayerIndex, blob: bytes) -> dict[str, bytes]:
    """Every file's content, decoded span by span from the blob as the reader does."""
    streams: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
    for name, entry in index.entries.items():
        for k, c in enumerate(entry.chunks):
            streams[(c.compressed_offset, c.compressed_size)].append((name, k))
    pieces: dict[tuple[str, int], bytes] = {}
    for (offset, size), members in streams.items():
        chunks = [index.entries[n].chunks[k] for n, k in members]
        out = decode_stream(
            Compression.GZIP_SPAN, blob[offset : offset + size], chunks, resume=index.resume_points[offset]
        )
        pieces.update(zip(members, out, strict=True))
    return {
        name: b"".join(pieces[(name, k)] for k in range(len(entry.chunks)))
        for name, entry in index.entries.items()
        if entry.type is EntryType.REG
    }


def tar_contents(tar: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t:
            if m.isreg():
                f = t.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
    return out


# -- resuming at a bit ----------------------------------------------------------------------------


@pytest.mark.parametrize("bit", range(8))
def test_a_primer_of_empty_blocks_ends_at_every_bit(bit: int) -> None:
    # A deflate stream whose real data starts at ``bit`` of its first byte.
    raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = raw.compress(b"hello, resumed deflate") + raw.flush()
    shifted = (int.from_bytes(body, "little") << bit).to_bytes(len(body) + 1, "little")
    # The low ``bit`` bits of the first byte belong to "the block before": garbage.
    garbage = bytes([shifted[0] | ((1 << bit) - 1 & 0b1010101)]) + shifted[1:]
    assert inflate_from(garbage, bit, b"", 100) == b"hello, resumed deflate"
    assert primed(body, 0) is body


def test_resuming_uses_the_window_for_back_references() -> None:
    window = _text(500, 9)[-32768:]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=window)
    tail = window[-5000:] * 3  # all matches into the window
    body = compressor.compress(tail) + compressor.flush()
    assert inflate_from(body, 0, window, len(tail)) == tail
    with pytest.raises(FormatError):
        inflate_from(body, 0, b"", len(tail))  # without the window: distance too far back
    assert inflate_from(body, 0, window, 10) == tail[:10]  # bounded by ``want``


def test_resume_arguments_out_of_range_are_format_errors() -> None:
    with pytest.raises(FormatError):
        inflate_from(b"\x00" * 10, 8, b"", 10)
    with pytest.raises(FormatError):
        inflate_from(b"\x00" * 10, 0, bytes(40000), 10)
    with pytest.raises(FormatError):
        inflate_from(b"\x1f\x8b", 3, b"", 10, member_start=True)


# -- building and decoding real layers ------------------------------------------------------------


@pytest.mark.parametrize("how", sorted(COMPRESSORS))
def test_every_chunk_decodes_from_its_checkpoint_to_the_layer_content(how: str) -> None:
    blob = COMPRESSORS[how](TAR)
    data, index = build(blob)
    assert index.format == gzindex.FORMAT and index.compression is Compression.GZIP_SPAN
    assert len(index.resume_points) > 5  # spans of 64 KiB over ~1.5 MB
    assert index.whole_streams and index.tar_size == len(TAR)
    assert decode_all(index, blob) == {n: c for n, c in tar_contents(TAR).items() if n in index.entries} | {
        "etc/empty": b""
    }
    assert index.entries["etc/link"].type is EntryType.HARDLINK
    assert index.entries["etc/link"].link_name == "etc/text.txt"
    assert index.entries["etc/sym"].link_name == "text.txt"
    assert index.entries["deep/a/b/c.txt"].xattrs == {"user.k": b"v"}
    assert index.entries["deep/a"].type is EntryType.DIR  # implied parents
    assert index.entries["etc/random.bin"].uid == 1000
    assert len(data) < len(blob) * 0.05


def test_tar_offsets_place_each_file_where_its_bytes_are() -> None:
    blob = COMPRESSORS["python-9"](TAR)
    _, index = build(blob)
    layout = tar_layout(LayerTree(index), index.tar_offsets, index.tar_size)
    assert layout.block_size == 512 and layout.blob_size == len(TAR)
    for placed in layout.files:
        assert TAR[placed.blob_offset : placed.end] == tar_contents(TAR)[placed.entry.name]


def test_the_builder_refuses_what_it_cannot_index() -> None:
    with pytest.raises(FormatError, match="not gzip"):
        build_index(TAR)
    with pytest.raises(FormatError, match="the image config says"):
        build_index(gzip.compress(TAR), diff_id="sha256:" + "0" * 64)
    with pytest.raises(FormatError, match="span"):
        build_index(gzip.compress(TAR), span=1024)
    with pytest.raises(FormatError):
        build_index(gzip.compress(b"not a tar" * 1000))
    with pytest.raises(FormatError):
        build_index(gzip.compress(TAR)[:-5000])  # truncated


def test_the_registry_claims_plain_gzip_layers_only_with_a_discovered_index() -> None:
    media = "application/vnd.oci.image.layer.v1.tar+gzip"
    found = {gzindex.INDEX_DIGEST_KEY: "sha256:" + "a" * 64}
    assert registry.format_of(media, found) is registry.GZINDEX
    assert registry.format_of(media, {}) is None
    assert registry.format_of("application/vnd.oci.image.layer.v1.tar+zstd", found) is None
    # An eStargz layer's own TOC wins; a manifest cannot pretend discovery found an index.
    assert registry.format_of(
        media, {**found, "containerd.io/snapshot/stargz/toc.digest": "sha256:" + "b" * 64}
    )
    assert registry.format_of(media, gzindex.without_discovery(found)) is None
    assert not registry.requires_lazy_mount(found)


def test_the_location_round_trips_through_its_stored_form() -> None:
    location = IndexLocation("sha256:" + "a" * 64, "sha256:" + "b" * 64, 1234, "sha256:" + "c" * 64)
    assert registry.GZINDEX.location_from_json(registry.GZINDEX.location_to_json(location)) == location
    annotations = {
        gzindex.INDEX_DIGEST_KEY: location.index,
        gzindex.INDEX_SIZE_KEY: "1234",
        gzindex.INDEX_LAYER_KEY: location.layer,
        gzindex.INDEX_REFERRER_KEY: location.referrer,
    }
    assert gzindex.locate(annotations, 1 << 20) == location
    with pytest.raises(FormatError):
        gzindex.locate({**annotations, gzindex.INDEX_SIZE_KEY: str(2 << 20)}, 1 << 20)


# -- hostile indexes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed() -> tuple[bytes, bytes, LayerIndex]:
    blob = COMPRESSORS["python-9"](TAR)
    data, index = build(blob)
    return blob, data, index


def _text_chunk_span(index: LayerIndex) -> tuple[int, int]:
    """(span number, compressed offset) of a span that starts inside etc/text.txt."""
    chunk = index.entries["etc/text.txt"].chunks[1]
    return span_of(index, chunk.compressed_offset), chunk.compressed_offset


def _decode_span(index: LayerIndex, blob: bytes, offset: int) -> list[bytes]:
    chunks = [c for e in index.entries.values() for c in e.chunks if c.compressed_offset == offset]
    size = chunks[0].compressed_size
    return decode_stream(
        Compression.GZIP_SPAN, blob[offset : offset + size], chunks, resume=index.resume_points[offset]
    )


def test_a_wrong_window_fails_verification(indexed: tuple[bytes, bytes, LayerIndex]) -> None:
    blob, data, index = indexed
    k, offset = _text_chunk_span(index)
    lying = parsed(rewrite(data, k, window=b"x" * 32768), _layer(blob), len(blob))
    with pytest.raises(FormatError):  # bad back-references, or ChunkDigestError
        _decode_span(lying, blob, offset)
    assert _decode_span(index, blob, offset)  # the honest index decodes


def _layer(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def test_a_bit_offset_one_off_fails(indexed: tuple[bytes, bytes, LayerIndex]) -> None:
    blob, data, index = indexed
    k, offset = _text_chunk_span(index)
    delta = 1 if index.resume_points[offset].bit < 7 else -1
    lying = parsed(rewrite(data, k, bit_delta=delta), _layer(blob), len(blob))
    with pytest.raises(FormatError):
        _decode_span(lying, blob, offset)


def test_a_chunk_digest_that_does_not_match_is_a_chunk_digest_error(
    indexed: tuple[bytes, bytes, LayerIndex],
) -> None:
    blob, data, _ = indexed
    d = decode(data)
    # Flip a bit of the first chunk digest (the digests follow the entry records).
    counts = d.counts
    entries_end = counts[2] * gzindex.ENTRY.size
    rest = bytearray(d.rest)
    rest[entries_end] ^= 1
    d.rest = bytes(rest)
    lying = parsed(encode(d), _layer(blob), len(blob))
    first = next(c for e in lying.entries.values() for c in e.chunks)
    with pytest.raises(ChunkDigestError):
        _decode_span(lying, blob, first.compressed_offset)


def test_checkpoints_out_of_range_are_refused(indexed: tuple[bytes, bytes, LayerIndex]) -> None:
    blob, data, _ = indexed
    cases = {
        "beyond the blob": lambda cps: cps[-1].__setitem__(1, 8 * len(blob) + 3),
        "not increasing": lambda cps: cps[2].__setitem__(1, cps[1][1]),
        "first not at 0": lambda cps: cps[0].__setitem__(0, 5),
        "offset beyond the tar": lambda cps: cps[-1].__setitem__(0, len(TAR) + 1),
        "unknown flag": lambda cps: cps[1].__setitem__(3, 4),
    }
    for what, change in cases.items():
        d = decode(data)
        change(d.checkpoints)
        with pytest.raises(FormatError):
            parsed(encode(d), _layer(blob), len(blob))
            pytest.fail(f"accepted a checkpoint {what}")


def test_an_index_is_checked_against_its_pinned_digest_and_its_layer(
    indexed: tuple[bytes, bytes, LayerIndex],
) -> None:
    blob, data, _ = indexed
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = IndexLocation(_layer(blob), digest, len(data))
    with pytest.raises(FormatError, match="digest mismatch"):
        parse_index(data, location, blob_size=len(blob), expected_digest="sha256:" + "0" * 64)
    with pytest.raises(FormatError, match="index is for layer"):
        parse_index(
            data,
            IndexLocation("sha256:" + "1" * 64, digest, len(data)),
            blob_size=len(blob),
            expected_digest=digest,
        )
    with pytest.raises(FormatError, match="layer of"):
        parse_index(data, location, blob_size=len(blob) + 1, expected_digest=digest)
    with pytest.raises(FormatError, match="limit"):
        parse_index(data, location, blob_size=len(blob), expected_digest=digest, max_bytes=100)
    with pytest.raises(FormatError, match="span"):
        parse_index(data, location, blob_size=len(blob), expected_digest=digest, max_chunk_bytes=1000)


# -- fuzzing --------------------------------------------------------------------------------------


def _parse_raw(raw: bytes, blob_size: int, layer: str) -> LayerIndex:
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    return parse_index(
        raw, IndexLocation(layer, digest, len(raw)), blob_size=blob_size, expected_digest=digest
    )


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_only_ever_format_errors(raw: bytes) -> None:
    with pytest.raises(FormatError):
        _parse_raw(raw, 1000, "sha256:" + "a" * 64)


@FUZZ
@given(st.data())
def test_mutated_bodies_are_only_ever_format_errors_within_bounded_memory(data: st.DataObject) -> None:
    blob = COMPRESSORS["python-1"](TAR)
    built = _BUILT.setdefault("index", build(blob)[0])
    header = bytearray(built[:HEADER_SIZE])
    body = bytearray(zstandard.ZstdDecompressor().decompress(built[HEADER_SIZE:]))
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(body) - 1))
        if data.draw(st.booleans()):
            body[at] = data.draw(st.integers(0, 255))
        else:  # a large count or length somewhere
            struct.pack_into("<I", body, min(at, len(body) - 4), data.draw(st.integers(0, 2**32 - 1)))
    struct.pack_into("<I", header, 12, len(body))
    raw = bytes(header) + zstandard.ZstdCompressor(write_content_size=True).compress(bytes(body))
    tracemalloc.start()
    try:
        try:
            index = _parse_raw(raw, len(blob), _layer(blob))
        except FormatError:
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
        assert peak < 64 << 20, peak
        # A mutation the checks accept still decodes only verified bytes.
        with contextlib.suppress(FormatError):
            decode_all(index, blob)
    finally:
        tracemalloc.stop()


_BUILT: dict[str, bytes] = {}


def test_header_layout_is_as_documented() -> None:
    assert HEADER.size == 64 and HEADER_SIZE == 64
    assert gzindex.CHECKPOINT.size == 24 and gzindex.ENTRY.size == 60 and gzindex.BODY_HEAD.size == 28
