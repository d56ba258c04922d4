"""Builder of gzip indexes (``snapshotter.formats.gzindex``): one pass over an unchanged gzip layer.

rapidgzip decompresses the layer (in parallel) and records a checkpoint at the first deflate block
boundary after every ``span`` bytes of output: the boundary's bit offset and the window before it
(rapidgzip keeps only the window bytes later blocks refer to, the rest zeroed, so windows compress
well). Python's zlib cannot report block boundaries, so building needs the library; reading does
not (``snapshotter.formats.deflate_resume``). While the stream goes by, the tar entries are read
from it and each file's content is hashed in pieces cut at the checkpoints (a piece of a span is
a chunk of the index), holding only the bytes of the span being cut. Then every span is inflated
again from its checkpoint with the reader's own decoder and compared with the stream, so an index
that would serve wrong bytes is never written.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import struct
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zstandard

from snapshotter.formats.build import _clean
from snapshotter.formats.deflate_resume import WINDOW_SIZE, inflate_from
from snapshotter.formats.gzindex import (
    BODY_HEAD,
    CHECKPOINT,
    CHECKPOINT_MEMBER_START,
    DEFAULT_SPAN,
    ENTRY,
    HEADER,
    HEADER_MAGIC,
    MAX_SPAN,
    MIN_SPAN,
    VERSION,
    XATTR,
    Checkpoint,
    Span,
    check_checkpoints,
    chunk_pieces,
    spans,
)
from snapshotter.formats.index import TYPE_CODES, Entry, EntryType, FormatError
from snapshotter.formats.tarentry import TAR_TYPES, entry_from_tar, text
from snapshotter.formats.toc import missing_ancestors, normalize_name, parent_name

WINDOW_ZSTD_LEVEL = 12  # 32 KiB windows, mostly zeros: 19 is 10x slower for 1% less
BODY_ZSTD_LEVEL = 19
_READ_SIZE = 1 << 20
_GZIDX_MAGIC = b"GZIDX"
# indexed_gzip's index export (rapidgzip writes it too): magic, version, flags, compressed size,
# uncompressed size, spacing, window size, point count; then per point its compressed byte offset,
# uncompressed offset, bits and whether it has a window; then the windows.
_GZIDX_HEAD = struct.Struct("<5sBBQQIII")
_GZIDX_POINT = struct.Struct("<QQBB")


@dataclass(frozen=True)
class BuiltIndex:
    """An index blob and what it says about its layer."""

    data: bytes
    layer: str  # the indexed layer's digest
    layer_size: int
    tar_size: int
    diff_id: str  # sha256 of the uncompressed tar stream
    checkpoints: int
    entries: int
    chunks: int
    window_bytes: int  # of ``data``'s body, before the body's compression

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


@dataclass
class _File:
    """A regular file whose content [start, end) of the stream is hashed piece by piece."""

    name: str
    start: int
    end: int
    hashed_to: int
    digests: list[bytes] = field(default_factory=list)


class _Pieces:
    """The uncompressed stream as it goes by: the bytes not hashed yet, the files to hash piece
    by piece, and the digest of every span (to check the checkpoints against)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.base = 0  # stream offset of buffer[0]
        self.position = 0  # stream bytes seen
        self.cuts: list[int] = [0]  # checkpoint offsets known so far (a prefix of the final list)
        self.pending: list[_File] = []
        self.done: list[_File] = []
        self.span_digests: list[bytes] = []
        self.whole = hashlib.sha256()
        # Stream offset up to which every tar member is known: bytes beyond it may be the content
        # of a file whose header tarfile has not parsed yet, so they are kept.
        self.frontier = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data
        self.position += len(data)
        self.whole.update(data)

    def learn_cuts(self, cuts: list[int]) -> None:
        if cuts[: len(self.cuts)] != self.cuts:
            raise FormatError("the decompressor reported checkpoints out of order")  # not the layer's fault
        self.cuts = cuts

    def add(self, file: _File) -> None:
        self.pending.append(file)

    def _slice(self, start: int, end: int) -> bytearray:
        return self.buffer[start - self.base : end - self.base]

    def settle(self, limit: int, *, final: bool = False) -> None:
        """Hash every piece and span that ends at or before ``limit`` (all checkpoints below it
        are known, all its bytes seen), then forget the bytes nothing needs any more."""
        limit = min(limit, self.position)
        while self.pending:
            f = self.pending[0]
            while f.hashed_to < f.end:
                k = bisect.bisect_right(self.cuts, f.hashed_to)
                stop = min(f.end, self.cuts[k]) if k < len(self.cuts) else f.end
                if stop > limit:
                    break
                f.digests.append(hashlib.sha256(self._slice(f.hashed_to, stop)).digest())
                f.hashed_to = stop
            if f.hashed_to < f.end:
                break
            self.done.append(self.pending.pop(0))
        spans_done = len(self.span_digests)
        while spans_done < len(self.cuts):
            end = self.cuts[spans_done + 1] if spans_done + 1 < len(self.cuts) else self.position
            if end > limit or (spans_done + 1 == len(self.cuts) and not final):
                break
            self.span_digests.append(hashlib.sha256(self._slice(self.cuts[spans_done], end)).digest())
            spans_done += 1
        keep = min(limit, self.cuts[min(spans_done, len(self.cuts) - 1)])
        if self.pending:
            keep = min(keep, self.pending[0].hashed_to)
        if keep > self.base:
            del self.buffer[: keep - self.base]
            self.base = keep


class _Tee(io.RawIOBase):
    """The decompressor's output as a stream for tarfile; every byte is also fed to ``pieces``,
    which hashes what it can as soon as the checkpoints below it are known."""

    def __init__(self, source: Any, pieces: _Pieces) -> None:
        self.source = source
        self.pieces = pieces

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(min(len(buffer), _READ_SIZE))
        n = len(data)
        buffer[:n] = data
        pieces = self.pieces
        pieces.feed(data)
        known = _offsets(self.source, complete=False)
        if len(known) > len(pieces.cuts):
            pieces.learn_cuts([offset for _, offset in known])
        pieces.settle(min(pieces.frontier, pieces.cuts[-1]))
        return n


def _decompressor(blob: bytes, span: int, threads: int) -> Any:
    try:
        import rapidgzip
    except ImportError as exc:  # a packaging problem: the dependency is declared
        raise FormatError(f"building gzip indexes needs the rapidgzip package: {exc}") from None
    return rapidgzip.RapidgzipFile(io.BytesIO(blob), parallelization=threads, chunk_size=span)


def _offsets(decompressor: Any, *, complete: bool) -> list[tuple[int, int]]:
    """(bit offset, uncompressed offset) of the checkpoints the decompressor knows, in order."""
    found = decompressor.block_offsets() if complete else decompressor.available_block_offsets()
    return sorted(found.items())


def _windows(decompressor: Any) -> dict[tuple[int, int], bytes]:
    """Each checkpoint's window by (bit offset, uncompressed offset), from the library's index
    export in indexed_gzip's format (the one format both libraries write)."""
    import rapidgzip

    out = io.BytesIO()
    decompressor.export_index(out, rapidgzip.IndexFormat.INDEXED_GZIP)
    data = out.getvalue()
    magic, _version, _flags, _csize, _usize, _spacing, window_size, count = _GZIDX_HEAD.unpack_from(data)
    if magic != _GZIDX_MAGIC or window_size > WINDOW_SIZE:
        raise FormatError("unexpected index export from the decompressor")
    at = _GZIDX_HEAD.size
    points = []
    for _ in range(count):
        byte, offset, bits, has_window = _GZIDX_POINT.unpack_from(data, at)
        at += _GZIDX_POINT.size
        # zran's convention: the block starts ``bits`` bits before byte ``byte``.
        points.append((8 * byte - bits, offset, bool(has_window)))
    windows: dict[tuple[int, int], bytes] = {}
    for bit, offset, has_window in points:
        if has_window:
            windows[(bit, offset)] = data[at : at + window_size]
            at += window_size
    return windows


def _window_frame(window: bytes) -> bytes:
    """The window as stored: a zstd frame of all 32 KiB (rapidgzip zeroes the bytes no later
    block refers to, so a frame is mostly a few KiB). Never trimmed: a back-reference may reach a
    zero byte that is real data."""
    return zstandard.ZstdCompressor(level=WINDOW_ZSTD_LEVEL, write_content_size=True).compress(window)


@dataclass
class _Member:
    name: str
    entry: Entry
    tar_offset: int


def _read_members(tee: _Tee, pieces: _Pieces) -> dict[str, _Member]:
    """The layer's entries by name (a later duplicate replaces an earlier one, as an unpacker
    does), hashing file contents as the stream goes by."""
    members: dict[str, _Member] = {}
    done: dict[str, Entry] = {}
    try:
        with tarfile.open(fileobj=io.BufferedReader(tee, _READ_SIZE), mode="r|") as tar:
            for info in tar:
                if info.issparse() or not (info.isreg() or info.type in TAR_TYPES):
                    raise FormatError(f"entry {info.name!r}: unsupported tar entry type {info.type!r}")
                name = normalize_name(text(_clean(info.name)))
                if name == "" and not info.isdir():
                    raise FormatError(f"entry {info.name!r}: the layer root must be a directory")
                entry = entry_from_tar(info, name, done)
                done[name] = entry
                members.pop(name, None)
                members[name] = _Member(name, entry, info.offset_data if info.isreg() else 0)
                if entry.type is EntryType.REG and entry.size:
                    pieces.add(_File(name, info.offset_data, info.offset_data + entry.size, info.offset_data))
                    pieces.frontier = info.offset_data + entry.size
                else:
                    pieces.frontier = info.offset_data
            # The rest of the stream (end-of-archive blocks, padding) still counts.
            while tee.readinto(bytearray(_READ_SIZE)):
                pass
    except tarfile.TarError as exc:
        raise FormatError(f"the layer is not a valid tar stream: {exc}") from exc
    return members


def _ordered(members: dict[str, _Member]) -> list[_Member]:
    """Parents before children (directories a tar leaves implied become 0755 directories)."""
    out: dict[str, _Member] = {}

    def place(name: str) -> None:
        for n in missing_ancestors(name, out):
            member = members.get(n)
            if member is None:
                member = _Member(n, Entry(name=n, type=EntryType.DIR, mode=0o755), 0)
            parent = out.get(parent_name(n)) if n else None
            if parent is not None and parent.entry.type is not EntryType.DIR:
                raise FormatError(f"entry {n!r}: parent {parent.name!r} is a {parent.entry.type.value}")
            out[n] = member

    place("")
    for name in members:
        place(name)
    return list(out.values())


def _verify_spans(
    blob: bytes, checkpoints: list[Checkpoint], layer_spans: list[Span], digests: list[bytes], threads: int
) -> None:
    """Inflate every span from its checkpoint as a reader will and compare it with the stream."""

    def check(i: int) -> None:
        cp, span = checkpoints[i], layer_spans[i]
        window = zstandard.ZstdDecompressor().decompress(cp.window) if cp.window else b""
        data = blob[span.compressed_offset : span.compressed_offset + span.compressed_size]
        got = inflate_from(data, cp.bit % 8, window, span.end - span.start, member_start=cp.member_start)
        if hashlib.sha256(got).digest() != digests[i]:
            raise FormatError(f"checkpoint {i} at bit {cp.bit} does not reproduce its span; not indexable")

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(check, range(len(checkpoints))))


def build_index(
    blob: bytes,
    *,
    span: int = DEFAULT_SPAN,
    threads: int = 0,
    verify: bool = True,
    diff_id: str | None = None,
) -> BuiltIndex:
    """The gzip index of the layer blob ``blob`` (a gzip-compressed tar), with a checkpoint about
    every ``span`` uncompressed bytes. ``threads``: rapidgzip's parallelism (0: one per core).
    ``diff_id``: the image config's DiffID of the layer, checked against the stream.
    FormatError when the blob is not a gzip tar this format can index."""
    if not MIN_SPAN <= span <= MAX_SPAN:
        raise FormatError(f"span {span} is outside [{MIN_SPAN}, {MAX_SPAN}]")
    if blob[:3] != b"\x1f\x8b\x08":
        raise FormatError("the layer is not gzip-compressed")
    pieces = _Pieces()
    decompressor = _decompressor(blob, span, threads)
    try:
        try:
            members = _read_members(_Tee(decompressor, pieces), pieces)
            final = _offsets(decompressor, complete=True)
            windows = _windows(decompressor)
        except (RuntimeError, ValueError, OSError) as exc:  # rapidgzip's errors for corrupt data
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"cannot decompress the layer: {exc}") from None
    finally:
        decompressor.close()
    tar_size = pieces.position
    # The decompressor also lists the stream's end; no span starts there.
    final = [(bit, offset) for bit, offset in final if offset < tar_size]
    pieces.cuts = [offset for offset in pieces.cuts if offset < tar_size]
    pieces.learn_cuts([offset for _, offset in final])
    pieces.frontier = tar_size
    pieces.settle(tar_size, final=True)
    if pieces.pending:
        raise FormatError("file contents run past the end of the layer")
    checkpoints = [
        Checkpoint(offset, bit, _window_frame(windows[(bit, offset)]) if (bit, offset) in windows else b"")
        for bit, offset in final
    ]
    layer_spans = check_checkpoints(checkpoints, len(blob), tar_size, max(MAX_SPAN, 2 * span))
    digest_of = "sha256:" + pieces.whole.hexdigest()
    if diff_id is not None and diff_id != digest_of:
        raise FormatError(f"the layer's content is {digest_of}, the image config says {diff_id}")
    if verify:
        _verify_spans(blob, checkpoints, layer_spans, pieces.span_digests, threads)
    files = {f.name: f for f in pieces.done}  # a later duplicate replaces an earlier one
    ordered = _ordered(members)
    layer = hashlib.sha256(blob).digest()
    data, chunks = _encode(ordered, files, checkpoints, span, layer=layer, sizes=(len(blob), tar_size))
    return BuiltIndex(
        data=data,
        layer="sha256:" + layer.hex(),
        layer_size=len(blob),
        tar_size=tar_size,
        diff_id=digest_of,
        checkpoints=len(checkpoints),
        entries=len(ordered),
        chunks=chunks,
        window_bytes=sum(len(cp.window) for cp in checkpoints),
    )


def _encode(
    ordered: list[_Member],
    files: dict[str, _File],
    checkpoints: list[Checkpoint],
    span: int,
    *,
    layer: bytes,
    sizes: tuple[int, int],
) -> tuple[bytes, int]:
    """The index blob: header and zstd-compressed body (docs/GZIP-INDEX.md). Returns it and the
    number of chunks."""
    starts = [cp.offset for cp in checkpoints]
    entries = bytearray()
    digests = bytearray()
    xattrs = bytearray()
    strings = bytearray()
    n_xattrs = chunks = 0
    for member in ordered:
        e = member.entry
        name, link = e.name.encode(), e.link_name.encode()
        strings += name + link
        for key, value in e.xattrs.items():
            encoded = key.encode()
            xattrs += XATTR.pack(len(encoded), len(value))
            strings += encoded + value
            n_xattrs += 1
        tar_offset = member.tar_offset if e.type is EntryType.REG else 0
        if e.type is EntryType.REG and e.size:
            f = files[e.name]
            if f.start != tar_offset or len(f.digests) != len(chunk_pieces(tar_offset, e.size, starts)):
                raise FormatError(f"entry {e.name!r}: its content was not hashed as its chunks are cut")
            digests += b"".join(f.digests)
            chunks += len(f.digests)
        entries += ENTRY.pack(
            TYPE_CODES[e.type], 0, 0, e.mode, e.uid, e.gid, e.mtime_ns, e.size, tar_offset,
            e.dev_major, e.dev_minor, len(name), len(link), len(e.xattrs),
        )  # fmt: skip
    records = bytearray()
    windows = bytearray()
    for cp in checkpoints:
        records += CHECKPOINT.pack(
            cp.offset, cp.bit, len(cp.window), CHECKPOINT_MEMBER_START if cp.member_start else 0
        )
        windows += cp.window
    head = BODY_HEAD.pack(span, len(checkpoints), len(ordered), chunks, n_xattrs, len(strings), len(windows))
    body = bytes(head + records + windows + entries + digests + xattrs + strings)
    frame = zstandard.ZstdCompressor(level=BODY_ZSTD_LEVEL, write_content_size=True).compress(body)
    header = HEADER.pack(HEADER_MAGIC, VERSION, 0, len(body), layer, *sizes)
    return header + frame, chunks


__all__ = ["BuiltIndex", "build_index", "spans"]
