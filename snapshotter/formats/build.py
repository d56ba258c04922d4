"""Writer: turn a tar layer into an eStargz (gzip, 51-byte footer) or zstd:chunked blob.

Follows stargz-snapshotter's ``estargz.Build`` so its reader accepts our output: a new gzip
member (zstd frame) at the start of every chunk of every non-empty regular file, tar headers
and padding riding in the stream before them, prioritized files moved to the front followed by
``.prefetch.landmark`` (else ``.no.prefetch.landmark`` first), the TOC JSON (tab-indented like
Go's ``json.MarshalIndent``) in its own member, then the footer. Tar headers are copied
byte-for-byte from the input rather than re-serialized.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import math
import re
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import zstandard

from snapshotter.formats import estargz, zstdchunked
from snapshotter.formats.detect import TOC_DIGEST_ANNOTATION
from snapshotter.formats.index import Compression, FormatError
from snapshotter.formats.toc import (
    LANDMARK_CONTENTS,
    LANDMARK_NAMES,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    TOC_VERSION,
)

DEFAULT_CHUNK_SIZE = 4 << 20  # estargz.Writer.chunkSize()
DEFAULT_GZIP_LEVEL = 9  # ctr-remote --estargz-compression-level default (gzip.BestCompression)
DEFAULT_ZSTD_LEVEL = 3  # klauspost zstd.SpeedDefault ≈ zstd level 3
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
MEDIA_TYPE_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
_BLOCK = 512
_XATTR_PREFIX = "SCHILY.xattr."
_TAR_TYPES = {
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
# Go's TOCEntry field order; with omitempty, zero values are left out.
_FIELD_ORDER = (
    "name",
    "type",
    "size",
    "modtime",
    "linkName",
    "mode",
    "uid",
    "gid",
    "userName",
    "groupName",
    "offset",
    "innerOffset",
    "devMajor",
    "devMinor",
    "xattrs",
    "digest",
    "chunkOffset",
    "chunkSize",
    "chunkDigest",
)


@dataclass(frozen=True)
class BuiltBlob:
    """A built layer blob and what its manifest descriptor must say about it."""

    blob: bytes
    media_type: str
    toc_digest: str  # sha256 of the uncompressed TOC JSON
    diff_id: str  # sha256 of the uncompressed stream the blob decompresses to
    uncompressed_size: int
    toc_offset: int  # where the TOC member / skippable frame starts
    toc_json: bytes
    annotations: dict[str, str]
    missing_prioritized: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        """The blob's own digest (the manifest layer descriptor's ``digest``)."""
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()


@dataclass
class _Member:
    """One tar entry of the input: its raw header bytes, payload and parsed header."""

    name: str  # cleaned, as stargz's cleanEntryName
    info: tarfile.TarInfo
    header: bytes
    payload: memoryview


def _clean(name: str) -> str:
    # path.Clean("/" + name) without the leading "/": what SGZ uses to match names.
    parts: list[str] = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if parts:
                parts.pop()
            continue
        parts.append(p)
    return "/".join(parts)


def _maybe_decompress(data: bytes) -> bytes:
    if data[:3] == b"\x1f\x8b\x08":
        return gzip.decompress(data)
    if data[:4] == zstdchunked.ZSTD_FRAME_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
    return data


def _read_tar(data: bytes) -> list[_Member]:
    """Input entries in order; later duplicates replace earlier ones (SGZ importTar does too)."""
    view = memoryview(data)
    members: dict[str, _Member] = {}
    if not data:  # an empty layer: Go's tar reader sees a clean EOF, tarfile calls it an error
        return []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for info in tf:
                name = _clean(info.name)
                if name == TOC_TAR_NAME or name in LANDMARK_NAMES:
                    continue
                if info.issparse() or not (info.isreg() or info.type in _TAR_TYPES):
                    raise FormatError(f"entry {info.name!r}: unsupported tar entry type {info.type!r}")
                members.pop(name, None)
                header = bytes(view[info.offset : info.offset_data])
                payload = view[info.offset_data : info.offset_data + info.size] if info.isreg() else view[0:0]
                members[name] = _Member(name, info, header, payload)
    except tarfile.TarError as exc:
        raise FormatError(f"input is not a valid tar stream: {exc}") from exc
    return list(members.values())


class _NotFoundError(Exception):
    pass


def _sort_members(
    members: list[_Member], prioritized: Sequence[str], allow_missing: bool
) -> tuple[list[_Member], list[str]]:
    """Prioritized files (with their parents and hardlink targets) first, in the given order."""
    remaining = {m.name: m for m in members}
    moved: dict[str, _Member] = {}
    visiting: set[str] = set()

    def move(name: str, *, required: bool) -> None:
        name = _clean(name)
        if name in visiting:  # hardlink cycle
            return
        if name not in remaining and name not in moved:
            if required:
                raise _NotFoundError(name)
            return  # an implicit parent directory: nothing to move
        visiting.add(name)
        if name:
            move(name.rpartition("/")[0], required=False)
        m = remaining.get(name)
        if m is not None and m.info.type == tarfile.LNKTYPE:
            move(m.info.linkname, required=False)
        m = remaining.pop(name, None)
        if m is not None:
            moved[name] = m
        visiting.discard(name)

    missing: list[str] = []
    for p in prioritized:
        try:
            move(p, required=True)
        except _NotFoundError as exc:
            if not allow_missing:
                raise FormatError(f"prioritized file {p!r} is not in the layer") from exc
            missing.append(p)
    landmark = PREFETCH_LANDMARK if prioritized else NO_PREFETCH_LANDMARK
    return [*moved.values(), _landmark(landmark), *remaining.values()], missing


def _simple_header(name: str, size: int) -> bytes:
    # Go's tar.Writer for a bare Header{Name, Typeflag: TypeReg, Size}: mode 0, mtime 0, USTAR.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0
    info.mtime = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _landmark(name: str) -> _Member:
    header = _simple_header(name, len(LANDMARK_CONTENTS))
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(LANDMARK_CONTENTS), 0, 0
    return _Member(name, info, header, memoryview(LANDMARK_CONTENTS))


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


def _modtime(mtime: float) -> str:
    # formatModtime: zero time → omitted; else UTC rounded to the second (half away from zero).
    secs = math.floor(mtime + 0.5) if mtime >= 0 else math.ceil(mtime - 0.5)
    if secs == 0:
        return ""
    try:
        return datetime.fromtimestamp(secs, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return ""


class _Streams:
    """The output blob as a sequence of compressed streams, plus the uncompressed hash."""

    def __init__(self, compression: Compression, level: int) -> None:
        self.out = bytearray()
        self._pending = bytearray()
        self.diff = hashlib.sha256()
        self.uncompressed_size = 0
        self._compression = compression
        self._level = level
        self._zstd = zstandard.ZstdCompressor(level=level) if compression is Compression.ZSTD else None

    def write(self, data: bytes | memoryview) -> None:
        self.diff.update(data)
        self.uncompressed_size += len(data)
        self._pending += data

    def close_stream(self) -> int:
        """End the open stream (if any); returns the offset where the next stream starts."""
        if self._pending:
            self.out += self.compress(bytes(self._pending))
            self._pending.clear()
        return len(self.out)

    def compress(self, data: bytes) -> bytes:
        if self._zstd is not None:
            return self._zstd.compress(data)
        c = zlib.compressobj(self._level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return c.compress(data) + c.flush()


@dataclass
class _TocWriter:
    """Collects TOC entries the way estargz.Writer.appendTar does."""

    chunk_size: int
    entries: list[dict[str, object]] = field(default_factory=list)
    _last_uname: dict[int, str] = field(default_factory=dict)
    _last_gname: dict[int, str] = field(default_factory=dict)

    def _name_if_changed(self, seen: dict[int, str], ident: int, name: str) -> str:
        if not name or seen.get(ident) == name:
            return ""
        seen[ident] = name
        return name

    def base_entry(self, m: _Member) -> dict[str, object]:
        info = m.info
        name = info.name + "/" if info.isdir() and not info.name.endswith("/") else info.name
        xattrs = {
            k[len(_XATTR_PREFIX) :]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
            for k, v in info.pax_headers.items()
            if k.startswith(_XATTR_PREFIX)
        }
        ent: dict[str, object] = {
            "name": name,
            "type": "reg" if info.isreg() else _TAR_TYPES[info.type],
            "modtime": _modtime(info.mtime),
            "mode": info.mode,
            "uid": info.uid,
            "gid": info.gid,
            "userName": self._name_if_changed(self._last_uname, info.uid, info.uname),
            "groupName": self._name_if_changed(self._last_gname, info.gid, info.gname),
            "xattrs": xattrs,
        }
        if info.issym() or info.islnk():
            ent["linkName"] = info.linkname
        if info.isreg():
            ent["size"] = info.size
        if info.ischr() or info.isblk():
            ent["devMajor"], ent["devMinor"] = info.devmajor, info.devminor
        return ent

    def append(self, m: _Member, streams: _Streams) -> None:
        streams.write(m.header)
        ent = self.base_entry(m)
        size = m.info.size if m.info.isreg() else 0
        if size == 0:
            self.entries.append(ent)
            if m.info.isreg():
                ent["digest"] = "sha256:" + hashlib.sha256(b"").hexdigest()
            return
        first, written = ent, 0
        whole = hashlib.sha256()
        while written < size:
            ent["offset"] = streams.close_stream()  # every chunk starts a new stream
            n = min(self.chunk_size, size - written)
            if size - written >= self.chunk_size:
                ent["chunkSize"] = self.chunk_size
            ent["chunkOffset"] = written
            piece = m.payload[written : written + n]
            streams.write(piece)
            whole.update(piece)
            ent["chunkDigest"] = "sha256:" + hashlib.sha256(piece).hexdigest()
            self.entries.append(ent)
            written += n
            ent = {"name": m.info.name, "type": "chunk"}
        first["digest"] = "sha256:" + whole.hexdigest()
        streams.write(_padding(size))


# -- Go-compatible JSON -------------------------------------------------------------------

_SAFE_JSON = re.compile(r'[^"\\\x00-\x1f<>&\u2028\u2029\ud800-\udfff]*')
_GO_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _go_string(s: str) -> str:
    """A JSON string as Go's encoding/json writes it (HTML-safe escapes, \\ufffd for bad bytes)."""
    if _SAFE_JSON.fullmatch(s):
        return '"' + s + '"'
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif 0xD800 <= o <= 0xDFFF:  # undecodable byte kept by surrogateescape
            out.append("\\ufffd")
        elif o < 0x20 or ch in "<>&" or o in (0x2028, 0x2029):
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_json(value: object, indent: str) -> str:
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, bool) or not isinstance(value, (int, dict, list)):
        raise TypeError(f"unexpected TOC value {value!r}")
    if isinstance(value, int):
        return str(value)
    inner = indent + "\t"
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{_go_string(k)}: {_go_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if not value:
        return "[]"
    return "[\n" + ",\n".join(inner + _go_json(v, inner) for v in value) + "\n" + indent + "]"


def _omit_empty(ent: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in _FIELD_ORDER:
        value = ent.get(key)
        if value in (None, 0, "", {}):
            continue
        out[key] = dict(sorted(value.items())) if isinstance(value, dict) else value
    return out


def toc_json(entries: Iterable[dict[str, object]]) -> bytes:
    """The TOC JSON exactly as Go's ``json.MarshalIndent(toc, "", "\\t")`` would write it."""
    doc = {"version": TOC_VERSION, "entries": [_omit_empty(e) for e in entries]}
    return _go_json(doc, "").encode("utf-8")


# -- TOC + footer ---------------------------------------------------------------------------


def estargz_toc_and_footer(
    toc: bytes, toc_offset: int, level: int = DEFAULT_GZIP_LEVEL
) -> tuple[bytes, bytes]:
    """(uncompressed TOC tar, its gzip member + 51-byte footer) for a TOC at ``toc_offset``."""
    tar = _simple_header(TOC_TAR_NAME, len(toc)) + toc + _padding(len(toc)) + b"\0" * (2 * _BLOCK)
    c = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return tar, c.compress(tar) + c.flush() + estargz.gzip_footer(toc_offset)


def zstdchunked_toc_and_footer(
    toc: bytes, toc_offset: int, level: int = DEFAULT_ZSTD_LEVEL
) -> tuple[bytes, dict[str, str]]:
    """(TOC skippable frame + 40-byte footer frame, manifest annotations) for ctr-remote's layout."""
    compressed = zstandard.ZstdCompressor(level=level).compress(toc)
    payload_offset = toc_offset + zstdchunked.SKIPPABLE_HEADER_SIZE
    tail = zstdchunked.skippable_frame(compressed) + zstdchunked.skippable_frame(
        zstdchunked.sgz_footer(payload_offset, len(compressed), len(toc))
    )
    annotations = {
        zstdchunked.MANIFEST_CHECKSUM_ANNOTATION: "sha256:" + hashlib.sha256(compressed).hexdigest(),
        zstdchunked.MANIFEST_POSITION_ANNOTATION: (
            f"{payload_offset}:{len(compressed)}:{len(toc)}:{zstdchunked.MANIFEST_TYPE_CRFS}"
        ),
    }
    return tail, annotations


# -- public builders ----------------------------------------------------------------------


def build_blob(
    tar: bytes,
    compression: Compression,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized_files: Sequence[str] = (),
    compression_level: int | None = None,
    allow_missing_prioritized: bool = False,
) -> BuiltBlob:
    """Build an eStargz (GZIP) or zstd:chunked (ZSTD) blob from a tar (optionally gzip/zstd'd).

    ``prioritized_files`` are moved first in the given order (with their parent directories
    and hardlink targets) and followed by ``.prefetch.landmark``; with none, the layer starts
    with ``.no.prefetch.landmark``. A prioritized path that is not in the layer raises
    FormatError unless ``allow_missing_prioritized`` (then it is listed in the result).
    """
    if compression not in (Compression.GZIP, Compression.ZSTD):
        raise ValueError(f"cannot build a stargz blob with {compression}")
    if chunk_size <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    gz = compression is Compression.GZIP
    level = (
        compression_level
        if compression_level is not None
        else (DEFAULT_GZIP_LEVEL if gz else DEFAULT_ZSTD_LEVEL)
    )
    members, missing = _sort_members(
        _read_tar(_maybe_decompress(tar)), prioritized_files, allow_missing_prioritized
    )
    streams = _Streams(compression, level)
    writer = _TocWriter(chunk_size)
    for m in members:
        writer.append(m, streams)
    toc_offset = streams.close_stream()
    toc = toc_json(writer.entries)
    toc_digest = "sha256:" + hashlib.sha256(toc).hexdigest()
    annotations = {TOC_DIGEST_ANNOTATION: toc_digest}
    if gz:
        # The TOC tar entry is part of the layer's tar stream, hence of the DiffID.
        toc_tar, tail = estargz_toc_and_footer(toc, toc_offset, level)
        streams.diff.update(toc_tar)
        streams.uncompressed_size += len(toc_tar)
    else:
        # Like ctr-remote: the TOC lives in skippable frames, outside the tar stream.
        tail, extra = zstdchunked_toc_and_footer(toc, toc_offset, level)
        annotations.update(extra)
    annotations[UNCOMPRESSED_SIZE_ANNOTATION] = str(streams.uncompressed_size)
    return BuiltBlob(
        blob=bytes(streams.out + tail),
        media_type=MEDIA_TYPE_GZIP if gz else MEDIA_TYPE_ZSTD,
        toc_digest=toc_digest,
        diff_id="sha256:" + streams.diff.hexdigest(),
        uncompressed_size=streams.uncompressed_size,
        toc_offset=toc_offset,
        toc_json=toc,
        annotations=annotations,
        missing_prioritized=tuple(missing),
    )


def build_estargz(
    tar: bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized_files: Sequence[str] = (),
    compression_level: int = DEFAULT_GZIP_LEVEL,
    allow_missing_prioritized: bool = False,
) -> BuiltBlob:
    """eStargz with the 51-byte footer; see ``build_blob``."""
    return build_blob(
        tar,
        Compression.GZIP,
        chunk_size=chunk_size,
        prioritized_files=prioritized_files,
        compression_level=compression_level,
        allow_missing_prioritized=allow_missing_prioritized,
    )


def build_zstdchunked(
    tar: bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized_files: Sequence[str] = (),
    compression_level: int = DEFAULT_ZSTD_LEVEL,
    allow_missing_prioritized: bool = False,
) -> BuiltBlob:
    """zstd:chunked with ctr-remote's 40-byte footer; see ``build_blob``."""
    return build_blob(
        tar,
        Compression.ZSTD,
        chunk_size=chunk_size,
        prioritized_files=prioritized_files,
        compression_level=compression_level,
        allow_missing_prioritized=allow_missing_prioritized,
    )
