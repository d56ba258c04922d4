"""Seekable indexes of plain gzip layers ("gzindex"): constants, the binary encoding, decoding →
``LayerIndex``.

An index describes one unchanged ``tar+gzip`` layer: checkpoints where inflating can resume
(a deflate block boundary's bit offset and the window before it), the tar entries with their
content offsets in the uncompressed stream, and the sha256 of every chunk (a file's bytes within
one span between two checkpoints), so that every byte served is verified. It is pushed as a blob
of an OCI referrer artifact of the image (``snapshotter.indexer``); docs/GZIP-INDEX.md is the
byte-level specification. Everything here is pure and bounded: any input either decodes to a
validated index or raises ``FormatError`` naming the problem.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import zstandard

from snapshotter.formats.bounds import DEFAULT_MAX_CHUNK_BYTES, compressed_bound
from snapshotter.formats.deflate_resume import WINDOW_SIZE
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
    ResumePoint,
)
from snapshotter.formats.toc import INT64_MAX, check_digest, parent_name
from snapshotter.formats.zstdchunked import ZSTD_FRAME_MAGIC

FORMAT = "gzindex"
VERSION = 1
# The referrer artifact (an OCI image manifest whose subject is the image manifest) ...
ARTIFACT_TYPE = "application/vnd.lazysnap.gzip-index.v1"
# ... holds one blob of this media type per indexed layer, annotated with the layer's digest.
INDEX_MEDIA_TYPE = "application/vnd.lazysnap.gzip-index.v1+zstd"
LAYER_ANNOTATION = "dev.lazysnap.gzip-index.layer"
# Set by discovery (snapshotter.gzdiscovery) beside a layer's manifest annotations, never taken
# from a registry document (``without_discovery`` drops them): the index blob found for the layer
# (its digest pins and verifies it), its size, the layer it is for, and the referrer artifact.
DISCOVERY_PREFIX = "dev.lazysnap.gzip-index.found."
INDEX_DIGEST_KEY = DISCOVERY_PREFIX + "digest"
INDEX_SIZE_KEY = DISCOVERY_PREFIX + "size"
INDEX_LAYER_KEY = DISCOVERY_PREFIX + "layer"
INDEX_REFERRER_KEY = DISCOVERY_PREFIX + "referrer"
GZIP_LAYER_TYPES = frozenset(
    {"application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip"}
)

DEFAULT_SPAN = 4 << 20
MIN_SPAN = 64 << 10
MAX_SPAN = 32 << 20
DEFAULT_MAX_INDEX_BYTES = 64 << 20
MAX_CHECKPOINTS = 1 << 20
MAX_RECORDS = 1 << 20  # entries, xattrs
TAR_BLOCK = 512

HEADER_MAGIC = b"LZGZINDX"
# magic, version, flags, uncompressed body size, layer sha256, layer blob size, tar stream size
HEADER = struct.Struct("<8sHHI32sQQ")
HEADER_SIZE = HEADER.size  # 64
# requested span, checkpoints, entries, chunk digests, xattrs, string bytes, window bytes
BODY_HEAD = struct.Struct("<7I")
# uncompressed offset, bit offset in the layer blob, window frame length, flags
CHECKPOINT = struct.Struct("<QQII")
CHECKPOINT_MEMBER_START = 1
# type, flags, reserved, mode, uid, gid, mtime ns, size, tar offset, dev major, dev minor,
# name length, link length, xattr count
ENTRY = struct.Struct("<BBHIIIqQQIIIII")
XATTR = struct.Struct("<II")  # key length, value length
DIGEST_SIZE = 32


def is_plain_gzip_layer(media_type: str) -> bool:
    """A layer an index can make lazy: an unchanged tar+gzip layer (OCI or Docker media type)."""
    return media_type in GZIP_LAYER_TYPES


def index_digest(annotations: Mapping[str, str]) -> str | None:
    """The digest of the index blob discovery found for the layer (None: no index)."""
    return annotations.get(INDEX_DIGEST_KEY) or None


def without_discovery(annotations: Mapping[str, str]) -> dict[str, str]:
    """``annotations`` less any discovery keys: an index counts only when discovery found it."""
    return {k: v for k, v in annotations.items() if not k.startswith(DISCOVERY_PREFIX)}


def claims(media_type: str, annotations: Mapping[str, str]) -> bool:
    """A plain gzip layer for which discovery found an index."""
    return is_plain_gzip_layer(media_type) and bool(index_digest(annotations))


def locate(annotations: Mapping[str, str], max_bytes: int) -> IndexLocation:
    """The index discovery found, from its keys; FormatError when they are malformed or the index
    is larger than ``max_bytes`` (checked before it is fetched)."""
    try:
        size = int(annotations.get(INDEX_SIZE_KEY, ""))
    except ValueError:
        raise FormatError("gzip index: no valid size") from None
    if not 0 < size <= max_bytes:
        raise FormatError(f"gzip index of {size} bytes (the limit is {max_bytes})")
    return IndexLocation(
        layer=check_digest(annotations.get(INDEX_LAYER_KEY), "indexed layer"),
        index=check_digest(annotations.get(INDEX_DIGEST_KEY), "gzip index digest"),
        length=size,
        referrer=annotations.get(INDEX_REFERRER_KEY, ""),
    )


@dataclass(frozen=True)
class IndexLocation:
    """A layer's index: the blob ``index`` (``length`` bytes, read whole from ``offset`` 0) of the
    referrer artifact ``referrer``, for layer ``layer``."""

    layer: str
    index: str
    length: int
    referrer: str = ""
    offset: int = 0


@dataclass(frozen=True)
class Checkpoint:
    """Where inflating can resume: uncompressed offset ``offset``, compressed bit ``bit`` of the
    layer blob, ``window`` the zstd frame of the bytes before it (b"" when none is needed)."""

    offset: int
    bit: int
    window: bytes = b""
    member_start: bool = False


@dataclass(frozen=True)
class Span:
    """The uncompressed bytes [start, end) between two checkpoints and the blob bytes
    [compressed_offset, compressed_offset + compressed_size) that hold them."""

    start: int
    end: int
    compressed_offset: int
    compressed_size: int


def spans(checkpoints: list[Checkpoint], layer_size: int, tar_size: int) -> list[Span]:
    """The spans the checkpoints cut the layer into (checkpoints as ``check_checkpoints`` accepts)."""
    out: list[Span] = []
    for i, cp in enumerate(checkpoints):
        last = i + 1 == len(checkpoints)
        end = tar_size if last else checkpoints[i + 1].offset
        compressed_end = layer_size if last else -(-checkpoints[i + 1].bit // 8)
        out.append(Span(cp.offset, end, cp.bit // 8, compressed_end - cp.bit // 8))
    return out


def chunk_pieces(tar_offset: int, size: int, starts: list[int]) -> list[tuple[int, int, int]]:
    """How a file's content [tar_offset, tar_offset + size) is cut into chunks: (span index, start,
    end) in uncompressed stream offsets, one per span it touches. ``starts``: the spans' starts."""
    import bisect

    pieces: list[tuple[int, int, int]] = []
    position, end = tar_offset, tar_offset + size
    k = bisect.bisect_right(starts, position) - 1
    while position < end:
        stop = min(end, starts[k + 1]) if k + 1 < len(starts) else end
        pieces.append((k, position, stop))
        position = stop
        k += 1
    return pieces


def check_window(frame: bytes, where: str) -> None:
    """A window is one zstd frame declaring at most 32 KiB of content."""
    if frame[:4] != ZSTD_FRAME_MAGIC:
        raise FormatError(f"{where}: window is not a zstd frame")
    try:
        size = zstandard.get_frame_parameters(frame).content_size
    except zstandard.ZstdError as exc:
        raise FormatError(f"{where}: corrupt window frame: {exc}") from None
    if size == zstandard.CONTENTSIZE_UNKNOWN or not 0 < size <= WINDOW_SIZE:
        raise FormatError(f"{where}: window of {size} bytes (want 1..{WINDOW_SIZE}, declared)")


def check_checkpoints(
    checkpoints: list[Checkpoint], layer_size: int, tar_size: int, max_span_bytes: int
) -> list[Span]:
    """Validate checkpoints against the layer's sizes; their spans (FormatError if they are not
    strictly increasing from 0, point outside the blob, or make a span over the limits)."""
    if not checkpoints:
        raise FormatError("index: no checkpoints")
    if checkpoints[0].offset != 0:
        raise FormatError(f"index: the first checkpoint is at {checkpoints[0].offset}, not 0")
    for i, cp in enumerate(checkpoints):
        where = f"index: checkpoint {i}"
        if not 0 <= cp.bit < 8 * layer_size:
            raise FormatError(f"{where}: bit offset {cp.bit} is outside the {layer_size}-byte layer")
        # Each span's stream starts in a byte of its own: streams are told apart by that byte.
        if i and (cp.offset <= checkpoints[i - 1].offset or cp.bit // 8 <= checkpoints[i - 1].bit // 8):
            raise FormatError(f"{where}: offsets do not increase (by a byte at least)")
        if cp.offset >= tar_size:
            raise FormatError(f"{where}: offset {cp.offset} is beyond the {tar_size}-byte tar stream")
        if cp.member_start and (cp.bit % 8 or cp.window):
            raise FormatError(f"{where}: a gzip member start with a bit offset or a window")
        if cp.window:
            check_window(cp.window, where)
    out = spans(checkpoints, layer_size, tar_size)
    for i, span in enumerate(out):
        length = span.end - span.start
        if length > max_span_bytes:
            raise FormatError(f"index: span {i} holds {length} bytes, beyond the {max_span_bytes}-byte limit")
        if span.compressed_size <= 0 or span.compressed_size > compressed_bound(length):
            raise FormatError(
                f"index: span {i} takes {span.compressed_size} compressed bytes for {length} bytes"
            )
    return out


def parse_index(
    raw: bytes,
    location: IndexLocation,
    *,
    blob_size: int,
    expected_digest: str,
    max_bytes: int = DEFAULT_MAX_INDEX_BYTES,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> LayerIndex:
    """Verify, decompress and validate the index blob of layer ``location.layer`` (``blob_size``
    bytes); ``expected_digest`` is the index blob's digest from the referrer manifest, checked
    before a byte is decompressed. ``max_chunk_bytes`` bounds a span's uncompressed size."""
    check_digest(expected_digest, "expected index digest")
    check_digest(location.layer, "indexed layer digest")
    if len(raw) != location.length:
        raise FormatError(f"index: got {len(raw)} bytes, the referrer manifest says {location.length}")
    if len(raw) > max_bytes:
        raise FormatError(f"index is {len(raw)} bytes, larger than the {max_bytes}-byte limit")
    got = "sha256:" + hashlib.sha256(raw).hexdigest()
    if got != expected_digest:
        raise FormatError(
            f"index digest mismatch: the blob is {got}, the referrer manifest says {expected_digest}"
        )
    if len(raw) < HEADER_SIZE:
        raise FormatError(f"index of {len(raw)} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, version, flags, body_size, layer, layer_size, tar_size = HEADER.unpack_from(raw)
    if magic != HEADER_MAGIC:
        raise FormatError(f"index: wrong magic {magic!r} (want {HEADER_MAGIC!r})")
    if version != VERSION:
        raise FormatError(f"index: unsupported version {version} (want {VERSION})")
    if flags:
        raise FormatError(f"index: unknown flags {flags:#x}")
    if "sha256:" + layer.hex() != location.layer:
        raise FormatError(f"index is for layer sha256:{layer.hex()}, not {location.layer}")
    if layer_size != blob_size:
        raise FormatError(f"index is for a layer of {layer_size} bytes, the layer has {blob_size}")
    if not 0 < tar_size <= INT64_MAX:
        raise FormatError(f"index: tar stream of {tar_size} bytes")
    if body_size > max_bytes:
        raise FormatError(f"index body is {body_size} bytes, larger than the {max_bytes}-byte limit")
    body = _decompress(raw[HEADER_SIZE:], body_size)
    return _Decoder(body, layer_size, tar_size, max_chunk_bytes).index()


def _decompress(frame: bytes, declared: int) -> bytes:
    """The body: one zstd frame of exactly ``declared`` bytes (already within the limit)."""
    if frame[:4] != ZSTD_FRAME_MAGIC:
        raise FormatError("index body is not a zstd frame")
    try:
        # The frame must state its size: decompress() then allocates just that and fails on more.
        size = zstandard.get_frame_parameters(frame).content_size
        if size != declared:
            raise FormatError(f"index body frame declares {size} bytes, the header says {declared}")
        data = zstandard.ZstdDecompressor(max_window_size=1 << 27).decompress(
            frame, max_output_size=declared, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise FormatError(f"index body: corrupt zstd frame: {exc}") from exc
    if len(data) != declared:
        raise FormatError(f"index body decompressed to {len(data)} bytes, the header says {declared}")
    return data


class _Decoder:
    """Decodes one index body, validating every field before it is used."""

    def __init__(self, body: bytes, layer_size: int, tar_size: int, max_chunk_bytes: int) -> None:
        self.body = body
        self.layer_size = layer_size
        self.tar_size = tar_size
        self.max_chunk_bytes = max_chunk_bytes
        self.position = 0
        self.entries: dict[str, Entry] = {}
        self.tar_offsets: dict[str, int] = {}

    def _take(self, size: int, what: str) -> memoryview:
        end = self.position + size
        if end > len(self.body):
            raise FormatError(f"index: {what} runs past the end of the body ({len(self.body)} bytes)")
        view = memoryview(self.body)[self.position : end]
        self.position = end
        return view

    def index(self) -> LayerIndex:
        if len(self.body) < BODY_HEAD.size:
            raise FormatError("index: body too short for its counts")
        _span, n_checkpoints, n_entries, n_digests, n_xattrs, n_strings, n_windows = BODY_HEAD.unpack(
            self._take(BODY_HEAD.size, "counts")
        )
        if n_checkpoints > MAX_CHECKPOINTS or n_entries > MAX_RECORDS or n_xattrs > MAX_RECORDS:
            raise FormatError(
                f"index: {n_checkpoints} checkpoints, {n_entries} entries, {n_xattrs} xattrs: over the limits"
            )
        if n_digests > n_entries + n_checkpoints:  # a checkpoint cuts at most one file in two
            raise FormatError(f"index: {n_digests} chunks for {n_entries} entries and {n_checkpoints} spans")
        # The counts must account for the body exactly: checked before anything is allocated.
        need = (
            BODY_HEAD.size
            + n_checkpoints * CHECKPOINT.size
            + n_windows
            + n_entries * ENTRY.size
            + n_digests * DIGEST_SIZE
            + n_xattrs * XATTR.size
            + n_strings
        )
        if need != len(self.body):
            raise FormatError(f"index: the counts describe {need} bytes, the body has {len(self.body)}")
        checkpoints = self._checkpoints(n_checkpoints, n_windows)
        layer_spans = check_checkpoints(checkpoints, self.layer_size, self.tar_size, self.max_chunk_bytes)
        entry_records = list(ENTRY.iter_unpack(self._take(n_entries * ENTRY.size, "entries")))
        digests = self._take(n_digests * DIGEST_SIZE, "chunk digests")
        xattr_records = list(XATTR.iter_unpack(self._take(n_xattrs * XATTR.size, "xattrs")))
        self.strings = self._take(n_strings, "strings")
        self.string_at = 0
        self._entries(entry_records, xattr_records, digests, layer_spans)
        self._check_regions()
        return LayerIndex(
            format=FORMAT,
            compression=Compression.GZIP_SPAN,
            entries=self.entries,
            no_prefetch=True,
            toc_offset=self.layer_size,  # the metadata is not in the layer blob
            blob_size=self.layer_size,
            resume_points={
                s.compressed_offset: ResumePoint(cp.bit % 8, cp.window, cp.member_start)
                for s, cp in zip(layer_spans, checkpoints, strict=True)
            },
            whole_streams=True,
            tar_offsets=self.tar_offsets,
            tar_size=self.tar_size,
        )

    def _checkpoints(self, count: int, window_bytes: int) -> list[Checkpoint]:
        records = list(CHECKPOINT.iter_unpack(self._take(count * CHECKPOINT.size, "checkpoints")))
        windows = self._take(window_bytes, "windows")
        used = 0
        out: list[Checkpoint] = []
        for i, (offset, bit, window_length, flags) in enumerate(records):
            if flags & ~CHECKPOINT_MEMBER_START:
                raise FormatError(f"index: checkpoint {i} has unknown flags {flags:#x}")
            if used + window_length > window_bytes:
                raise FormatError(f"index: checkpoint {i}'s window runs past the window area")
            window = bytes(windows[used : used + window_length])
            used += window_length
            out.append(Checkpoint(offset, bit, window, bool(flags & CHECKPOINT_MEMBER_START)))
        if used != window_bytes:
            raise FormatError(f"index: {window_bytes - used} window bytes belong to no checkpoint")
        return out

    def _string(self, length: int, what: str) -> str:
        raw = self._bytes(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"index: {what} is not valid UTF-8") from None

    def _bytes(self, length: int, what: str) -> bytes:
        end = self.string_at + length
        if end > len(self.strings):
            raise FormatError(f"index: {what} runs past the string table ({len(self.strings)} bytes)")
        raw = bytes(self.strings[self.string_at : end])
        self.string_at = end
        return raw

    def _entries(
        self,
        records: list[tuple[int, ...]],
        xattrs: list[tuple[int, int]],
        digests: memoryview,
        layer_spans: list[Span],
    ) -> None:
        if not records:
            raise FormatError("index: no entries (the root directory must be entry 0)")
        if sum(r[13] for r in records) != len(xattrs):
            raise FormatError("index: the entries' xattr counts do not add up to the xattr table")
        starts = [s.start for s in layer_spans]
        next_xattr = next_digest = 0
        for i, rec in enumerate(records):
            (code, flags, reserved, mode, uid, gid, mtime, size, tar_offset,
             major, minor, name_length, link_length, xattr_count) = rec  # fmt: skip
            name = self._name(i, self._string(name_length, f"entry {i} name"))
            typ = TYPES_BY_CODE.get(code)
            if typ is None:
                raise FormatError(f"entry {name!r}: unknown entry type {code}")
            if i == 0 and typ is not EntryType.DIR:
                raise FormatError("entry '': the layer root must be a directory")
            if flags or reserved:
                raise FormatError(f"entry {name!r}: unknown flags {flags} or non-zero reserved field")
            if mode & ~MODE_BITS:
                raise FormatError(f"entry {name!r}: mode {mode:#o} has bits beyond permissions")
            entry = Entry(name=name, type=typ, mode=mode, uid=uid, gid=gid, mtime_ns=mtime)
            self._kind(entry, size, tar_offset, major, minor)
            entry.link_name = self._link(entry, link_length)
            entry.xattrs = self._xattrs(name, xattrs[next_xattr : next_xattr + xattr_count])
            next_xattr += xattr_count
            if typ is EntryType.REG and size:
                pieces = chunk_pieces(tar_offset, size, starts)
                if next_digest + len(pieces) > len(digests) // DIGEST_SIZE:
                    raise FormatError(f"entry {name!r}: more chunks than the index has digests")
                entry.chunks = []
                for k, start, end in pieces:
                    at = next_digest * DIGEST_SIZE
                    digest = "sha256:" + bytes(digests[at : at + DIGEST_SIZE]).hex()
                    next_digest += 1
                    span = layer_spans[k]
                    entry.chunks.append(
                        Chunk(
                            start - tar_offset,
                            end - start,
                            span.compressed_offset,
                            span.compressed_size,
                            start - span.start,
                            digest,
                        )
                    )
                entry.digest = entry.chunks[0].digest if len(entry.chunks) == 1 else ""
                self.tar_offsets[name] = tar_offset
            elif typ is EntryType.REG:
                entry.digest = EMPTY_DIGEST
            self.entries[name] = entry
        if next_digest * DIGEST_SIZE != len(digests):
            raise FormatError(
                f"index: {len(digests) // DIGEST_SIZE - next_digest} chunk digests belong to no file"
            )
        if self.string_at != len(self.strings):
            raise FormatError(f"index: {len(self.strings) - self.string_at} string bytes belong to no entry")

    def _name(self, i: int, name: str) -> str:
        if i == 0:
            if name:
                raise FormatError(f"index: entry 0 is {name!r}; the root directory ('') must come first")
            return name
        parts = name.split("/")
        if "\x00" in name or ".." in parts or "" in parts or "." in parts:
            raise FormatError(f"entry {name!r}: name is empty, not normalized or escapes the root")
        if name in self.entries:
            raise FormatError(f"entry {name!r}: duplicate entry in the index")
        # Parents come first (looked up among the entries so far), so the tree has no cycles.
        parent = self.entries.get(parent_name(name))
        if parent is None:
            raise FormatError(f"entry {name!r}: parent directory is missing or comes later")
        if parent.type is not EntryType.DIR:
            raise FormatError(f"entry {name!r}: parent {parent.name!r} is a {parent.type.value}")
        return name

    def _kind(self, entry: Entry, size: int, tar_offset: int, major: int, minor: int) -> None:
        name = entry.name
        if entry.type is EntryType.REG:
            if size > INT64_MAX or tar_offset % TAR_BLOCK or tar_offset + size > self.tar_size:
                raise FormatError(
                    f"entry {name!r}: content at {tar_offset} (+{size}) is unaligned or beyond the "
                    f"{self.tar_size}-byte tar stream"
                )
            entry.size = size
        elif size or tar_offset:
            raise FormatError(f"entry {name!r}: a {entry.type.value} with a size or content offset")
        if entry.type in DEVICE_TYPES:
            entry.dev_major, entry.dev_minor = major, minor
        elif major or minor:
            raise FormatError(f"entry {name!r}: a {entry.type.value} with device numbers")

    def _link(self, entry: Entry, length: int) -> str:
        name = entry.name
        if entry.type is EntryType.SYMLINK:
            target = self._string(length, f"entry {name!r} symlink target")
            if not target or "\x00" in target:
                raise FormatError(f"entry {name!r}: symlink target is empty or contains a NUL byte")
            return target
        if entry.type is EntryType.HARDLINK:
            target = self._string(length, f"entry {name!r} hardlink target")
            linked = self.entries.get(target)
            if linked is None or linked.type is not EntryType.REG:
                raise FormatError(f"entry {name!r}: hardlink to {target!r}, not an earlier file")
            return target
        if length:
            raise FormatError(f"entry {name!r}: a {entry.type.value} with a link target")
        return ""

    def _xattrs(self, name: str, records: list[tuple[int, int]]) -> Mapping[str, bytes]:
        if not records:
            return NO_XATTRS
        out: dict[str, bytes] = {}
        for key_length, value_length in records:
            key = self._string(key_length, f"entry {name!r} xattr name")
            if not key or "\x00" in key or key in out:
                raise FormatError(f"entry {name!r}: xattr name {key!r} is empty, has a NUL or is repeated")
            out[key] = self._bytes(value_length, f"entry {name!r} xattr value")
        return out

    def _check_regions(self) -> None:
        """Files' contents must not overlap in the tar stream (a data blob laid out as the tar
        stream places each file where its content is)."""
        end = 0
        for name, offset in sorted(self.tar_offsets.items(), key=lambda item: item[1]):
            if offset < end:
                raise FormatError(f"entry {name!r}: content at {offset} overlaps the file before it")
            end = offset + self.entries[name].size
