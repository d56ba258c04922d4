"""lazysnap's Nydus-like layer format ("nydus"): constants, footer, bootstrap decoding → ``LayerIndex``.

A layer blob is ``[zstd chunk frames][zstd bootstrap][64-byte footer]``; docs/FORMAT.md is the
byte-level specification and gives the reasons. The bootstrap is a binary index of the layer's
tar entries and of content-addressed chunks that may live in this blob or in a lower layer's
blob of the same image. Everything here is pure and bounded: any input bytes either decode to a
validated index or raise ``FormatError`` naming the problem.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import zstandard

from snapshotter.formats.index import (
    DEVICE_TYPES,
    EMPTY_DIGEST,
    MODE_BITS,
    NO_XATTRS,
    TYPES_BY_CODE,
    Chunk,
    Compression,
    Entry,
    EntryType,
    FormatError,
    LayerIndex,
)
from snapshotter.formats.toc import INT64_MAX, check_digest, parent_name
from snapshotter.formats.zstdchunked import ZSTD_FRAME_MAGIC

FORMAT = "nydus"
VERSION = 1
MEDIA_TYPE = "application/vnd.oci.image.layer.lazysnap.nydus.v1"
# In the manifest (the source of truth the daemon reads after resolving the image) ...
BOOTSTRAP_DIGEST_ANNOTATION = "dev.lazysnap.nydus.bootstrap.digest"
# ... and copied under containerd.io/snapshot/, the only prefix containerd forwards to the
# snapshotter as Prepare labels: the snapshotter can tell a nydus layer from its labels alone.
BOOTSTRAP_DIGEST_LABEL = "containerd.io/snapshot/lazysnap/nydus.bootstrap.digest"
IMAGE_REQUIRES_ANNOTATION = "dev.lazysnap.image.requires"
IMAGE_REQUIRES = (
    "the lazysnap containerd snapshotter: layers are in lazysnap's Nydus-like format "
    f"({MEDIA_TYPE}), which containerd cannot unpack by itself; convert the source image "
    "to eStargz for other runtimes"
)

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 16 << 20
DEFAULT_MAX_BOOTSTRAP_BYTES = 64 << 20
MAX_BLOBS = 256  # other blobs one layer may refer to; images have at most ~128 layers
# Records per table (entries, chunks, chunk refs, xattrs, prefetch). A 4-byte chunk ref becomes
# a ~200-byte Chunk object, so the byte limit alone would let a 64 MiB bootstrap cost gigabytes.
# 2^20 chunk refs is 1 TiB of files at the default chunk size.
MAX_RECORDS = 1 << 20
# Chunk refs (and xattrs) of all entries together: runs may overlap (docs/FORMAT.md 5.5), so E
# entries naming one run of N refs would otherwise build E x N Chunk objects from a bootstrap of
# a few KB. With this total a layer costs at most what one without overlaps can.
MAX_RUN_RECORDS = MAX_RECORDS
COMPRESSION_ZSTD = 1

FOOTER_MAGIC = b"LZNYFOOT"
BOOTSTRAP_MAGIC = b"LZNYBOOT"
# magic, version, flags, compression, bootstrap offset, compressed len, uncompressed len,
# 20 reserved bytes, CRC-32 of bytes [0, 60).
FOOTER = struct.Struct("<8sHHIQQQ20sI")
FOOTER_SIZE = FOOTER.size  # 64
_FOOTER_CRC_AT = FOOTER_SIZE - 4
# magic, version, flags, header size, chunk size, reserved, then (offset, count) of the entry,
# chunk, chunk-ref, xattr, blob and prefetch tables and (offset, length) of the string table.
HEADER = struct.Struct("<8sHHIII14I")
HEADER_SIZE = HEADER.size  # 80
# name (off, len), link (off, len), type, flags, reserved, mode, uid, gid, mtime_ns, size,
# dev major, dev minor, chunk refs (first, count), xattrs (first, count), content sha256.
ENTRY = struct.Struct("<IIIIBBHIIIqQIIIIII32s")
ENTRY_RECORD_SIZE = ENTRY.size  # 104
# sha256 of the uncompressed chunk, blob index, uncompressed size, compressed offset,
# compressed size, flags.
CHUNK = struct.Struct("<32sIIQII")
CHUNK_RECORD_SIZE = CHUNK.size  # 56
XATTR = struct.Struct("<IIII")  # key (off, len), value (off, len)
XATTR_RECORD_SIZE = XATTR.size  # 16
BLOB = struct.Struct("<32sQ")  # sha256 of the other blob, its size
BLOB_RECORD_SIZE = BLOB.size  # 40
U32 = struct.Struct("<I")  # chunk-ref and prefetch records
# The header's table directory, in order: names (for messages) and record-count limits (the
# string table's second field is a byte length, bounded by the bootstrap's size).
TABLE_NAMES = ("entry", "chunk", "chunk-ref", "xattr", "blob", "prefetch", "string")
TABLE_LIMITS = (MAX_RECORDS, MAX_RECORDS, MAX_RECORDS, MAX_RECORDS, MAX_BLOBS, MAX_RECORDS, None)
_T_ENTRIES, _T_CHUNKS, _T_REFS, _T_XATTRS, _T_BLOBS, _T_PREFETCH, _T_STRINGS = range(7)

_ZERO_DIGEST = bytes(32)
# A zstd frame is at most its content plus 1/128 and a few headers (ZSTD_compressBound is
# lower); anything above is not a frame we wrote and would make a reader fetch too much.
_FRAME_SLACK = 1024


def frame_bound(size: int) -> int:
    """The largest compressed size accepted for a chunk of ``size`` uncompressed bytes."""
    return size + (size >> 7) + _FRAME_SLACK


def check_chunk_size(chunk_size: int) -> None:
    """FormatError unless ``chunk_size`` is a power of two in [4 KiB, 16 MiB]."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise FormatError(
            f"chunk size {chunk_size} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        )


# -- OCI packaging ----------------------------------------------------------------------------


def manifest_annotations() -> dict[str, str]:
    """Annotations for the image manifest: who can run this image."""
    return {IMAGE_REQUIRES_ANNOTATION: IMAGE_REQUIRES}


def is_nydus_layer(media_type: str, annotations: Mapping[str, str]) -> bool:
    """True for a layer in this format: by its media type, or (media type unknown, as in a
    Prepare that only has labels) by a bootstrap digest annotation or label."""
    if media_type:
        return media_type == MEDIA_TYPE
    return bool(annotations.get(BOOTSTRAP_DIGEST_ANNOTATION) or annotations.get(BOOTSTRAP_DIGEST_LABEL))


def bootstrap_digest(annotations: Mapping[str, str]) -> str | None:
    """The bootstrap digest to pass to ``parse_bootstrap`` (manifest annotation, else the label);
    FormatError when both are present and disagree."""
    annotated = annotations.get(BOOTSTRAP_DIGEST_ANNOTATION)
    labelled = annotations.get(BOOTSTRAP_DIGEST_LABEL)
    if annotated and labelled and annotated != labelled:
        raise FormatError(f"bootstrap digest annotation {annotated!r} and label {labelled!r} disagree")
    return annotated or labelled or None


# -- footer -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapLocation:
    """The stored (zstd-compressed) bootstrap: blob bytes [offset, offset + length)."""

    offset: int
    length: int
    uncompressed_length: int


def pack_footer(offset: int, length: int, uncompressed_length: int) -> bytes:
    """The 64-byte footer for a bootstrap stored at blob bytes [offset, offset + length)."""
    body = FOOTER.pack(
        FOOTER_MAGIC, VERSION, 0, COMPRESSION_ZSTD, offset, length, uncompressed_length, bytes(20), 0
    )
    return body[:_FOOTER_CRC_AT] + U32.pack(zlib.crc32(body[:_FOOTER_CRC_AT]))


def _check_location(loc: BootstrapLocation, blob_size: int, max_bytes: int) -> None:
    footer_start = blob_size - FOOTER_SIZE
    if loc.length <= 0 or loc.offset < 0:
        raise FormatError(f"footer: bootstrap at {loc.offset} has length {loc.length}")
    if loc.offset + loc.length != footer_start:
        where = "runs past" if loc.offset + loc.length > footer_start else "ends before"
        raise FormatError(
            f"footer: bootstrap at {loc.offset} (+{loc.length}) {where} the footer at {footer_start} "
            f"(blob size {blob_size}); it must end where the footer starts"
        )
    if loc.length > max_bytes:
        raise FormatError(
            f"bootstrap is {loc.length} compressed bytes, larger than the {max_bytes}-byte limit"
        )
    if loc.uncompressed_length > max_bytes:
        raise FormatError(
            f"bootstrap is {loc.uncompressed_length} bytes uncompressed, "
            f"larger than the {max_bytes}-byte limit"
        )
    if loc.uncompressed_length < HEADER_SIZE:
        raise FormatError(
            f"bootstrap is {loc.uncompressed_length} bytes uncompressed, "
            f"shorter than its {HEADER_SIZE}-byte header"
        )


def locate_bootstrap(
    tail: bytes, blob_size: int, *, max_bytes: int = DEFAULT_MAX_BOOTSTRAP_BYTES
) -> BootstrapLocation:
    """Where the bootstrap is, from the blob's last ``FOOTER_SIZE`` (or more) bytes."""
    if blob_size < FOOTER_SIZE:
        raise FormatError(f"blob of {blob_size} bytes is too short for the {FOOTER_SIZE}-byte footer")
    if len(tail) < FOOTER_SIZE:
        raise FormatError(f"footer: got {len(tail)} bytes of the blob's tail, need {FOOTER_SIZE}")
    if len(tail) > blob_size:
        raise FormatError(f"tail of {len(tail)} bytes is longer than the blob ({blob_size} bytes)")
    footer = bytes(tail[-FOOTER_SIZE:])
    magic, version, flags, compression, offset, length, ulength, reserved, crc = FOOTER.unpack(footer)
    if magic != FOOTER_MAGIC:
        raise FormatError(f"footer: wrong magic {magic!r} (want {FOOTER_MAGIC!r}); not a nydus blob")
    # Magic and version stay at these offsets in every version; the rest may change with it.
    if version != VERSION:
        raise FormatError(f"footer: unsupported version {version} (want {VERSION})")
    if crc != zlib.crc32(footer[:_FOOTER_CRC_AT]):
        raise FormatError("footer: checksum mismatch (corrupt footer)")
    if flags:
        raise FormatError(f"footer: unknown flags {flags:#x}")
    if compression != COMPRESSION_ZSTD:
        raise FormatError(f"footer: unknown compression {compression} (want {COMPRESSION_ZSTD}, zstd)")
    if reserved != bytes(20):
        raise FormatError("footer: reserved bytes are not zero")
    location = BootstrapLocation(offset, length, ulength)
    _check_location(location, blob_size, max_bytes)
    return location


# -- bootstrap --------------------------------------------------------------------------------


def _decompress(raw: bytes, declared: int) -> bytes:
    """The one zstd frame of the bootstrap, exactly ``declared`` bytes (already ≤ max_bytes)."""
    if raw[:4] != ZSTD_FRAME_MAGIC:
        raise FormatError("bootstrap is not a zstd frame (wrong magic)")
    try:
        # The frame must state its content size: then decompress() allocates just that and
        # fails if the frame would produce more, so a bomb costs at most ``declared`` bytes.
        content_size = zstandard.get_frame_parameters(raw).content_size
        if content_size != declared:
            raise FormatError(
                f"bootstrap frame declares {content_size} bytes, the footer says {declared}"
                if content_size != zstandard.CONTENTSIZE_UNKNOWN
                else "bootstrap frame does not declare its content size"
            )
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
        data = dctx.decompress(raw, max_output_size=declared, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"bootstrap: corrupt zstd frame: {exc}") from exc
    if len(data) != declared:
        raise FormatError(f"bootstrap decompressed to {len(data)} bytes, the footer says {declared}")
    return data


def parse_bootstrap(
    raw: bytes,
    location: BootstrapLocation,
    *,
    blob_size: int,
    expected_digest: str,
    max_bytes: int = DEFAULT_MAX_BOOTSTRAP_BYTES,
) -> LayerIndex:
    """Verify, decompress and validate the bootstrap; ``raw`` = blob[offset : offset + length].

    ``expected_digest`` is the layer's ``BOOTSTRAP_DIGEST_ANNOTATION``: the sha256 of ``raw``,
    checked before a byte is decompressed.
    """
    _check_location(location, blob_size, max_bytes)
    if len(raw) != location.length:
        raise FormatError(f"bootstrap: got {len(raw)} bytes, the footer says {location.length}")
    check_digest(expected_digest, "expected bootstrap digest")
    got = "sha256:" + hashlib.sha256(raw).hexdigest()
    if got != expected_digest:
        raise FormatError(f"bootstrap digest mismatch: stored bootstrap is {got}, expected {expected_digest}")
    data = _decompress(bytes(raw), location.uncompressed_length)
    return _Decoder(data, data_end=location.offset).index(blob_size)


def _content_digest(entry: Entry, raw: bytes) -> str:
    """A file's sha256. The field is zero when it is implied (it is most of a small file's
    record, and incompressible): sha256("") for an empty file, the chunk's for a one-chunk file."""
    only = entry.chunks[0].digest if len(entry.chunks) == 1 else None
    if raw == _ZERO_DIGEST:
        if entry.size == 0:
            return EMPTY_DIGEST
        if only is None:
            raise FormatError(f"entry {entry.name!r}: no content digest for a file of several chunks")
        return only
    digest = "sha256:" + raw.hex()
    implied = EMPTY_DIGEST if entry.size == 0 else only
    if implied is not None and digest != implied:
        raise FormatError(f"entry {entry.name!r}: content digest differs from the one its content implies")
    return digest


@dataclass(frozen=True)
class _ChunkRecord:
    digest: str
    blob: str  # "" = this layer's blob
    size: int
    offset: int
    compressed_size: int


_E_REF_COUNT, _E_XATTR_COUNT = 15, 17  # fields of an ENTRY record


def _check_run_totals(records: list[tuple[Any, ...]]) -> None:
    """FormatError when the entries' chunk-ref or xattr runs add up to more than
    ``MAX_RUN_RECORDS``: checked before a single entry is built."""
    for field_at, what in ((_E_REF_COUNT, "chunk refs"), (_E_XATTR_COUNT, "xattrs")):
        total = sum(rec[field_at] for rec in records)
        if total > MAX_RUN_RECORDS:
            raise FormatError(
                f"bootstrap: the entries name {total} {what} in all, more than {MAX_RUN_RECORDS}"
            )


class _Decoder:
    """Decodes one uncompressed bootstrap, validating every field it reads."""

    def __init__(self, data: bytes, *, data_end: int) -> None:
        self.data = data
        self.data_end = data_end  # own-blob frames must lie in [0, data_end)
        (
            magic,
            version,
            flags,
            header_size,
            self.chunk_size,
            reserved,
            *tables,
        ) = HEADER.unpack_from(data)
        if magic != BOOTSTRAP_MAGIC:
            raise FormatError(f"bootstrap: wrong magic {magic!r} (want {BOOTSTRAP_MAGIC!r})")
        if version != VERSION:
            raise FormatError(f"bootstrap: unsupported version {version} (want {VERSION})")
        if flags or reserved:
            raise FormatError(f"bootstrap: unknown flags {flags:#x} or non-zero reserved field")
        if header_size != HEADER_SIZE:
            raise FormatError(f"bootstrap: header size {header_size}, want {HEADER_SIZE}")
        try:
            check_chunk_size(self.chunk_size)
        except FormatError as exc:
            raise FormatError(f"bootstrap: {exc}") from None
        self.tables = tables
        self.names: list[str] = []
        self.entries: dict[str, Entry] = {}

    def _table(self, slot: int, record: int) -> tuple[int, int]:
        """(offset, count) of table ``slot``, checked to lie inside the bootstrap and to be of
        a sane size before any record is read: an absurd count fails here, not in an allocation."""
        offset, count = self.tables[2 * slot], self.tables[2 * slot + 1]
        what, limit = TABLE_NAMES[slot], TABLE_LIMITS[slot]
        if offset < HEADER_SIZE or offset + count * record > len(self.data):
            raise FormatError(
                f"bootstrap: {what} table ({count} records of {record} bytes at offset {offset}) "
                f"is outside the bootstrap ({len(self.data)} bytes)"
            )
        if limit is not None and count > limit:
            raise FormatError(f"bootstrap: {count} records in the {what} table, more than {limit}")
        return offset, count

    def _records(self, slot: int, fmt: struct.Struct) -> list[tuple[Any, ...]]:
        offset, count = self._table(slot, fmt.size)
        view = memoryview(self.data)[offset : offset + count * fmt.size]
        return list(fmt.iter_unpack(view))

    def _u32s(self, slot: int) -> tuple[int, ...]:
        offset, count = self._table(slot, U32.size)
        return struct.unpack_from(f"<{count}I", self.data, offset)

    # -- strings --------------------------------------------------------------------------

    def _strings(self) -> None:
        self.str_offset, self.str_length = self._table(_T_STRINGS, 1)

    def _bytes(self, offset: int, length: int, what: str) -> bytes:
        if offset + length > self.str_length:
            raise FormatError(
                f"bootstrap: {what} at string-table offset {offset} (+{length}) is outside the "
                f"string table ({self.str_length} bytes)"
            )
        start = self.str_offset + offset
        return self.data[start : start + length]

    def _str(self, offset: int, length: int, what: str) -> str:
        try:
            return self._bytes(offset, length, what).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"bootstrap: {what} is not valid UTF-8") from None

    # -- tables ---------------------------------------------------------------------------

    def _blobs(self) -> dict[int, tuple[str, int]]:
        records = self._records(_T_BLOBS, BLOB)
        blobs: dict[int, tuple[str, int]] = {}
        seen: set[str] = set()
        for i, (raw_digest, size) in enumerate(records, start=1):
            digest = "sha256:" + raw_digest.hex()
            if raw_digest == _ZERO_DIGEST or digest in seen:
                raise FormatError(f"bootstrap: blob table entry {i} ({digest}) is zero or a duplicate")
            if not 0 < size <= INT64_MAX:
                raise FormatError(f"bootstrap: blob {digest} has size {size}")
            seen.add(digest)
            blobs[i] = (digest, size)
        return blobs

    def _chunks(self, blobs: Mapping[int, tuple[str, int]]) -> list[_ChunkRecord]:
        out: list[_ChunkRecord] = []
        for i, rec in enumerate(self._records(_T_CHUNKS, CHUNK)):
            raw_digest, blob_index, size, offset, csize, flags = rec
            if flags:
                raise FormatError(f"bootstrap: chunk {i} has unknown flags {flags:#x}")
            if not 0 < size <= self.chunk_size:
                raise FormatError(f"bootstrap: chunk {i} has {size} bytes (chunk size {self.chunk_size})")
            if not 0 < csize <= frame_bound(size):
                raise FormatError(f"bootstrap: chunk {i} has compressed size {csize} for {size} bytes")
            if blob_index == 0:
                blob, limit, where = "", self.data_end, "the data region"
            elif blob_index in blobs:
                blob, limit = blobs[blob_index]
                where = f"blob {blob}"
            else:
                raise FormatError(
                    f"bootstrap: chunk {i} refers to blob {blob_index}, the blob table has {len(blobs)}"
                )
            if offset + csize > limit:
                raise FormatError(
                    f"bootstrap: chunk {i} at {offset} (+{csize}) is outside {where} (ends at {limit})"
                )
            out.append(_ChunkRecord("sha256:" + raw_digest.hex(), blob, size, offset, csize))
        return out

    def _refs(self, chunk_count: int) -> tuple[int, ...]:
        refs = self._u32s(_T_REFS)
        if refs and max(refs) >= chunk_count:
            raise FormatError(f"bootstrap: chunk ref {max(refs)} is out of range ({chunk_count} chunks)")
        return refs

    def _xattr_table(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        for i, (koff, klen, voff, vlen) in enumerate(self._records(_T_XATTRS, XATTR)):
            out.append(
                (self._bytes(koff, klen, f"xattr {i} key"), self._bytes(voff, vlen, f"xattr {i} value"))
            )
        return out

    # -- entries --------------------------------------------------------------------------

    def _entries(self, chunks: list[_ChunkRecord], refs: tuple[int, ...]) -> None:
        xattrs = self._xattr_table()
        records = self._records(_T_ENTRIES, ENTRY)
        if not records:
            raise FormatError("bootstrap: no entries (the root directory must be entry 0)")
        _check_run_totals(records)
        for i, rec in enumerate(records):
            self._entry(i, rec, chunks, refs, xattrs)

    def _name(self, i: int, offset: int, length: int) -> str:
        name = self._str(offset, length, f"entry {i} name")
        if i == 0:
            if name:
                raise FormatError(f"bootstrap: entry 0 is {name!r}; the root directory ('') must come first")
            return name
        if "\x00" in name:
            raise FormatError(f"entry {name!r}: name contains a NUL byte")
        parts = name.split("/")
        if ".." in parts:
            raise FormatError(f"entry {name!r}: '..' in the name escapes the layer root")
        if name.startswith("/"):
            raise FormatError(f"entry {name!r}: absolute name")
        if "" in parts or "." in parts:
            raise FormatError(f"entry {name!r}: name is empty or not normalized")
        if name in self.entries:
            raise FormatError(f"entry {name!r}: duplicate entry in the bootstrap")
        # Parents are looked up by name among the entries decoded so far, so a parent always
        # precedes its children and the tree cannot have cycles.
        parent = self.entries.get(parent_name(name))
        if parent is None:
            raise FormatError(f"entry {name!r}: parent directory is missing or comes later")
        if parent.type is not EntryType.DIR:
            raise FormatError(f"entry {name!r}: parent {parent.name!r} is a {parent.type.value}")
        return name

    def _entry(
        self,
        i: int,
        rec: tuple[Any, ...],
        chunks: list[_ChunkRecord],
        refs: tuple[int, ...],
        xattrs: list[tuple[bytes, bytes]],
    ) -> None:
        (noff, nlen, loff, llen, code, flags, reserved, mode, uid, gid, mtime, size,
         major, minor, rfirst, rcount, xfirst, xcount, raw_digest) = rec  # fmt: skip
        name = self._name(i, noff, nlen)
        typ = TYPES_BY_CODE.get(code)
        if typ is None:
            raise FormatError(f"entry {name!r}: unknown entry type {code}")
        if i == 0 and typ is not EntryType.DIR:
            raise FormatError("entry '': the layer root must be a directory")
        if flags or reserved:
            raise FormatError(f"entry {name!r}: unknown flags {flags} or non-zero reserved field")
        if mode & ~MODE_BITS:
            raise FormatError(
                f"entry {name!r}: mode {mode:#o} has bits beyond permissions and suid/sgid/sticky"
            )
        entry = Entry(name=name, type=typ, mode=mode, uid=uid, gid=gid, mtime_ns=mtime)
        self._kind_fields(entry, size, major, minor, raw_digest)
        self._link(entry, loff, llen)
        entry.xattrs = self._entry_xattrs(name, xfirst, xcount, xattrs)
        entry.chunks = self._entry_chunks(entry, rfirst, rcount, chunks, refs)
        if typ is EntryType.REG:
            entry.digest = _content_digest(entry, raw_digest)
        self.entries[name] = entry
        self.names.append(name)

    @staticmethod
    def _kind_fields(entry: Entry, size: int, major: int, minor: int, raw_digest: bytes) -> None:
        name = entry.name
        if entry.type is EntryType.REG:
            if size > INT64_MAX:
                raise FormatError(f"entry {name!r}: size {size} overflows int64")
            entry.size = size
        elif size or raw_digest != _ZERO_DIGEST:
            raise FormatError(f"entry {name!r}: a {entry.type.value} with a size or content digest")
        if entry.type in DEVICE_TYPES:
            entry.dev_major, entry.dev_minor = major, minor
        elif major or minor:
            raise FormatError(f"entry {name!r}: a {entry.type.value} with device numbers")

    def _link(self, entry: Entry, offset: int, length: int) -> None:
        name = entry.name
        if entry.type is EntryType.SYMLINK:
            target = self._str(offset, length, f"entry {name!r} symlink target")
            if not target or "\x00" in target:
                raise FormatError(f"entry {name!r}: symlink target is empty or contains a NUL byte")
            entry.link_name = target
        elif entry.type is EntryType.HARDLINK:
            target = self._str(offset, length, f"entry {name!r} hardlink target")
            linked = self.entries.get(target)
            if linked is None or linked.type is not EntryType.REG:
                what = "missing or later in the bootstrap" if linked is None else f"a {linked.type.value}"
                raise FormatError(
                    f"entry {name!r}: hardlink to {target!r}, which is {what}, not an earlier file"
                )
            entry.link_name = target
        elif length:
            raise FormatError(f"entry {name!r}: a {entry.type.value} with a link target")

    @staticmethod
    def _entry_xattrs(
        name: str, first: int, count: int, table: list[tuple[bytes, bytes]]
    ) -> Mapping[str, bytes]:
        if first + count > len(table):
            raise FormatError(f"entry {name!r}: xattrs {first}..{first + count} are outside the xattr table")
        if not count:
            return NO_XATTRS
        out: dict[str, bytes] = {}
        for raw_key, value in table[first : first + count]:
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"entry {name!r}: xattr name is not valid UTF-8") from None
            if not key or "\x00" in key or key in out:
                raise FormatError(f"entry {name!r}: xattr name {key!r} is empty, has a NUL or is repeated")
            out[key] = value
        return out

    def _entry_chunks(
        self, entry: Entry, first: int, count: int, chunks: list[_ChunkRecord], refs: tuple[int, ...]
    ) -> list[Chunk]:
        name, cs = entry.name, self.chunk_size
        if entry.type is not EntryType.REG:
            if count:
                raise FormatError(f"entry {name!r}: a {entry.type.value} with chunks")
            return []
        want = -(-entry.size // cs)
        if count != want:
            raise FormatError(
                f"entry {name!r}: {count} chunks for {entry.size} bytes, want {want} of {cs} bytes"
            )
        if first + count > len(refs):
            raise FormatError(f"entry {name!r}: chunk refs {first}..{first + count} are outside the table")
        out: list[Chunk] = []
        for k, ref in enumerate(refs[first : first + count]):
            rec = chunks[ref]
            file_offset = k * cs
            if rec.size != min(cs, entry.size - file_offset):
                raise FormatError(
                    f"entry {name!r}: chunk at file offset {file_offset} has {rec.size} bytes; "
                    f"chunks must tile the file at {cs}-byte boundaries"
                )
            out.append(Chunk(file_offset, rec.size, rec.offset, rec.compressed_size, 0, rec.digest, rec.blob))
        return out

    # -- prefetch and result --------------------------------------------------------------

    def _prefetch(self) -> tuple[list[str], int]:
        names: list[str] = []
        seen: set[int] = set()
        end = 0
        for ref in self._u32s(_T_PREFETCH):
            if ref >= len(self.names) or ref in seen:
                raise FormatError(f"bootstrap: prefetch entry {ref} is out of range or repeated")
            entry = self.entries[self.names[ref]]
            if entry.type is not EntryType.REG:
                raise FormatError(
                    f"bootstrap: prefetch entry {entry.name!r} is a {entry.type.value}, not a file"
                )
            seen.add(ref)
            names.append(entry.name)
            own = (c.compressed_offset + c.compressed_size for c in entry.chunks if not c.blob)
            end = max(end, *own, 0)
        return names, end

    def index(self, blob_size: int) -> LayerIndex:
        self._strings()
        blobs = self._blobs()
        chunks = self._chunks(blobs)
        refs = self._refs(len(chunks))
        self._entries(chunks, refs)
        prefetch, prefetch_end = self._prefetch()
        return LayerIndex(
            format=FORMAT,
            compression=Compression.ZSTD,
            entries=self.entries,
            prefetch=prefetch,
            prefetch_end=prefetch_end,
            no_prefetch=not prefetch,
            toc_offset=self.data_end,
            blob_size=blob_size,
            blobs=dict(blobs.values()),
        )
