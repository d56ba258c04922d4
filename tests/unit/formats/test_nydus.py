"""nydus.py: the footer and bootstrap at the byte offsets docs/FORMAT.md gives, every validation
rule with its message, hypothesis fuzzing of footer and bootstrap bytes, and parse speed."""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import tarfile
import time
import zlib
from collections.abc import Callable

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.formats import FormatError, LayerIndex, nydus
from snapshotter.formats.build import BuiltBlob
from snapshotter.formats.build_nydus import build_nydus, build_nydus_image
from snapshotter.formats.nydus import (
    BLOB_RECORD_SIZE,
    BOOTSTRAP_DIGEST_ANNOTATION,
    BOOTSTRAP_DIGEST_LABEL,
    CHUNK_RECORD_SIZE,
    ENTRY_RECORD_SIZE,
    FOOTER_SIZE,
    HEADER_SIZE,
    IMAGE_REQUIRES_ANNOTATION,
    MEDIA_TYPE,
    XATTR_RECORD_SIZE,
    BootstrapLocation,
    bootstrap_digest,
    is_nydus_layer,
    locate_bootstrap,
    manifest_annotations,
    pack_footer,
    parse_bootstrap,
)
from tests.support.memory import peak_growth
from tests.unit.formats import BIG, sample_tar
from tests.unit.formats.hostile import nydus_bootstrap

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_CHUNK = 4 << 10

# Byte offsets from docs/FORMAT.md; the tests edit bootstraps through them, so they check the spec.
H_VERSION, H_FLAGS, H_HEADER_SIZE, H_CHUNK_SIZE = 8, 10, 12, 16
H_ENTRIES, H_CHUNKS, H_REFS, H_XATTRS, H_BLOBS, H_PREFETCH, H_STRINGS = 24, 32, 40, 48, 56, 64, 72
E_NAME, E_LINK, E_TYPE, E_MODE, E_UID, E_MTIME, E_SIZE, E_DEV = 0, 8, 16, 20, 24, 32, 40, 48
E_REFS, E_XATTRS, E_DIGEST = 56, 64, 72
C_BLOB, C_SIZE, C_OFFSET, C_CSIZE, C_FLAGS = 32, 36, 40, 48, 52


# -- helpers (test_build_nydus.py uses them too) ---------------------------------------------------


def parse_nydus(blob: bytes, digest: str, *, max_bytes: int = 64 << 20) -> LayerIndex:
    """locate_bootstrap + parse_bootstrap over a whole in-memory blob."""
    loc = locate_bootstrap(blob[-FOOTER_SIZE:], len(blob), max_bytes=max_bytes)
    raw = blob[loc.offset : loc.offset + loc.length]
    return parse_bootstrap(raw, loc, blob_size=len(blob), expected_digest=digest, max_bytes=max_bytes)


def parse_built(built: BuiltBlob) -> LayerIndex:
    return parse_nydus(built.blob, built.annotations[BOOTSTRAP_DIGEST_ANNOTATION])


def wrap(head: bytes, bootstrap: bytes) -> tuple[bytes, str]:
    """A blob with data region ``head`` and the given uncompressed bootstrap; (blob, digest)."""
    stored = zstandard.ZstdCompressor().compress(bootstrap)
    blob = head + stored + pack_footer(len(head), len(stored), len(bootstrap))
    return blob, "sha256:" + hashlib.sha256(stored).hexdigest()


class Boot:
    """An editable copy of a built blob's uncompressed bootstrap."""

    def __init__(self, built: BuiltBlob) -> None:
        self.head = built.blob[: built.toc_offset]
        self.data = bytearray(built.toc_json)

    def get(self, fmt: str, at: int) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, at)
        return int(value)

    def put(self, fmt: str, at: int, *values: object) -> None:
        struct.pack_into("<" + fmt, self.data, at, *values)

    def table(self, slot_at: int) -> tuple[int, int]:
        return self.get("I", slot_at), self.get("I", slot_at + 4)

    def string(self, off: int, length: int) -> bytes:
        base = self.get("I", H_STRINGS)
        return bytes(self.data[base + off : base + off + length])

    def entry(self, name: str) -> int:
        """Byte offset of ``name``'s entry record."""
        off, count = self.table(H_ENTRIES)
        for i in range(count):
            at = off + i * ENTRY_RECORD_SIZE
            if self.string(self.get("I", at), self.get("I", at + 4)).decode() == name:
                return at
        raise KeyError(name)

    def chunk(self, i: int) -> int:
        return self.table(H_CHUNKS)[0] + i * CHUNK_RECORD_SIZE

    def first_ref(self, name: str) -> int:
        """Chunk-table index of the first chunk of ``name``."""
        at = self.entry(name)
        return self.get("I", self.table(H_REFS)[0] + 4 * self.get("I", at + E_REFS))

    def add_string(self, value: bytes) -> tuple[int, int]:
        """Append to the string table (the last table) and return its (offset, length)."""
        _, length = self.table(H_STRINGS)
        self.data += value
        self.put("I", H_STRINGS + 4, length + len(value))
        return length, len(value)

    def rename(self, name: str, new: str | bytes) -> None:
        self.put(
            "II", self.entry(name) + E_NAME, *self.add_string(new if isinstance(new, bytes) else new.encode())
        )

    def relink(self, name: str, target: str) -> None:
        self.put("II", self.entry(name) + E_LINK, *self.add_string(target.encode()))

    def blob(self) -> tuple[bytes, str]:
        return wrap(self.head, bytes(self.data))

    def parse(self) -> LayerIndex:
        return parse_nydus(*self.blob())


_built_cache: dict[str, BuiltBlob] = {}


def sample() -> BuiltBlob:
    if "sample" not in _built_cache:
        _built_cache["sample"] = build_nydus(
            sample_tar(), chunk_size=SMALL_CHUNK, prioritized_files=["etc/hosts"]
        )
    return _built_cache["sample"]


def two_layers() -> list[BuiltBlob]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("a", b"A" * 10_000), ("copy", BIG)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return build_nydus_image([sample_tar(), buf.getvalue()], chunk_size=SMALL_CHUNK)


# -- packaging -------------------------------------------------------------------------------------


def test_media_type_and_annotations() -> None:
    assert MEDIA_TYPE.startswith("application/vnd.oci.image.layer.")
    assert BOOTSTRAP_DIGEST_LABEL.startswith("containerd.io/snapshot/")  # forwarded to Prepare
    assert "lazysnap" in manifest_annotations()[IMAGE_REQUIRES_ANNOTATION]
    built = sample()
    assert built.media_type == MEDIA_TYPE
    assert built.annotations == {
        BOOTSTRAP_DIGEST_ANNOTATION: built.toc_digest,
        BOOTSTRAP_DIGEST_LABEL: built.toc_digest,
    }
    assert is_nydus_layer(MEDIA_TYPE, {})
    assert not is_nydus_layer("application/vnd.oci.image.layer.v1.tar+gzip", built.annotations)
    assert is_nydus_layer("", {BOOTSTRAP_DIGEST_LABEL: built.toc_digest})
    assert not is_nydus_layer("", {})
    assert bootstrap_digest(built.annotations) == built.toc_digest
    assert bootstrap_digest({BOOTSTRAP_DIGEST_LABEL: "sha256:" + "1" * 64}) == "sha256:" + "1" * 64
    assert bootstrap_digest({}) is None
    with pytest.raises(FormatError, match="disagree"):
        bootstrap_digest({BOOTSTRAP_DIGEST_ANNOTATION: "sha256:" + "1" * 64, BOOTSTRAP_DIGEST_LABEL: "x"})


# -- byte layout as documented -----------------------------------------------------------------------


def test_record_sizes() -> None:
    assert (
        FOOTER_SIZE,
        HEADER_SIZE,
        ENTRY_RECORD_SIZE,
        CHUNK_RECORD_SIZE,
        XATTR_RECORD_SIZE,
        BLOB_RECORD_SIZE,
    ) == (
        64,
        80,
        104,
        56,
        16,
        40,
    )


def test_footer_bytes_at_documented_offsets() -> None:
    built = sample()
    footer = built.blob[-FOOTER_SIZE:]
    stored = len(built.blob) - FOOTER_SIZE - built.toc_offset
    assert footer[0:8] == b"LZNYFOOT"
    assert struct.unpack_from("<HHI", footer, 8) == (1, 0, 1)  # version, flags, compression=zstd
    assert struct.unpack_from("<QQQ", footer, 16) == (built.toc_offset, stored, len(built.toc_json))
    assert footer[40:60] == bytes(20)
    assert struct.unpack_from("<I", footer, 60)[0] == zlib.crc32(footer[:60])
    assert built.blob[built.toc_offset : built.toc_offset + 4] == b"\x28\xb5\x2f\xfd"  # a zstd frame


def test_bootstrap_bytes_at_documented_offsets() -> None:
    built = sample()
    b = Boot(built)
    assert b.data[:8] == b"LZNYBOOT"
    assert (b.get("H", H_VERSION), b.get("H", H_FLAGS), b.get("I", H_HEADER_SIZE)) == (1, 0, 80)
    assert b.get("I", H_CHUNK_SIZE) == SMALL_CHUNK
    index = parse_built(built)
    offsets = [
        b.table(at)[0] for at in (H_ENTRIES, H_CHUNKS, H_REFS, H_XATTRS, H_BLOBS, H_PREFETCH, H_STRINGS)
    ]
    assert offsets[0] == HEADER_SIZE and offsets == sorted(offsets)
    assert b.table(H_ENTRIES)[1] == len(index.entries)
    assert b.table(H_STRINGS)[0] + b.table(H_STRINGS)[1] == len(b.data)
    at = b.entry("data/big.bin")
    big = index.entries["data/big.bin"]
    assert b.get("B", at + E_TYPE) == 1 and b.get("I", at + E_MODE) == 0o600
    assert (b.get("I", at + E_UID), b.get("I", at + E_UID + 4)) == (1000, 1001)
    assert b.get("q", at + E_MTIME) == big.mtime_ns and b.get("Q", at + E_SIZE) == big.size
    assert b.get("I", at + E_REFS + 4) == len(big.chunks) == -(-big.size // SMALL_CHUNK)
    assert "sha256:" + bytes(b.data[at + E_DIGEST : at + E_DIGEST + 32]).hex() == big.digest
    dev = b.entry("dev/null")
    assert (b.get("B", dev + E_TYPE), b.get("I", dev + E_DEV), b.get("I", dev + E_DEV + 4)) == (5, 1, 3)
    sym = b.entry("data/sym")
    assert b.string(b.get("I", sym + E_LINK), b.get("I", sym + E_LINK + 4)) == b"../etc/hosts"
    xat = b.entry("data/xattr")
    first, count = b.get("I", xat + E_XATTRS), b.get("I", xat + E_XATTRS + 4)
    rows = [
        struct.unpack_from("<IIII", b.data, b.table(H_XATTRS)[0] + 16 * i)
        for i in range(first, first + count)
    ]
    assert {b.string(*r[:2]).decode(): b.string(*r[2:]) for r in rows} == index.entries["data/xattr"].xattrs
    c = b.chunk(b.first_ref("data/big.bin"))
    first_chunk = big.chunks[0]
    assert "sha256:" + bytes(b.data[c : c + 32]).hex() == first_chunk.digest
    assert (b.get("I", c + C_BLOB), b.get("I", c + C_SIZE)) == (0, SMALL_CHUNK)
    assert (b.get("Q", c + C_OFFSET), b.get("I", c + C_CSIZE)) == (
        first_chunk.compressed_offset,
        first_chunk.compressed_size,
    )
    pf_off, pf_count = b.table(H_PREFETCH)
    assert pf_count == 1 and b.get("I", pf_off) == list(index.entries).index("etc/hosts")


# -- footer and stored-bootstrap errors ----------------------------------------------------------------


def _footer_blob(**fields: int) -> tuple[bytes, str]:
    built = sample()
    stored = len(built.blob) - FOOTER_SIZE - built.toc_offset
    args = {"offset": built.toc_offset, "length": stored, "uncompressed_length": len(built.toc_json)}
    args.update(fields)
    return built.blob[:-FOOTER_SIZE] + pack_footer(**args), built.toc_digest


def _refooter(mutate: Callable[[bytearray], None]) -> bytes:
    """The sample blob with its footer bytes edited and the CRC recomputed."""
    footer = bytearray(sample().blob[-FOOTER_SIZE:])
    mutate(footer)
    struct.pack_into("<I", footer, 60, zlib.crc32(bytes(footer[:60])))
    return sample().blob[:-FOOTER_SIZE] + bytes(footer)


def test_footer_errors() -> None:
    built = sample()
    blob, digest = built.blob, built.toc_digest
    between = len(blob) - FOOTER_SIZE - built.toc_offset + 1  # ≥ stored, < uncompressed
    assert between < len(built.toc_json)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: locate_bootstrap(blob[-10:], len(blob)), "got 10 bytes of the blob's tail, need 64"),
        (lambda: locate_bootstrap(b"\0" * 40, 40), "too short for the 64-byte footer"),
        (lambda: parse_nydus(blob[:-1], digest), "wrong magic"),  # truncated blob
        (lambda: parse_nydus(blob + b"\0" * 64, digest), "wrong magic"),  # extended blob
        (lambda: parse_nydus(b"x" + blob[1:-64] + b"NOTNYDUS" + blob[-56:], digest), "wrong magic"),
        (lambda: parse_nydus(blob[:-50] + b"\xff" + blob[-49:], digest), "checksum mismatch"),
        (lambda: parse_nydus(_refooter(lambda f: f.__setitem__(8, 2)), digest), "unsupported version 2"),
        (lambda: parse_nydus(_refooter(lambda f: f.__setitem__(10, 1)), digest), "unknown flags 0x1"),
        (lambda: parse_nydus(_refooter(lambda f: f.__setitem__(12, 2)), digest), "unknown compression 2"),
        (lambda: parse_nydus(_refooter(lambda f: f.__setitem__(45, 1)), digest), "reserved bytes"),
        (lambda: parse_nydus(*_footer_blob(offset=len(blob))), "runs past the footer"),
        (lambda: parse_nydus(*_footer_blob(offset=2**64 - 1)), "runs past the footer"),
        (lambda: parse_nydus(*_footer_blob(offset=0)), "ends before the footer"),
        (lambda: parse_nydus(*_footer_blob(offset=0, length=0)), "has length 0"),
        (lambda: parse_nydus(*_footer_blob(uncompressed_length=10)), "shorter than its 80-byte header"),
        (
            lambda: parse_nydus(blob, digest, max_bytes=500),
            "compressed bytes, larger than the 500-byte limit",
        ),
        (
            lambda: parse_nydus(blob, digest, max_bytes=between),
            f"bytes uncompressed, larger than the {between}-byte",
        ),
        (lambda: parse_nydus(*_footer_blob(uncompressed_length=len(built.toc_json) - 1)), "frame declares"),
        (lambda: parse_nydus(blob, "sha256:" + "0" * 64), "bootstrap digest mismatch"),
        (lambda: parse_nydus(blob, "md5:abc"), "malformed digest"),
    ]
    for call, message in cases:
        with pytest.raises(FormatError, match=message):
            call()


def test_parse_bootstrap_rechecks_location_and_length() -> None:
    built = sample()
    loc = locate_bootstrap(built.blob[-FOOTER_SIZE:], len(built.blob))
    raw = built.blob[loc.offset : loc.offset + loc.length]
    with pytest.raises(FormatError, match=r"got \d+ bytes, the footer says"):
        parse_bootstrap(raw[:-1], loc, blob_size=len(built.blob), expected_digest=built.toc_digest)
    bad = BootstrapLocation(loc.offset + 1, loc.length, loc.uncompressed_length)
    with pytest.raises(FormatError, match="runs past the footer"):
        parse_bootstrap(raw, bad, blob_size=len(built.blob), expected_digest=built.toc_digest)


def _stored_blob(stored: bytes, uncompressed: int) -> tuple[bytes, str]:
    head = sample().blob[: sample().toc_offset]
    blob = head + stored + pack_footer(len(head), len(stored), uncompressed)
    return blob, "sha256:" + hashlib.sha256(stored).hexdigest()


def test_stored_bootstrap_frame_errors() -> None:
    boot = sample().toc_json
    frame = zstandard.ZstdCompressor().compress(boot)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(boot)
    corrupt = frame[:20] + bytes(b ^ 0x55 for b in frame[20:40]) + frame[40:]
    cases = [
        (_stored_blob(b"\0" * 100, len(boot)), "not a zstd frame"),
        (_stored_blob(no_size, len(boot)), "does not declare its content size"),
        (_stored_blob(frame + b"junk", len(boot)), "corrupt zstd frame.*unused data"),
        (_stored_blob(corrupt, len(boot)), ""),  # no frame checksum: decodes to garbage, rejected later
        (_stored_blob(frame[:-5], len(boot)), "corrupt zstd frame"),
    ]
    for (blob, digest), message in cases:
        with pytest.raises(FormatError, match=message or None):
            parse_nydus(blob, digest)


def test_zstd_bomb_is_refused_before_decompression() -> None:
    # A valid bootstrap padded with 32 MiB of zeros compresses to ~1 KiB more.
    b = Boot(sample())
    b.add_string(bytes(32 << 20))
    blob, digest = b.blob()
    assert len(blob) < len(sample().blob) + 10_000
    with pytest.raises(FormatError, match=r"33\d+ bytes uncompressed, larger than the 1048576-byte limit"):
        parse_nydus(blob, digest, max_bytes=1 << 20)
    assert len(parse_nydus(blob, digest).entries) == len(parse_built(sample()).entries)  # else fine
    # A footer that understates the size cannot make the reader inflate more than it says.
    stored = blob[sample().toc_offset : -FOOTER_SIZE]
    lying, lying_digest = _stored_blob(stored, 1000)
    with pytest.raises(FormatError, match=r"frame declares 335\d+ bytes, the footer says 1000"):
        parse_nydus(lying, lying_digest, max_bytes=1 << 20)


# -- bootstrap validation (each edit is re-wrapped with a matching digest) --------------------------------


def _second_root(b: Boot) -> None:
    b.rename("etc", "")


BootEdit = Callable[[Boot], None]


def _ent(name: str, fmt: str, field: int, *values: object) -> BootEdit:
    return lambda b: b.put(fmt, b.entry(name) + field, *values)


def _chk(name: str, fmt: str, field: int, *values: object) -> BootEdit:
    return lambda b: b.put(fmt, b.chunk(b.first_ref(name)) + field, *values)


def _hdr(fmt: str, at: int, *values: object) -> BootEdit:
    return lambda b: b.put(fmt, at, *values)


def _truncate_strings(b: Boot) -> None:
    b.put("I", H_STRINGS + 4, b.get("I", H_STRINGS + 4) - 3)
    del b.data[-3:]


def _swap_to_later(b: Boot) -> None:
    # data/link → a regular file that comes after it in the entry table
    b.relink("data/link", "data/xattr")


def _second_blob_index(b: Boot) -> None:
    b.put("I", b.chunk(0) + C_BLOB, 5)


def _too_many_blobs(b: Boot) -> None:
    off, _ = b.add_string(bytes(300 * BLOB_RECORD_SIZE))
    b.put("II", H_BLOBS, b.get("I", H_STRINGS) + off, 300)


def _too_many_refs(b: Boot) -> None:
    off, _ = b.add_string(bytes(4 * ((1 << 20) + 1)))  # a table that fits in the bootstrap
    b.put("II", H_REFS, b.get("I", H_STRINGS) + off, (1 << 20) + 1)


def _prefetch_dir(b: Boot) -> None:
    b.put("I", b.table(H_PREFETCH)[0], 0)


BOOTSTRAP_CASES: list[tuple[str, BootEdit, str]] = [
    ("magic", _hdr("8s", 0, b"LZNYXXXX"), "bootstrap: wrong magic"),
    ("version", _hdr("H", H_VERSION, 7), "bootstrap: unsupported version 7"),
    ("flags", _hdr("H", H_FLAGS, 1), "unknown flags"),
    ("header size", _hdr("I", H_HEADER_SIZE, 96), "header size 96, want 80"),
    ("chunk size not 2^n", _hdr("I", H_CHUNK_SIZE, 5000), "chunk size 5000 is not a power of two"),
    ("chunk size too big", _hdr("I", H_CHUNK_SIZE, 32 << 20), "chunk size 33554432 is not a power"),
    ("chunk size too small", _hdr("I", H_CHUNK_SIZE, 2048), "chunk size 2048 is not a power"),
    ("absurd entry count", _hdr("I", H_ENTRIES + 4, 2**32 - 1), r"entry table \(4294967295 records of 104"),
    ("absurd chunk count", _hdr("I", H_CHUNKS + 4, 10**8), r"chunk table \(100000000 records"),
    ("table past end", _hdr("I", H_REFS, 2**32 - 1), r"chunk-ref table .* is outside the bootstrap"),
    ("table in header", _hdr("I", H_XATTRS, 8), r"xattr table .* at offset 8\) is outside"),
    ("string table past end", _truncate_strings, "outside the string table"),
    ("no entries", _hdr("I", H_ENTRIES + 4, 0), "no entries"),
    ("root not first", lambda b: b.put("II", b.table(H_ENTRIES)[0], *b.add_string(b"x")), "must come first"),
    ("root not a dir", _ent("", "B", E_TYPE, 3), "layer root must be a directory"),
    ("empty name", _second_root, "entry '': name is empty or not normalized"),
    ("duplicate path", lambda b: b.rename("etc/empty", "etc/hosts"), "'etc/hosts': duplicate entry"),
    ("dotdot", lambda b: b.rename("etc/empty", "etc/../../x"), r"'\.\.' in the name escapes"),
    ("absolute", lambda b: b.rename("etc/empty", "/etc/x"), "absolute name"),
    ("dot", lambda b: b.rename("etc/empty", "etc/./x"), "not normalized"),
    ("double slash", lambda b: b.rename("etc/empty", "etc//x"), "not normalized"),
    ("trailing slash", lambda b: b.rename("etc/empty", "etc/x/"), "not normalized"),
    ("nul", lambda b: b.rename("etc/empty", "etc/a\0b"), "NUL"),
    ("bad utf-8", lambda b: b.rename("etc/empty", b"etc/\xff"), "not valid UTF-8"),
    ("parent missing", lambda b: b.rename("etc/empty", "nowhere/x"), "parent directory is missing or comes"),
    ("parent is a file", lambda b: b.rename("etc/empty", "etc/hosts/x"), "parent 'etc/hosts' is a reg"),
    ("hardlink missing", lambda b: b.relink("data/link", "nope"), r"hardlink to 'nope', which is missing"),
    ("hardlink later", _swap_to_later, r"hardlink to 'data/xattr', which is missing or later"),
    ("hardlink to dir", lambda b: b.relink("data/link", "etc"), "which is a dir, not an earlier file"),
    ("hardlink to link", lambda b: b.relink("data/link2", "data/link"), "which is a hardlink"),
    ("symlink empty", _ent("data/sym", "II", E_LINK, 0, 0), "symlink target is empty"),
    ("link on a file", _ent("etc/hosts", "II", E_LINK, 0, 3), "a reg with a link target"),
    ("unknown type", _ent("etc/hosts", "B", E_TYPE, 9), "unknown entry type 9"),
    ("entry flags", _ent("etc/hosts", "B", E_TYPE + 1, 1), "unknown flags"),
    ("mode type bits", _ent("etc/hosts", "I", E_MODE, 0o100644), "mode 0o100644 has bits beyond"),
    ("absurd size", _ent("data/big.bin", "Q", E_SIZE, 2**63), "size 9223372036854775808 overflows"),
    ("big size", _ent("data/big.bin", "Q", E_SIZE, 2**40), "74 chunks for 1099511627776 bytes, want"),
    ("dir with size", _ent("etc", "Q", E_SIZE, 1), "a dir with a size or content digest"),
    ("fifo with dev", _ent("dev/fifo", "I", E_DEV, 1), "a fifo with device numbers"),
    ("dir with chunks", _ent("etc", "I", E_REFS + 4, 1), "a dir with chunks"),
    ("refs outside", _ent("data/big.bin", "I", E_REFS, 2**31), "chunk refs .* are outside the table"),
    ("xattrs outside", _ent("data/xattr", "I", E_XATTRS + 4, 99), "outside the xattr table"),
    ("size short", _ent("data/big.bin", "Q", E_SIZE, 300_000 - 1), "has 992 bytes; chunks must tile"),
    ("chunk size lie", _chk("data/big.bin", "I", C_SIZE, 4000), "chunks must tile the file at 4096-byte"),
    ("chunk bigger", _chk("data/big.bin", "I", C_SIZE, SMALL_CHUNK + 1), "has 4097 bytes"),
    ("chunk empty", _chk("data/big.bin", "I", C_SIZE, 0), "has 0 bytes"),
    ("chunk frame huge", _chk("data/big.bin", "I", C_CSIZE, 1 << 20), "compressed size 1048576 for 4096"),
    ("chunk past data", _chk("data/big.bin", "Q", C_OFFSET, 300_000), "is outside the data region"),
    ("chunk offset overflow", _chk("data/big.bin", "Q", C_OFFSET, 2**64 - 1), "outside the data region"),
    ("chunk flags", _chk("data/big.bin", "I", C_FLAGS, 2), "unknown flags 0x2"),
    ("chunk blob index", _second_blob_index, "refers to blob 5, the blob table has 0"),
    ("chunk ref range", lambda b: b.put("I", b.table(H_REFS)[0], 10**6), "chunk ref 1000000 is out of range"),
    ("too many blobs", _too_many_blobs, "300 records in the blob table, more than 256"),
    ("too many refs", _too_many_refs, r"1048577 records in the chunk-ref table, more than 1048576"),
    ("prefetch range", lambda b: b.put("I", b.table(H_PREFETCH)[0], 10**6), "entry 1000000 is out of range"),
    ("prefetch a dir", _prefetch_dir, "prefetch entry '' is a dir, not a file"),
    ("no digest", _ent("data/big.bin", "32s", E_DIGEST, bytes(32)), "no content digest for a file of"),
    ("other digest", _ent("etc/hosts", "32s", E_DIGEST, b"\1" * 32), "differs from the one its content"),
    ("empty digest", _ent("etc/empty", "32s", E_DIGEST, b"\1" * 32), "differs from the one its content"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "message"), [c[1:] for c in BOOTSTRAP_CASES], ids=[c[0] for c in BOOTSTRAP_CASES]
)
def test_bootstrap_validation(edit: BootEdit, message: str) -> None:
    b = Boot(sample())
    b.parse()  # unedited, it parses
    edit(b)
    with pytest.raises(FormatError, match=message):
        b.parse()


def _blob_table_edit(mutate: Callable[[Boot, int], None], message: str) -> None:
    upper = two_layers()[1]
    b = Boot(upper)
    off, count = b.table(H_BLOBS)
    assert count == 1
    mutate(b, off)
    with pytest.raises(FormatError, match=message):
        b.parse()


def test_blob_table_validation() -> None:
    lower, upper = two_layers()
    index = parse_built(upper)
    assert index.blobs == {lower.digest: len(lower.blob)}
    _blob_table_edit(lambda b, off: b.put("Q", off + 32, 0), r"blob sha256:\w+ has size 0")
    _blob_table_edit(lambda b, off: b.put("Q", off + 32, 2**63), "has size 9223372036854775808")
    _blob_table_edit(lambda b, off: b.put("Q", off + 32, 100), "is outside blob sha256:")
    _blob_table_edit(lambda b, off: b.put("32s", off, bytes(32)), "is zero or a duplicate")

    def duplicate(b: Boot, off: int) -> None:
        row = bytes(b.data[off : off + BLOB_RECORD_SIZE])
        s_off, _ = b.add_string(row + row)
        b.put("II", H_BLOBS, b.get("I", H_STRINGS) + s_off, 2)

    _blob_table_edit(duplicate, "is zero or a duplicate")


def test_unused_bytes_after_the_tables_are_accepted() -> None:
    # Readers go by offsets and counts, so extra bytes after the tables are not an error.
    b = Boot(sample())
    b.add_string(b"unused")
    assert b.parse().entries.keys() == parse_built(sample()).entries.keys()


# -- fuzzing -----------------------------------------------------------------------------------------


@FUZZ
@given(st.data())
def test_fuzz_bootstrap_bytes(data: st.DataObject) -> None:
    """Flipped, truncated or extended bootstraps (re-wrapped so the digest matches) fail cleanly."""
    built = sample() if data.draw(st.booleans()) else two_layers()[1]
    boot = bytearray(built.toc_json)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(boot) - 1))
        boot[at] ^= data.draw(st.integers(1, 255))
    action = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if action == "truncate":
        del boot[data.draw(st.integers(0, len(boot) - 1)) :]
    elif action == "extend":
        boot += data.draw(st.binary(min_size=1, max_size=64))
    blob, digest = wrap(built.blob[: built.toc_offset], bytes(boot))
    with contextlib.suppress(FormatError):
        parse_nydus(blob, digest)


@FUZZ
@given(st.data())
def test_fuzz_blob_tail(data: st.DataObject) -> None:
    """Byte flips, cuts and additions anywhere in the stored bootstrap and footer."""
    built = sample()
    tail_start = built.toc_offset
    blob = bytearray(built.blob)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(tail_start, len(blob) - 1))
        blob[at] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, 80))
    extra = data.draw(st.binary(max_size=80))
    mangled = bytes(blob[: len(blob) - cut]) + extra
    with contextlib.suppress(FormatError):
        parse_nydus(mangled, built.toc_digest)


@FUZZ
@given(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 10**7),
    st.binary(max_size=100),
)
def test_fuzz_footer_fields(offset: int, length: int, ulength: int, blob_size: int, prefix: bytes) -> None:
    tail = prefix + pack_footer(offset, length, ulength)
    with contextlib.suppress(FormatError):
        loc = locate_bootstrap(tail, max(blob_size, len(tail)))
        assert loc.offset + loc.length + FOOTER_SIZE == max(blob_size, len(tail))


@FUZZ
@given(st.binary(max_size=400), st.integers(0, 2**64 - 1))
def test_fuzz_raw_bootstrap(raw: bytes, ulength: int) -> None:
    loc = BootstrapLocation(1000, len(raw), ulength)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    with contextlib.suppress(FormatError):
        parse_bootstrap(raw, loc, blob_size=1000 + len(raw) + FOOTER_SIZE, expected_digest=digest)


# -- scale --------------------------------------------------------------------------------------------


def test_20000_file_layer_parses_quickly() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(200):
            ti = tarfile.TarInfo(f"usr/lib/pkg{d:03d}")
            ti.type = tarfile.DIRTYPE
            tf.addfile(ti)
            for f in range(100):
                data = b"%d/%d\n" % (d, f) * (f + 1)
                ti = tarfile.TarInfo(f"usr/lib/pkg{d:03d}/file{f:03d}.py")
                ti.size, ti.mtime = len(data), 1577836800
                tf.addfile(ti, io.BytesIO(data))
    t0 = time.perf_counter()
    built = build_nydus(buf.getvalue())
    t1 = time.perf_counter()
    index = parse_built(built)
    t2 = time.perf_counter()
    assert len(index.entries) == 1 + 2 + 200 + 20_000
    stored = len(built.blob) - built.toc_offset
    print(
        f"\n20k-file layer: bootstrap {len(built.toc_json)} B ({stored} B stored); "
        f"build {t1 - t0:.2f}s, locate+parse {t2 - t1:.3f}s"
    )


# -- amplification ------------------------------------------------------------------------------------

_HOSTILE = """
from tests.unit.formats.hostile import nydus_bootstrap
from snapshotter.formats.nydus import locate_bootstrap, parse_bootstrap
blob, digest = nydus_bootstrap({args})
"""
_PARSE = """
loc = locate_bootstrap(blob[-64:], len(blob))
raw = blob[loc.offset : loc.offset + loc.length]
index = parse_bootstrap(raw, loc, blob_size=len(blob), expected_digest=digest)
result = sum(len(e.chunks) + len(e.xattrs) for e in index.entries.values())
"""


@pytest.mark.parametrize(
    "args",
    ["files=3000, refs_per_file=1024", "files=3000, refs_per_file=1, xattrs=1000, xattrs_per_file=1000"],
    ids=["chunk-refs", "xattrs"],
)
def test_overlapping_runs_cannot_amplify_memory(args: str) -> None:
    """3000 files sharing one run of 1024 chunk refs (or 1000 xattrs) would be 3 M objects
    (~0.5 GiB) from a bootstrap of a few KB; the totals are checked before anything is built."""
    measured = peak_growth(_HOSTILE.format(args=args), _PARSE)
    assert measured.error is not None, f"parsed into {measured.result} objects"
    assert measured.error[0] == "FormatError"
    assert "more than 1048576" in measured.error[1]
    assert measured.growth < 32 << 20, f"{measured.growth_mib:.0f} MiB"


def test_overlapping_runs_are_allowed_within_the_total(monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/FORMAT.md 5.5: runs may overlap; only their total is bounded.
    monkeypatch.setattr(nydus, "MAX_RUN_RECORDS", 12)
    index = parse_nydus(*nydus_bootstrap(files=3, refs_per_file=4, xattrs=2, xattrs_per_file=2))
    assert [len(e.chunks) for e in index.entries.values()] == [0, 4, 4, 4]
    with pytest.raises(FormatError, match=r"16 chunk refs in all, more than 12"):
        parse_nydus(*nydus_bootstrap(files=4, refs_per_file=4))
    with pytest.raises(FormatError, match=r"14 xattrs in all, more than 12"):
        parse_nydus(*nydus_bootstrap(files=7, refs_per_file=1, xattrs=2, xattrs_per_file=2))
