"""zstd:chunked parsing: both footers (40/64 bytes), both annotation families, digests, bombs."""

from __future__ import annotations

import hashlib
import tracemalloc
from typing import Any

import pytest
import zstandard

from snapshotter.formats import (
    MAX_FOOTER_SIZE,
    BuiltBlob,
    Chunk,
    Compression,
    FormatError,
    build_zstdchunked,
    decompress_chunk,
    locate_toc,
    parse_toc,
    toc_digest_from_annotations,
)
from snapshotter.formats.zstdchunked import (
    CS_MANIFEST_CHECKSUM_ANNOTATION,
    CS_MANIFEST_POSITION_ANNOTATION,
    MANIFEST_CHECKSUM_ANNOTATION,
    MANIFEST_POSITION_ANNOTATION,
    SGZ_MAGIC,
    cs_footer,
    sgz_footer,
    skippable_frame,
)
from tests.unit.formats import BIG, file_bytes, parse_blob, rewrite_toc, sample_tar

CHUNK = 64 << 10


@pytest.fixture(scope="module")
def built() -> BuiltBlob:
    return build_zstdchunked(sample_tar(), chunk_size=CHUNK)


def _position(built: BuiltBlob) -> tuple[int, int, int]:
    off, clen, ulen, _ = (int(p) for p in built.annotations[MANIFEST_POSITION_ANNOTATION].split(":"))
    return off, clen, ulen


def test_sgz_40_byte_footer(built: BuiltBlob) -> None:
    loc = locate_toc(built.blob[-MAX_FOOTER_SIZE:], len(built.blob))
    off, clen, ulen = _position(built)
    assert (loc.format, loc.compression, loc.footer_size) == ("zstdchunked", Compression.ZSTD, 48)
    assert (loc.offset, loc.length, loc.uncompressed_length) == (off, clen, ulen)
    index = parse_blob(built.blob, built.toc_digest)
    assert index.toc_offset == built.toc_offset == off - 8
    assert file_bytes(built.blob, index, "data/big.bin") == BIG


def test_containers_storage_64_byte_footer(built: BuiltBlob) -> None:
    off, clen, ulen = _position(built)
    # c/storage appends a tar-split frame after the TOC and points at it from the footer.
    tarsplit = zstandard.ZstdCompressor().compress(b'{"type":1}\n')
    head = built.blob[:-48] + skippable_frame(tarsplit)
    ts_off = len(head) - len(tarsplit)
    blob = head + skippable_frame(cs_footer(off, clen, ulen, (ts_off, len(tarsplit), 11)))
    loc = locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob))
    assert (loc.offset, loc.length, loc.footer_size) == (off, clen, 72)
    index = parse_blob(blob, built.toc_digest)
    assert file_bytes(blob, index, "data/xattr") == b"with xattrs\n"


@pytest.mark.parametrize(
    ("position_key", "checksum_key"),
    [
        (MANIFEST_POSITION_ANNOTATION, MANIFEST_CHECKSUM_ANNOTATION),
        (CS_MANIFEST_POSITION_ANNOTATION, CS_MANIFEST_CHECKSUM_ANNOTATION),
    ],
)
def test_annotations_without_footer(built: BuiltBlob, position_key: str, checksum_key: str) -> None:
    annotations = {
        position_key: built.annotations[MANIFEST_POSITION_ANNOTATION],
        checksum_key: built.annotations[MANIFEST_CHECKSUM_ANNOTATION],
    }
    blob = built.blob[:-48]  # no footer at all: annotations alone must do
    loc = locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob), annotations)
    assert loc.footer_size == 0
    # the manifest-checksum (digest of the *compressed* TOC) verifies too
    digest = toc_digest_from_annotations(annotations)
    assert digest == built.annotations[MANIFEST_CHECKSUM_ANNOTATION]
    index = parse_blob(blob, digest, annotations)
    assert file_bytes(blob, index, "etc/hosts") == b"127.0.0.1 localhost\n"


def test_annotations_win_over_a_bad_footer(built: BuiltBlob) -> None:
    blob = built.blob[:-8] + b"XXXXXXXX"
    with pytest.raises(FormatError, match=r"no eStargz or zstd:chunked footer"):
        locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob))
    index = parse_blob(blob, built.toc_digest, built.annotations)
    assert "data/big.bin" in index.entries


def test_toc_digest_prefers_sgz_annotation(built: BuiltBlob) -> None:
    assert toc_digest_from_annotations(built.annotations) == built.toc_digest
    assert toc_digest_from_annotations({}) is None


def _type2_footer(o: int, c: int, u: int) -> bytes:
    return sgz_footer(o, c, u)[:24] + (2).to_bytes(8, "little") + SGZ_MAGIC


def _replace_footer(built: BuiltBlob, payload: bytes) -> bytes:
    return built.blob[:-48] + skippable_frame(payload)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda b, o, c, u: b.blob[:-8] + b"GnUlInUz", "no eStargz or zstd:chunked footer"),
        (lambda b, o, c, u: b.blob[:-48] + b"\x00" * 8 + b.blob[-40:], "not in a skippable frame"),
        (lambda b, o, c, u: _replace_footer(b, _type2_footer(o, c, u)), "manifest type 2"),
        (lambda b, o, c, u: _replace_footer(b, sgz_footer(len(b.blob), c, u)), "points outside the blob"),
        (lambda b, o, c, u: _replace_footer(b, sgz_footer(o, len(b.blob), u)), "points outside the blob"),
        (lambda b, o, c, u: _replace_footer(b, sgz_footer(4, c, u)), "not a valid position"),
        (lambda b, o, c, u: b"GnUlInUx", "blob too short"),
    ],
)  # fmt: skip
def test_bad_footers(built: BuiltBlob, make: Any, message: str) -> None:
    blob = make(built, *_position(built))
    with pytest.raises(FormatError, match=message):
        locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1:2:3", "want offset"),
        ("a:b:c:1", "want offset"),
        ("1:2:3:2", "manifest type 2"),
        ("9:-1:3:1", "want"),
    ],
)
def test_bad_position_annotation(built: BuiltBlob, value: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        locate_toc(built.blob[-MAX_FOOTER_SIZE:], len(built.blob), {CS_MANIFEST_POSITION_ANNOTATION: value})


def test_position_annotation_outside_blob(built: BuiltBlob) -> None:
    value = f"{len(built.blob)}:10:10:1"
    with pytest.raises(FormatError, match=r"annotation.*outside the blob"):
        locate_toc(built.blob[-MAX_FOOTER_SIZE:], len(built.blob), {MANIFEST_POSITION_ANNOTATION: value})


def _with_toc_frame(built: BuiltBlob, compressed: bytes, ulen: int) -> tuple[bytes, dict[str, str]]:
    head = built.blob[: built.toc_offset]
    off = len(head) + 8
    blob = head + skippable_frame(compressed) + skippable_frame(sgz_footer(off, len(compressed), ulen))
    return blob, {MANIFEST_POSITION_ANNOTATION: f"{off}:{len(compressed)}:{ulen}:1"}


def test_zstd_bomb_toc_is_refused_without_allocating(built: BuiltBlob) -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    for ulen in (1000, 64 << 20):  # lying and honest uncompressed lengths
        blob, _ = _with_toc_frame(built, bomb, ulen)
        loc = locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob))
        raw = blob[loc.offset : loc.offset + loc.length]
        tracemalloc.start()
        try:
            with pytest.raises(FormatError, match=r"limit"):
                parse_toc(
                    raw, loc, blob_size=len(blob), expected_digest=None, verify=False, max_toc_bytes=1 << 20
                )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20


def test_uncompressed_length_mismatch(built: BuiltBlob) -> None:
    compressed = zstandard.ZstdCompressor().compress(built.toc_json)
    blob, _ = _with_toc_frame(built, compressed, len(built.toc_json) + 1)
    with pytest.raises(FormatError, match=r"footer says"):
        parse_blob(blob, built.toc_digest)


def test_corrupt_toc_frame(built: BuiltBlob) -> None:
    blob, _ = _with_toc_frame(built, b"\x28\xb5\x2f\xfd" + b"\xff" * 20, 100)
    with pytest.raises(FormatError, match=r"corrupt zstd|truncated"):
        parse_blob(blob, built.toc_digest)


def test_end_offset_and_zero_chunks(built: BuiltBlob) -> None:
    def mutate(doc: dict[str, Any]) -> None:
        for e in doc["entries"]:
            if e["name"] == "data/big.bin":
                e["chunkType"] = "zeros" if e["type"] == "chunk" else ""
                e["endOffset"] = e.get("offset", 0) + 100_000
            if e["name"] == "etc/hosts":
                e["endOffset"] = e["offset"]  # empty range

    blob, digest = rewrite_toc(built, mutate)
    with pytest.raises(FormatError, match=r"'etc/hosts'.*endOffset"):
        parse_blob(blob, digest)

    def honest(doc: dict[str, Any]) -> None:
        index = parse_blob(built.blob, built.toc_digest)
        sizes = {c.compressed_offset: c.compressed_size for c in index.entries["data/big.bin"].chunks}
        for e in doc["entries"]:
            if e["name"] == "data/big.bin":
                e["endOffset"] = e["offset"] + sizes[e["offset"]]  # exactly the frame

    blob, digest = rewrite_toc(built, honest)
    index = parse_blob(blob, digest)
    assert file_bytes(blob, index, "data/big.bin") == BIG


def test_decompress_zstd_chunk_errors(built: BuiltBlob) -> None:
    index = parse_blob(built.blob, built.toc_digest)
    chunk = index.entries["data/big.bin"].chunks[0]
    data = built.blob[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size]
    with pytest.raises(FormatError):
        decompress_chunk(Compression.ZSTD, data[: len(data) // 2], chunk)
    with pytest.raises(FormatError, match=r"corrupt zstd"):
        decompress_chunk(Compression.ZSTD, b"\x28\xb5\x2f\xfd" + b"\xff" * 64, chunk)


def test_zstd_chunk_bomb_stops_early() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(256 << 20))
    chunk = Chunk(0, 10, 0, len(bomb), 5, "sha256:" + hashlib.sha256(bytes(10)).hexdigest())
    tracemalloc.start()
    try:
        assert decompress_chunk(Compression.ZSTD, bomb, chunk) == bytes(10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_skippable_frames_between_chunks_are_passed_over() -> None:
    frame = skippable_frame(b"metadata") + zstandard.ZstdCompressor().compress(b"payload")
    chunk = Chunk(0, 7, 0, len(frame), 0, "sha256:" + hashlib.sha256(b"payload").hexdigest())
    assert decompress_chunk(Compression.ZSTD, frame, chunk) == b"payload"
