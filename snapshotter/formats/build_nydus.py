"""Writer for lazysnap's Nydus-like format: tar layers → ``[chunk frames][bootstrap][footer]`` blobs.

Each regular file is cut at ``chunk_size`` boundaries; each distinct chunk (by sha256) is
compressed into its own zstd frame and stored once per image: a chunk already stored in a lower
layer's blob, or earlier in this one, is referenced instead of stored again. Prioritized files'
chunks come first in the data region so one range request prefetches them. The bootstrap records
the tar's entries as the eStargz TOC would (same names, attributes, hardlink resolution, implied
parents), so both formats give the same ``LayerIndex`` apart from chunks and landmarks.
docs/FORMAT.md specifies the bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import zstandard

from snapshotter.formats.build import BuiltBlob, _clean, _maybe_decompress, _Member, _read_tar
from snapshotter.formats.index import TYPE_CODES, Entry, EntryType, FormatError
from snapshotter.formats.nydus import (
    BLOB,
    BOOTSTRAP_DIGEST_ANNOTATION,
    BOOTSTRAP_DIGEST_LABEL,
    BOOTSTRAP_MAGIC,
    CHUNK,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_BOOTSTRAP_BYTES,
    ENTRY,
    HEADER,
    HEADER_SIZE,
    MEDIA_TYPE,
    TABLE_LIMITS,
    TABLE_NAMES,
    VERSION,
    XATTR,
    check_chunk_size,
    pack_footer,
)
from snapshotter.formats.tarentry import entry_from_tar, text
from snapshotter.formats.toc import missing_ancestors, normalize_name, parent_name

DEFAULT_ZSTD_LEVEL = 3
_EMPTY = memoryview(b"")


def _entry(m: _Member, name: str, done: Mapping[str, Entry]) -> Entry:
    if name == "" and not m.info.isdir():
        raise FormatError(f"entry {m.info.name!r}: the layer root must be a directory")
    entry = entry_from_tar(m.info, name, done)
    if entry.type is EntryType.REG and len(m.payload) != m.info.size:
        raise FormatError(f"entry {name!r}: tar entry is truncated ({len(m.payload)} of {m.info.size} bytes)")
    return entry


@dataclass
class _Layer:
    """One input layer: its entries in bootstrap order (parents first) and file contents."""

    diff_id: str
    size: int
    entries: dict[str, Entry] = field(default_factory=dict)
    payloads: dict[str, memoryview] = field(default_factory=dict)


def _read_layer(tar: bytes) -> _Layer:
    plain = _maybe_decompress(tar)
    layer = _Layer("sha256:" + hashlib.sha256(plain).hexdigest(), len(plain))
    members: dict[str, _Member] = {}
    for m in _read_tar(plain):
        name = normalize_name(text(m.info.name))
        if name in members:  # two names that differ only in undecodable bytes
            raise FormatError(f"entry {name!r}: duplicate entry in the layer")
        members[name] = m
    _place(layer, "", members)
    for name in members:
        _place(layer, name, members)
    return layer


def _place(layer: _Layer, name: str, members: Mapping[str, _Member]) -> None:
    """Add ``name`` after any of its ancestors not yet added (from the tar, else implied dirs
    like the TOC parser synthesizes), so that every parent precedes its children."""
    for n in missing_ancestors(name, layer.entries):
        m = members.get(n)
        if m is None:
            layer.entries[n] = Entry(name=n, type=EntryType.DIR, mode=0o755)
        else:
            layer.entries[n] = _entry(m, n, layer.entries)
            if layer.entries[n].type is EntryType.REG:
                layer.payloads[n] = m.payload
        parent = layer.entries.get(parent_name(n)) if n else None
        if parent is not None and parent.type is not EntryType.DIR:
            raise FormatError(f"entry {n!r}: parent {parent.name!r} is a {parent.type.value}")


# -- data region --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """Where a stored chunk's zstd frame is: in ``blob`` (a finished lower layer's digest)."""

    blob: str
    blob_size: int
    offset: int
    compressed_size: int
    size: int


class _DataWriter:
    """Appends chunk frames to one layer's data region, storing each distinct chunk once."""

    def __init__(self, chunk_size: int, level: int, lower: Mapping[bytes, _Frame]) -> None:
        self.chunk_size = chunk_size
        self.cctx = zstandard.ZstdCompressor(level=level)
        self.lower = lower
        self.data = bytearray()
        # chunk records: (sha256, blob index, size, compressed offset, compressed size)
        self.records: list[tuple[bytes, int, int, int, int]] = []
        self.record_of: dict[bytes, int] = {}
        self.blobs: dict[str, tuple[int, int]] = {}  # lower blob digest -> (blob index, size)
        self.refs: list[int] = []
        self.runs: dict[str, tuple[int, int]] = {}  # file name -> (first ref, count)

    def add_file(self, entry: Entry, payload: memoryview) -> None:
        first, whole = len(self.refs), hashlib.sha256()
        for offset in range(0, entry.size, self.chunk_size):
            piece = payload[offset : offset + self.chunk_size]
            whole.update(piece)
            self.refs.append(self._chunk(piece))
        entry.digest = "sha256:" + whole.hexdigest()
        count = len(self.refs) - first
        self.runs[entry.name] = (first, count) if count else (0, 0)

    def _chunk(self, piece: memoryview) -> int:
        digest = hashlib.sha256(piece).digest()
        known = self.record_of.get(digest)
        if known is not None:
            return known
        frame = self.lower.get(digest)
        if frame is not None:
            # Blob table entries in order of first reference; index 0 is this layer's blob.
            blob_index, _ = self.blobs.setdefault(frame.blob, (len(self.blobs) + 1, frame.blob_size))
            record = (digest, blob_index, frame.size, frame.offset, frame.compressed_size)
        else:
            compressed = self.cctx.compress(piece)
            record = (digest, 0, len(piece), len(self.data), len(compressed))
            self.data += compressed
        self.records.append(record)
        self.record_of[digest] = len(self.records) - 1
        return len(self.records) - 1

    def own_frames(self, blob_digest: str, blob_size: int) -> dict[bytes, _Frame]:
        """This layer's stored chunks, for the layers above to reference."""
        return {
            digest: _Frame(blob_digest, blob_size, offset, csize, size)
            for digest, blob_index, size, offset, csize in self.records
            if blob_index == 0
        }


# -- bootstrap ------------------------------------------------------------------------------------


class _Heap:
    """The string table: each distinct byte string stored once."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._at: dict[bytes, tuple[int, int]] = {}

    def add(self, value: bytes) -> tuple[int, int]:
        if not value:
            return 0, 0
        ref = self._at.get(value)
        if ref is None:
            ref = self._at[value] = (len(self.data), len(value))
            self.data += value
        return ref


def _entry_rows(
    entries: Mapping[str, Entry], runs: Mapping[str, tuple[int, int]], heap: _Heap
) -> tuple[bytes, bytes, int]:
    """(entry table, xattr table, xattr count)."""
    rows, xattr_rows, xattr_count = bytearray(), bytearray(), 0
    for e in entries.values():
        first_xattr = xattr_count
        for key, value in e.xattrs.items():
            xattr_rows += XATTR.pack(*heap.add(key.encode("utf-8")), *heap.add(value))
            xattr_count += 1
        rfirst, rcount = runs.get(e.name, (0, 0))
        # Zero when readers can derive it: an empty file, or a file of one chunk.
        implied = e.type is not EntryType.REG or rcount <= 1
        digest = bytes(32) if implied else bytes.fromhex(e.digest.removeprefix("sha256:"))
        rows += ENTRY.pack(
            *heap.add(e.name.encode("utf-8")),
            *heap.add(e.link_name.encode("utf-8")),
            TYPE_CODES[e.type],
            0,
            0,
            e.mode,
            e.uid,
            e.gid,
            e.mtime_ns,
            e.size,
            e.dev_major,
            e.dev_minor,
            rfirst,
            rcount,
            first_xattr,
            len(e.xattrs),
            digest,
        )
    return bytes(rows), bytes(xattr_rows), xattr_count


def _encode_bootstrap(
    entries: Mapping[str, Entry], writer: _DataWriter, prefetch: Sequence[str], chunk_size: int
) -> bytes:
    heap = _Heap()
    entry_rows, xattr_rows, xattr_count = _entry_rows(entries, writer.runs, heap)
    index_of = {name: i for i, name in enumerate(entries)}
    chunk_rows = b"".join(CHUNK.pack(d, b, n, off, csize, 0) for d, b, n, off, csize in writer.records)
    blob_rows = b"".join(BLOB.pack(bytes.fromhex(d[7:]), n) for d, (_, n) in writer.blobs.items())
    # In the order of the header's table directory.
    tables = [
        (entry_rows, len(entries)),
        (chunk_rows, len(writer.records)),
        (struct.pack(f"<{len(writer.refs)}I", *writer.refs), len(writer.refs)),
        (xattr_rows, xattr_count),
        (blob_rows, len(writer.blobs)),
        (struct.pack(f"<{len(prefetch)}I", *(index_of[n] for n in prefetch)), len(prefetch)),
        (bytes(heap.data), len(heap.data)),
    ]
    directory: list[int] = []
    offset = HEADER_SIZE
    for (_, count), what, limit in zip(tables, TABLE_NAMES, TABLE_LIMITS, strict=True):
        if limit is not None and count > limit:  # readers refuse more: fail now, not at mount
            raise FormatError(f"layer needs {count} records in the {what} table, more than {limit}")
    for rows, count in tables:
        directory += (offset, count)
        offset += len(rows)
    if offset > DEFAULT_MAX_BOOTSTRAP_BYTES:
        raise FormatError(
            f"bootstrap would be {offset} bytes, over the {DEFAULT_MAX_BOOTSTRAP_BYTES}-byte limit of readers"
        )
    header = HEADER.pack(BOOTSTRAP_MAGIC, VERSION, 0, HEADER_SIZE, chunk_size, 0, *directory)
    return header + b"".join(rows for rows, _ in tables)


# -- layers and images ------------------------------------------------------------------------------


def _prefetch_files(entries: Mapping[str, Entry], prioritized: Sequence[str]) -> list[str]:
    """The regular files (hardlinks resolved) of this layer among ``prioritized``, in order."""
    out: dict[str, None] = {}
    for path in prioritized:
        entry = entries.get(_clean(path))
        if entry is not None and entry.type is EntryType.HARDLINK:
            entry = entries[entry.link_name]
        if entry is not None and entry.type is EntryType.REG:
            out.setdefault(entry.name)
    return list(out)


@dataclass(frozen=True)
class _Options:
    chunk_size: int
    level: int
    prioritized: Sequence[str]
    missing: tuple[str, ...]


def _build_layer(
    layer: _Layer, opts: _Options, lower: Mapping[bytes, _Frame]
) -> tuple[BuiltBlob, dict[bytes, _Frame]]:
    writer = _DataWriter(opts.chunk_size, opts.level, lower)
    prefetch = _prefetch_files(layer.entries, opts.prioritized)
    # Prioritized files' chunks first: the reader prefetches blob bytes [0, prefetch_end).
    first = set(prefetch)
    rest = [n for n, e in layer.entries.items() if e.type is EntryType.REG and n not in first]
    for name in [*prefetch, *rest]:
        writer.add_file(layer.entries[name], layer.payloads.get(name, _EMPTY))
    bootstrap = _encode_bootstrap(layer.entries, writer, prefetch, opts.chunk_size)
    stored = zstandard.ZstdCompressor(level=opts.level).compress(bootstrap)
    offset = len(writer.data)
    digest = "sha256:" + hashlib.sha256(stored).hexdigest()
    built = BuiltBlob(
        blob=bytes(writer.data) + stored + pack_footer(offset, len(stored), len(bootstrap)),
        media_type=MEDIA_TYPE,
        toc_digest=digest,
        diff_id=layer.diff_id,
        uncompressed_size=layer.size,
        toc_offset=offset,
        toc_json=bootstrap,
        annotations={BOOTSTRAP_DIGEST_ANNOTATION: digest, BOOTSTRAP_DIGEST_LABEL: digest},
        missing_prioritized=opts.missing,
    )
    return built, writer.own_frames(built.digest, len(built.blob))


def _options(
    chunk_size: int,
    level: int,
    prioritized: Sequence[str],
    layers: Sequence[_Layer],
    allow_missing: bool,
) -> _Options:
    try:
        check_chunk_size(chunk_size)
    except FormatError as exc:
        raise ValueError(str(exc)) from None
    missing = tuple(p for p in prioritized if not any(_clean(p) in layer.entries for layer in layers))
    if missing and not allow_missing:
        where = "the layer" if len(layers) == 1 else "any layer"
        raise FormatError(f"prioritized file {missing[0]!r} is not in {where}")
    return _Options(chunk_size, level, tuple(prioritized), missing)


def build_nydus_image(
    tars: Sequence[bytes],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized_files: Sequence[str] = (),
    compression_level: int = DEFAULT_ZSTD_LEVEL,
    allow_missing_prioritized: bool = True,
    dedup_across_layers: bool = True,
) -> list[BuiltBlob]:
    """One blob per layer (``tars`` bottom layer first; plain, gzip or zstd tars).

    With ``dedup_across_layers`` a chunk already stored in a lower layer's blob is referenced
    through the blob table, never stored again. ``prioritized_files`` apply to each layer that
    contains them; a path found in no layer raises FormatError unless
    ``allow_missing_prioritized`` (then each result lists it in ``missing_prioritized``).
    ``diff_id`` is the digest of each input tar, so chain IDs equal the source image's.
    """
    layers = [_read_layer(tar) for tar in tars]
    opts = _options(chunk_size, compression_level, prioritized_files, layers, allow_missing_prioritized)
    lower: dict[bytes, _Frame] = {}
    out: list[BuiltBlob] = []
    for layer in layers:
        built, frames = _build_layer(layer, opts, lower)
        out.append(built)
        if dedup_across_layers:
            for digest, frame in frames.items():
                lower.setdefault(digest, frame)  # the lowest copy wins; upper layers never store one
    return out


def build_nydus(
    tar: bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized_files: Sequence[str] = (),
    compression_level: int = DEFAULT_ZSTD_LEVEL,
    allow_missing_prioritized: bool = True,
) -> BuiltBlob:
    """One self-contained layer blob (no references to other blobs); see ``build_nydus_image``."""
    (built,) = build_nydus_image(
        [tar],
        chunk_size=chunk_size,
        prioritized_files=prioritized_files,
        compression_level=compression_level,
        allow_missing_prioritized=allow_missing_prioritized,
        dedup_across_layers=False,
    )
    return built
