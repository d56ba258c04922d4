"""eStargz parsing: footers (51/47 bytes), TOC verification and validation, chunk decoding."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from snapshotter.formats import (
    MAX_FOOTER_SIZE,
    BuiltBlob,
    ChunkDigestError,
    Compression,
    FormatError,
    build_estargz,
    build_zstdchunked,
    chunk_digest_ok,
    decompress_chunk,
    locate_toc,
    parse_toc,
)
from snapshotter.formats.estargz import gzip_footer, legacy_footer
from tests.unit.formats import BIG, COMPRESSIONS, file_bytes, parse_blob, rewrite_toc, sample_tar

CHUNK = 64 << 10


@pytest.fixture(scope="module")
def built() -> BuiltBlob:
    return build_estargz(sample_tar(), chunk_size=CHUNK)


@pytest.fixture(scope="module")
def built_zstd() -> BuiltBlob:
    return build_zstdchunked(sample_tar(), chunk_size=CHUNK)


def _gzip(data: bytes, level: int = 6) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


# -- footers ------------------------------------------------------------------------------


def test_legacy_47_byte_footer(built: BuiltBlob) -> None:
    blob = built.blob[:-51] + legacy_footer(built.toc_offset)
    loc = locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob))
    assert (loc.format, loc.footer_size, loc.offset) == ("stargz", 47, built.toc_offset)
    index = parse_blob(blob, built.toc_digest)
    assert index.format == "stargz"
    assert file_bytes(blob, index, "data/big.bin") == BIG


def test_location_of_51_byte_footer(built: BuiltBlob) -> None:
    loc = locate_toc(built.blob[-MAX_FOOTER_SIZE:], len(built.blob))
    assert (loc.format, loc.compression, loc.footer_size) == ("estargz", Compression.GZIP, 51)
    assert loc.offset + loc.length + 51 == len(built.blob)
    assert loc.uncompressed_length is None


def _corrupt_footer(blob: bytes, at: int, value: bytes) -> bytes:
    footer = bytearray(blob[-51:])
    footer[at : at + len(value)] = value
    return blob[:-51] + bytes(footer)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[-30:], "no eStargz or zstd:chunked footer"),  # truncated: blob shorter than a footer
        (lambda b: _corrupt_footer(b, 0, b"\x1f\x8c"), "wrong magic"),
        (lambda b: _corrupt_footer(b, 12, b"XG"), "subfield id"),
        (lambda b: _corrupt_footer(b, 32, b"STARGY"), "STARGZ magic"),
        (lambda b: _corrupt_footer(b, 16, b"zz"), "not hexadecimal"),
        (lambda b: b[:-51] + gzip_footer(len(b)), "points outside the blob"),
        (lambda b: b[:-51] + gzip_footer(len(b) - 51), "points outside the blob"),
        (lambda b: _corrupt_footer(b, 38, b"\x00"), "corrupt gzip member"),
        (lambda b: b[:-51] + b"\x00" * 51, "no eStargz or zstd:chunked footer"),
    ],
)
def test_bad_footers(built: BuiltBlob, mangle: Callable[[bytes], bytes], message: str) -> None:
    blob = mangle(built.blob)
    with pytest.raises(FormatError, match=message):
        locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob))


def test_tail_longer_than_blob() -> None:
    with pytest.raises(FormatError, match=r"longer than the blob"):
        locate_toc(b"x" * 10, 5)


# -- TOC verification -----------------------------------------------------------------------


def _loc_raw(blob: bytes) -> tuple[Any, bytes]:
    loc = locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob))
    return loc, blob[loc.offset : loc.offset + loc.length]


def test_toc_digest_required_unless_verify_false(built: BuiltBlob) -> None:
    loc, raw = _loc_raw(built.blob)
    with pytest.raises(FormatError, match=r"no TOC digest"):
        parse_toc(raw, loc, blob_size=len(built.blob), expected_digest=None)
    index = parse_toc(raw, loc, blob_size=len(built.blob), expected_digest=None, verify=False)
    assert "data/big.bin" in index.entries


def test_toc_digest_mismatch(built: BuiltBlob) -> None:
    loc, raw = _loc_raw(built.blob)
    with pytest.raises(FormatError, match=r"TOC digest mismatch"):
        parse_toc(raw, loc, blob_size=len(built.blob), expected_digest="sha256:" + "0" * 64)
    with pytest.raises(FormatError, match=r"malformed digest"):
        parse_toc(raw, loc, blob_size=len(built.blob), expected_digest="md5:abc")
    # For eStargz the digest is over the JSON, never over the compressed member.
    with pytest.raises(FormatError, match=r"TOC digest mismatch"):
        parse_toc(
            raw, loc, blob_size=len(built.blob), expected_digest="sha256:" + hashlib.sha256(raw).hexdigest()
        )


def test_toc_short_read(built: BuiltBlob) -> None:
    loc, raw = _loc_raw(built.blob)
    with pytest.raises(FormatError, match=r"got"):
        parse_toc(raw[:-1], loc, blob_size=len(built.blob), expected_digest=built.toc_digest)


def test_toc_larger_than_limit(built: BuiltBlob) -> None:
    loc, raw = _loc_raw(built.blob)
    with pytest.raises(FormatError, match=r"limit"):
        parse_toc(raw, loc, blob_size=len(built.blob), expected_digest=built.toc_digest, max_toc_bytes=100)


def _with_toc_member(built: BuiltBlob, member: bytes) -> bytes:
    head = built.blob[: built.toc_offset]
    return head + member + gzip_footer(len(head))


def _tar_header_then_zeros(size: int) -> bytes:
    import tarfile

    info = tarfile.TarInfo("stargz.index.json")
    info.size = size
    return info.tobuf() + bytes(size)


@pytest.mark.parametrize(
    ("tar", "message"),
    [
        (bytes(64 << 20), "no tar entry"),  # zeros: refused at the tar header
        (_tar_header_then_zeros(64 << 20), "larger than the 1048576-byte limit"),
    ],
    ids=["zeros", "toc-of-zeros"],
)
def test_gzip_bomb_toc_is_refused_without_allocating(tar: bytes, message: str) -> None:
    small = build_estargz(b"")
    bomb = _with_toc_member(small, _gzip(tar, 9))
    loc, raw = _loc_raw(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=message):
            parse_toc(
                raw, loc, blob_size=len(bomb), expected_digest=None, verify=False, max_toc_bytes=1 << 20
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_toc_member_with_wrong_tar_entry(built: BuiltBlob) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("other.json")
        ti.size = 2
        tf.addfile(ti, io.BytesIO(b"{}"))
    blob = _with_toc_member(built, _gzip(buf.getvalue()))
    with pytest.raises(FormatError, match=r"want 'stargz.index.json'"):
        parse_blob(blob, None, verify=False)
    _, raw = _loc_raw(built.blob)
    blob = _with_toc_member(built, raw[:-10])  # the JSON is whole, the member's trailer is not
    with pytest.raises(FormatError, match=r"truncated|corrupt"):
        parse_blob(blob, None, verify=False)


# -- TOC validation corpus (both compressions) --------------------------------------------


def _entry(doc: dict[str, Any], name: str, type_: str = "") -> dict[str, Any]:
    for e in doc["entries"]:
        if e["name"].rstrip("/") == name and (not type_ or e["type"] == type_):
            return e  # type: ignore[no-any-return]
    raise KeyError(name)


def _chunks(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in doc["entries"] if e["name"] == name and e["type"] in ("reg", "chunk")]


def _set(name: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: _entry(doc, name).update(fields)


def _drop(name: str, *keys: str) -> Callable[[dict[str, Any]], None]:
    def f(doc: dict[str, Any]) -> None:
        for k in keys:
            _entry(doc, name).pop(k, None)

    return f


def _append(**entry: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["entries"].append(entry)


def _prepend(**entry: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["entries"].insert(0, entry)


def _chunk_field(i: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: _chunks(doc, "data/big.bin")[i].update(fields)


def _drop_chunk(i: int) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["entries"].remove(_chunks(doc, "data/big.bin")[i])


def _explicit_last(doc: dict[str, Any], new_size: int) -> None:
    last = _chunks(doc, "data/big.bin")[-1]
    last["chunkSize"] = len(BIG) - last["chunkOffset"]
    _entry(doc, "data/big.bin", "reg")["size"] = new_size


BAD_TOCS: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("version", lambda d: d.update(version=2), "unsupported TOC version 2"),
    ("version-missing", lambda d: d.pop("version"), "unsupported TOC version None"),
    ("entries-not-list", lambda d: d.update(entries={}), "no entries list"),
    ("entry-not-object", _append(), "unknown entry type None"),
    ("entry-not-dict", lambda d: d["entries"].append(3), "#.* is not a JSON object"),
    ("unknown-type", _set("etc/hosts", type="socket"), "'etc/hosts'.*unknown entry type 'socket'"),
    ("dotdot", _append(name="../evil", type="dir"), r"'\.\./evil'.*escapes"),
    ("dotdot-inner", _append(name="/a/../../etc/x", type="dir"), "escapes"),
    ("name-not-string", _append(name=5, type="dir"), "not a string"),
    ("duplicate", _append(name="./etc/hosts", type="symlink", linkName="x"), "'etc/hosts'.*duplicate"),
    ("hardlink-missing", _append(name="hl", type="hardlink", linkName="nope"), "'hl'.*missing or later"),
    ("hardlink-later", _prepend(name="hl", type="hardlink", linkName="etc/hosts"), "'hl'.*missing or later"),
    ("hardlink-to-dir", _append(name="hl", type="hardlink", linkName="etc"), "'hl'.*not a file"),
    ("hardlink-to-symlink", _append(name="hl", type="hardlink", linkName="data/sym"), "'hl'.*not a file"),
    ("hardlink-no-target", _append(name="hl", type="hardlink"), "'hl'.*without linkName"),
    ("symlink-no-target", _drop("data/sym", "linkName"), "'data/sym'.*without linkName"),
    ("negative-offset", _chunk_field(1, offset=-5), "'data/big.bin'.*negative"),
    ("offset-past-toc", _chunk_field(1, offset=10**9), "'data/big.bin'.*beyond the data region"),
    ("offset-at-toc", lambda d: None, ""),  # placeholder replaced per compression below
    ("negative-size", _set("etc/hosts", size=-1), "'etc/hosts'.*negative"),
    ("size-overflow", _set("etc/hosts", size=1 << 63), "'etc/hosts'.*overflows"),
    ("chunk-overflow", _chunk_field(1, chunkOffset=(1 << 63) - 10), "'data/big.bin'"),
    ("size-not-int", _set("etc/hosts", size="20"), "'etc/hosts'.*not an integer"),
    ("size-float", _set("etc/hosts", size=20.0), "not an integer"),
    ("size-bool", _set("etc/hosts", mode=True), "not an integer"),
    ("chunk-gap", _drop_chunk(2), "'data/big.bin'.*gap"),
    ("chunk-overlap", _chunk_field(1, chunkOffset=100), "'data/big.bin'.*overlap"),
    ("size-too-big", lambda d: _explicit_last(d, 400_000), "'data/big.bin'.*sum to"),
    ("size-too-small", _set("data/small", size=2, chunkSize=1), "'data/small'.*sum to"),
    ("chunk-size-past-end", _chunk_field(0, chunkSize=400_000), "'data/big.bin'"),
    ("missing-chunk-digest", _chunk_field(1, chunkDigest=""), "'data/big.bin'.*missing chunkDigest"),
    ("missing-all-digests", _drop("etc/hosts", "chunkDigest", "digest"), "'etc/hosts'.*missing chunkDigest"),
    ("bad-chunk-digest", _chunk_field(0, chunkDigest="sha256:xyz"), "'data/big.bin' chunkDigest.*malformed"),
    ("upper-hex-digest", _set("etc/hosts", chunkDigest="sha256:" + "A" * 64), "malformed digest"),
    ("bad-file-digest", _set("etc/hosts", digest="sha512:00"), "'etc/hosts' digest.*malformed"),
    (
        "chunk-first",
        lambda d: d["entries"].insert(0, {"name": "x", "type": "chunk"}),
        "chunk that follows no",
    ),
    (
        "chunk-other-name",
        _chunk_field(1, name="etc/hosts"),
        "chunk record inside the chunks of 'data/big.bin'",
    ),
    ("chunk-type", _chunk_field(1, chunkType="holes"), "unknown chunkType"),
    ("parent-not-dir", _append(name="etc/hosts/x", type="dir"), "'etc/hosts/x'.*parent 'etc/hosts' is a reg"),
    ("root-not-dir", _append(name="./", type="reg"), "root must be a directory"),
    ("both-landmarks", _append(name=".prefetch.landmark", type="reg"), "both"),
    ("bad-xattr", _set("etc/hosts", xattrs={"user.a": "!!"}), "'etc/hosts'.*base64"),
    ("xattrs-not-map", _set("etc/hosts", xattrs=[1]), "'etc/hosts'.*xattrs"),
    ("uid-overflow", _set("etc/hosts", uid=1 << 40), "'etc/hosts'.*uid"),
]


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize(("case", "mutate", "message"), BAD_TOCS, ids=[c[0] for c in BAD_TOCS])
def test_bad_toc_is_rejected(
    built: BuiltBlob,
    built_zstd: BuiltBlob,
    compression: Compression,
    case: str,
    mutate: Callable[[dict[str, Any]], object],
    message: str,
) -> None:
    source = built if compression is Compression.GZIP else built_zstd
    if case == "offset-at-toc":
        # The TOC starts a stream too; a chunk pointing at it is past the data region.
        metadata_start = source.toc_offset

        def mutate(d: dict[str, Any]) -> None:
            _chunks(d, "data/big.bin")[1]["offset"] = metadata_start

        message = "beyond the data region"
    blob, digest = rewrite_toc(source, mutate)
    with pytest.raises(FormatError, match=message):
        parse_blob(blob, digest)


def test_invalid_json(built: BuiltBlob) -> None:
    blob, digest = rewrite_toc(built, lambda d: None, raw_json=b"{not json")
    with pytest.raises(FormatError, match=r"not valid JSON"):
        parse_blob(blob, digest)
    blob, digest = rewrite_toc(built, lambda d: None, raw_json=b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(FormatError, match=r"not valid JSON|not an object"):
        parse_blob(blob, digest)


def test_tolerated_toc_variations(built: BuiltBlob) -> None:
    def mutate(d: dict[str, Any]) -> None:
        _entry(d, "etc/hosts")["modtime"] = "not a time"  # SGZ ignores unparsable times
        _entry(d, "data/small")["modtime"] = "2020-01-01T01:00:00.123456789+01:00"
        _entry(d, "etc/hosts")["userName"] = "root"
        d["entries"].append({"name": "./x/./y//z/", "type": "dir", "mode": 0o40755})

    blob, digest = rewrite_toc(built, mutate)
    index = parse_blob(blob, digest)
    assert index.entries["etc/hosts"].mtime_ns == 0
    assert index.entries["data/small"].mtime_ns == 1577836800_123456789
    assert index.entries["x/y/z"].mode == 0o755  # file-type bits dropped
    assert index.entries["x"].type.value == "dir"


def test_wrong_size_with_implicit_last_chunk_fails_at_read(built: BuiltBlob) -> None:
    # chunkSize 0 means "to the end of the file", so the TOC alone cannot show the lie;
    # reading the last chunk does (the stream is too short).
    blob, digest = rewrite_toc(built, _set("data/big.bin", size=len(BIG) + 1))
    index = parse_blob(blob, digest)
    with pytest.raises(FormatError, match=r"need|digest mismatch"):
        file_bytes(blob, index, "data/big.bin")


def test_legacy_toc_without_chunk_digest_uses_file_digest(built: BuiltBlob) -> None:
    blob, digest = rewrite_toc(built, _drop("etc/hosts", "chunkDigest"))
    index = parse_blob(blob, digest)
    assert index.entries["etc/hosts"].chunks[0].digest == index.entries["etc/hosts"].digest
    assert file_bytes(blob, index, "etc/hosts") == b"127.0.0.1 localhost\n"


# -- chunks -------------------------------------------------------------------------------


def test_chunk_ranges_tile_the_data_region(built: BuiltBlob) -> None:
    index = parse_blob(built.blob, built.toc_digest)
    chunks = sorted((c for e in index.entries.values() for c in e.chunks), key=lambda c: c.compressed_offset)
    for a, b in itertools.pairwise(chunks):
        assert a.compressed_offset + a.compressed_size == b.compressed_offset
    assert chunks[-1].compressed_offset + chunks[-1].compressed_size == index.toc_offset == built.toc_offset
    assert all(c.inner_offset == 0 for c in chunks)


def test_decompress_chunk_errors(built: BuiltBlob) -> None:
    index = parse_blob(built.blob, built.toc_digest)
    chunk = index.entries["data/big.bin"].chunks[1]
    data = built.blob[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_size]
    assert decompress_chunk(Compression.GZIP, data, chunk) == BIG[CHUNK : 2 * CHUNK]
    with pytest.raises(ChunkDigestError, match=r"digest mismatch"):
        decompress_chunk(Compression.GZIP, data, dataclasses.replace(chunk, digest="sha256:" + "0" * 64))
    with pytest.raises(FormatError, match=r"truncated"):
        decompress_chunk(Compression.GZIP, data[: len(data) // 2], chunk)
    with pytest.raises(FormatError, match=r"corrupt gzip"):
        decompress_chunk(Compression.GZIP, b"\x1f\x8b\x08\x00garbage-garbage", chunk)
    with pytest.raises(FormatError, match=r"need"):
        decompress_chunk(Compression.GZIP, data, dataclasses.replace(chunk, size=chunk.size + 1))


def test_chunk_with_inner_offset() -> None:
    payload = b"header--" + b"content"
    data = _gzip(payload)
    from snapshotter.formats import Chunk

    chunk = Chunk(0, 7, 0, len(data), 8, "sha256:" + hashlib.sha256(b"content").hexdigest())
    assert decompress_chunk(Compression.GZIP, data, chunk) == b"content"
    # the stream may continue in a following member (SGZ's reader is multistream)
    split = _gzip(b"header--con") + _gzip(b"tent")
    assert decompress_chunk(Compression.GZIP, split, chunk) == b"content"


def test_chunk_bomb_stops_early() -> None:
    from snapshotter.formats import Chunk

    bomb = _gzip(bytes(256 << 20), 9)
    chunk = Chunk(0, 10, 0, len(bomb), 5, "sha256:" + hashlib.sha256(bytes(10)).hexdigest())
    tracemalloc.start()
    try:
        assert decompress_chunk(Compression.GZIP, bomb, chunk) == bytes(10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_chunk_digest_ok() -> None:
    assert chunk_digest_ok(b"a", "sha256:" + hashlib.sha256(b"a").hexdigest())
    assert not chunk_digest_ok(b"b", "sha256:" + hashlib.sha256(b"a").hexdigest())
    assert not chunk_digest_ok(b"a", "sha512:" + hashlib.sha256(b"a").hexdigest())
