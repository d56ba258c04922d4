"""build.py: blobs round-trip through our parser, decompress to a valid tar, match SGZ's layout."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import tarfile

import pytest
import zstandard

from snapshotter.formats import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    Compression,
    EntryType,
    FormatError,
    build_blob,
    build_estargz,
    build_zstdchunked,
)
from snapshotter.formats.estargz import gzip_footer
from snapshotter.formats.zstdchunked import (
    MANIFEST_CHECKSUM_ANNOTATION,
    MANIFEST_POSITION_ANNOTATION,
    SGZ_MAGIC,
    SKIPPABLE_MAGIC,
    ZSTD_FRAME_MAGIC,
)
from tests.unit.formats import (
    BIG,
    COMPRESSIONS,
    MTIME,
    file_bytes,
    parse_blob,
    sample_tar,
    tar_members,
    toc_of,
)

CHUNK = 64 << 10
_TYPES = {
    tarfile.DIRTYPE: EntryType.DIR,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.FIFOTYPE: EntryType.FIFO,
}


def _decompress_all(blob: bytes, compression: Compression) -> bytes:
    if compression is Compression.GZIP:
        return gzip.decompress(blob)
    return zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_round_trip_matches_source_tar(compression: Compression) -> None:
    tar = sample_tar()
    built = build_blob(tar, compression, chunk_size=CHUNK)
    index = parse_blob(built.blob, built.toc_digest)
    assert index.format == ("estargz" if compression is Compression.GZIP else "zstdchunked")
    for name, (ti, data) in tar_members(tar).items():
        entry = index.entries[name]
        assert entry.type is (EntryType.REG if ti.isreg() else _TYPES[ti.type]), name
        assert (entry.mode, entry.uid, entry.gid) == (ti.mode & 0o7777, ti.uid, ti.gid), name
        assert entry.mtime_ns == MTIME * 10**9, name
        if ti.isreg():
            assert entry.size == len(data)
            assert file_bytes(built.blob, index, name) == data, name
            assert entry.digest == "sha256:" + hashlib.sha256(data).hexdigest()
            assert len(entry.chunks) == math.ceil(len(data) / CHUNK), name
        if ti.issym():
            assert entry.link_name == ti.linkname
        if ti.ischr():
            assert (entry.dev_major, entry.dev_minor) == (1, 3)
    assert index.entries["data/link"].link_name == "data/small"
    assert index.entries["data/link2"].link_name == "data/small"  # chains resolve to the file
    assert index.entries["data/xattr"].xattrs == {"user.k": b"v", "security.c": b"\x01\x02"}
    for synthesized in ("", "data", "dev", "a" * 120, "data/olddir"):
        assert index.entries[synthesized].type is EntryType.DIR
        assert index.entries[synthesized].mode == 0o755
    # whiteouts and landmarks stay ordinary entries
    assert index.entries["data/.wh.gone"].type is EntryType.REG
    assert index.entries[NO_PREFETCH_LANDMARK].size == 1
    assert index.no_prefetch and index.prefetch == [] and index.prefetch_end == 0


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_blob_decompresses_to_the_diffid_tar(compression: Compression) -> None:
    tar = sample_tar()
    built = build_blob(tar, compression, chunk_size=CHUNK)
    plain = _decompress_all(built.blob, compression)
    assert "sha256:" + hashlib.sha256(plain).hexdigest() == built.diff_id
    assert built.annotations[UNCOMPRESSED_SIZE_ANNOTATION] == str(len(plain)) == str(built.uncompressed_size)
    members = tar_members(plain)
    expected = {n: d for n, (_, d) in tar_members(tar).items()}
    if compression is Compression.GZIP:
        # The TOC is the last tar entry (so it is part of the DiffID) ...
        assert list(members)[-1] == "stargz.index.json"
        assert members.pop("stargz.index.json")[1] == built.toc_json
    else:
        # ... but zstd:chunked keeps it in a skippable frame, outside the tar stream.
        assert "stargz.index.json" not in members
    assert members.pop(NO_PREFETCH_LANDMARK)[1] == b"\x0f"
    assert {n: d for n, (_, d) in members.items()} == expected


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_chunk_starts_a_stream(compression: Compression) -> None:
    built = build_blob(sample_tar(), compression, chunk_size=CHUNK)
    index = parse_blob(built.blob, built.toc_digest)
    magic = b"\x1f\x8b\x08" if compression is Compression.GZIP else ZSTD_FRAME_MAGIC
    offsets = {c.compressed_offset for e in index.entries.values() for c in e.chunks}
    assert len(offsets) == sum(len(e.chunks) for e in index.entries.values())
    for off in offsets | {0}:
        assert built.blob[off : off + len(magic)] == magic
    if compression is Compression.GZIP:
        assert built.blob[built.toc_offset : built.toc_offset + 3] == magic
    else:
        assert built.blob[built.toc_offset : built.toc_offset + 4] == SKIPPABLE_MAGIC


def test_estargz_footer_and_annotations() -> None:
    built = build_estargz(sample_tar())
    assert built.blob[-51:] == gzip_footer(built.toc_offset)
    assert built.blob[-51:-41] == b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
    assert built.blob[-35:-13] == b"%016xSTARGZ" % built.toc_offset
    assert set(built.annotations) == {TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION}
    assert built.annotations[TOC_DIGEST_ANNOTATION] == "sha256:" + hashlib.sha256(built.toc_json).hexdigest()
    assert built.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"


def test_zstdchunked_footer_and_annotations() -> None:
    built = build_zstdchunked(sample_tar())
    footer = built.blob[-48:]
    assert footer[:8] == SKIPPABLE_MAGIC + (40).to_bytes(4, "little")
    assert footer[-8:] == SGZ_MAGIC
    toc_off = int.from_bytes(footer[8:16], "little")
    clen = int.from_bytes(footer[16:24], "little")
    assert toc_off == built.toc_offset + 8
    assert built.annotations[MANIFEST_POSITION_ANNOTATION] == f"{toc_off}:{clen}:{len(built.toc_json)}:1"
    compressed = built.blob[toc_off : toc_off + clen]
    assert (
        built.annotations[MANIFEST_CHECKSUM_ANNOTATION] == "sha256:" + hashlib.sha256(compressed).hexdigest()
    )
    assert built.annotations[TOC_DIGEST_ANNOTATION] == built.toc_digest
    assert built.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"


def test_toc_json_is_go_marshal_indent() -> None:
    built = build_estargz(sample_tar())
    text = built.toc_json.decode()
    assert text.startswith(
        '{\n\t"version": 1,\n\t"entries": [\n\t\t{\n\t\t\t"name": ".no.prefetch.landmark",\n'
    )
    assert text.endswith("\n\t]\n}")
    assert '"data/sp ace\\u003c\\u0026\\u003eé.txt"' in text  # Go escapes <, &, > and keeps UTF-8
    entry = next(e for e in toc_of(built)["entries"] if e["name"] == "etc/")
    assert list(entry) == ["name", "type", "modtime", "mode"]  # Go field order, zero values omitted
    big = [e for e in toc_of(built)["entries"] if e["name"] == "data/big.bin"]
    assert list(big[0]) == [
        "name", "type", "size", "modtime", "mode", "uid", "gid", "userName", "groupName",
        "offset", "digest", "chunkDigest",
    ]  # fmt: skip


def test_chunk_records_follow_sgz() -> None:
    size = 2 * CHUNK + 1
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, n in (("exact", CHUNK), ("three", size)):
            ti = tarfile.TarInfo(name)
            ti.size = n
            tf.addfile(ti, io.BytesIO(b"z" * n))
    entries = toc_of(build_estargz(buf.getvalue(), chunk_size=CHUNK))["entries"]
    exact = [e for e in entries if e["name"] == "exact"]
    assert len(exact) == 1 and exact[0]["chunkSize"] == CHUNK  # a full chunk records its size
    three = [e for e in entries if e["name"] == "three"]
    assert [e["type"] for e in three] == ["reg", "chunk", "chunk"]
    assert [e.get("chunkOffset", 0) for e in three] == [0, CHUNK, 2 * CHUNK]
    assert [e.get("chunkSize", 0) for e in three] == [CHUNK, CHUNK, 0]  # last: "to the end"
    assert "digest" in three[0] and "digest" not in three[1]


def test_default_chunk_size_is_4mib() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("f")
        ti.size = (4 << 20) + 1
        tf.addfile(ti, io.BytesIO(bytes(ti.size)))
    built = build_zstdchunked(buf.getvalue())
    chunks = parse_blob(built.blob, built.toc_digest).entries["f"].chunks
    assert [c.size for c in chunks] == [4 << 20, 1]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_prioritized_files_come_first(compression: Compression) -> None:
    built = build_blob(
        sample_tar(), compression, chunk_size=CHUNK, prioritized_files=["/data/link2", "etc/hosts"]
    )
    names = [e["name"] for e in toc_of(built)["entries"] if e["type"] != "chunk"]
    # hardlink targets and existing parents are moved too; "data" is implicit (not in the tar).
    assert names[:6] == ["data/small", "data/link", "data/link2", "etc/", "etc/hosts", PREFETCH_LANDMARK]
    index = parse_blob(built.blob, built.toc_digest)
    assert index.prefetch == ["data/small", "data/link", "data/link2", "etc", "etc/hosts"]
    assert not index.no_prefetch and NO_PREFETCH_LANDMARK not in index.entries
    assert index.prefetch_end == index.entries[PREFETCH_LANDMARK].chunks[0].compressed_offset
    for name in index.prefetch:
        for c in index.entries[name].chunks:
            assert c.compressed_offset + c.compressed_size <= index.prefetch_end
    assert file_bytes(built.blob, index, PREFETCH_LANDMARK) == b"\x0f"


def test_missing_prioritized_file() -> None:
    with pytest.raises(FormatError, match=r"not in the layer"):
        build_estargz(sample_tar(), prioritized_files=["nope"])
    built = build_estargz(
        sample_tar(), prioritized_files=["nope", "etc/hosts"], allow_missing_prioritized=True
    )
    assert built.missing_prioritized == ("nope",)
    assert parse_blob(built.blob, built.toc_digest).prefetch == ["etc", "etc/hosts"]


def test_input_cleanup_and_compressed_input() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (
            ("f", b"old"),
            ("stargz.index.json", b"{}"),
            (PREFETCH_LANDMARK, b"\x0f"),
            ("./f", b"new"),
        ):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    built = build_zstdchunked(gzip.compress(buf.getvalue()))
    index = parse_blob(built.blob, built.toc_digest)
    assert [n for n in index.entries if n] == [NO_PREFETCH_LANDMARK, "f"]  # dup collapsed to the last
    assert file_bytes(built.blob, index, "f") == b"new"


def test_big_file_spans_chunks_and_reassembles() -> None:
    built = build_estargz(sample_tar(), chunk_size=10_000)
    index = parse_blob(built.blob, built.toc_digest)
    assert len(index.entries["data/big.bin"].chunks) == 30
    assert file_bytes(built.blob, index, "data/big.bin") == BIG


def test_zstd_compressed_input_and_empty_layer() -> None:
    tar = sample_tar()
    a = build_estargz(zstandard.ZstdCompressor().compress(tar))
    assert a.toc_json == build_estargz(tar).toc_json
    empty = build_zstdchunked(b"")
    index = parse_blob(empty.blob, empty.toc_digest)
    assert list(index.entries) == ["", NO_PREFETCH_LANDMARK]
