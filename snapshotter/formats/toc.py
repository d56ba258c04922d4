"""The stargz-family TOC JSON (eStargz and zstd:chunked share it) → a validated ``LayerIndex``.

The JSON text is read entry by entry (``index_from_toc_text``), so a large TOC never exists as a
whole document of Python objects; ``index_from_toc`` takes an already decoded document.

Owns: TOC entry validation (names, types, sizes, digests, hardlinks, chunk tiling, chunks
within the chunk limit and not overlapping in their stream), the landmark names, and the
computation of each chunk's compressed range (bounded by ``bounds.compressed_bound``). No I/O.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

from snapshotter.formats.bounds import DEFAULT_MAX_CHUNK_BYTES, compressed_bound
from snapshotter.formats.index import (
    NO_XATTRS,
    Chunk,
    Compression,
    Entry,
    EntryType,
    FormatError,
    LayerIndex,
)

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_NAMES = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
LANDMARK_CONTENTS = b"\x0f"
TOC_VERSION = 1
INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
_ID_MAX = (1 << 32) - 1

_TYPES: dict[str, EntryType] = {t.value: t for t in EntryType}
_CHUNK_TYPE = "chunk"
# containers/storage marks chunks of zeros; their bytes are still in the blob, so they read
# like data chunks.
_CHUNK_KINDS = frozenset({"", "data", "zeros"})
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_RFC3339_RE = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d\d):(\d\d))"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# An empty, "." or ".." component (a leading, trailing or doubled "/" included), or a NUL.
_NOT_NORMAL_RE = re.compile(r"(?:^|/)\.{0,2}(?:/|$)|\x00")
_JSON_SPACE_RE = re.compile(r"[ \t\n\r]*")
_JSON_NEXT_RE = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")  # between two array elements, or the end
_JSON = json.JSONDecoder()
_MTIME_CACHE_SIZE = 4096  # distinct modtime strings remembered per TOC (layers share a few)


def normalize_name(raw: object) -> str:
    """A TOC name as the index keys it: no leading "/" or "./", no trailing "/", no "." parts."""
    if not isinstance(raw, str):
        raise FormatError(f"entry name {raw!r} is not a string")
    if not _NOT_NORMAL_RE.search(raw):
        return raw  # already normal (the usual case): keep the string, no copy
    if "\x00" in raw:
        raise FormatError(f"entry {raw!r}: name contains a NUL byte")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatError(f"entry {raw!r}: '..' in the name escapes the layer root")
    return "/".join(parts)


def parent_name(name: str) -> str:
    """Parent of a normalized name ("" for top-level entries)."""
    return name.rpartition("/")[0]


def missing_ancestors(name: str, present: Container[str]) -> list[str]:
    """``name`` and those of its ancestors (up to the root, "") not in ``present``, root-most
    first: what a writer adds, in order, so that every parent precedes its children."""
    chain: list[str] = []
    while name not in present:
        chain.append(name)
        if not name:
            break
        name = parent_name(name)
    return chain[::-1]


def check_digest(value: object, what: str) -> str:
    """Validate a ``sha256:<64 lowercase hex>`` digest; ``what`` names it in the error."""
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise FormatError(f"{what}: malformed digest {value!r} (want sha256:<64 hex>)")
    return value


def _int_field(raw: Mapping[str, object], key: str, name: str, *, limit: int = INT64_MAX) -> int:
    value = raw.get(key, 0)
    if type(value) is int and 0 <= value <= limit:  # the usual case, first (bool is not int here)
        return value
    if value is None:
        return 0
    # bool is an int subclass in Python; JSON true is not a number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"entry {name!r}: {key} {value!r} is not an integer")
    if value < 0 or value > limit:
        raise FormatError(f"entry {name!r}: {key} {value} is negative or overflows")
    return value


def _str_field(raw: Mapping[str, object], key: str, name: str) -> str:
    value = raw.get(key, "")
    if type(value) is str:
        return value
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FormatError(f"entry {name!r}: {key} {value!r} is not a string")
    return value


def parse_mtime_ns(value: str) -> int:
    """RFC 3339 (with up to nanosecond fractions) → ns since the epoch; "" or unparsable → 0.

    stargz-snapshotter ignores unparsable times (``time.Parse`` error dropped), so we do too:
    a bad mtime is cosmetic and must not make a layer unmountable.
    """
    m = _RFC3339_RE.fullmatch(value)
    if not m:
        return 0
    year, mon, day, hh, mm, ss = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    frac = int((m.group(7) or "").ljust(9, "0"))
    tz = UTC
    if m.group(9):
        delta = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        tz = timezone(-delta if m.group(9) == "-" else delta)
    try:
        moment = datetime(year, mon, day, hh, mm, min(ss, 59), tzinfo=tz)
    except ValueError:
        return 0
    delta = moment - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + frac


def _xattrs(raw: Mapping[str, object], name: str) -> Mapping[str, bytes]:
    value = raw.get("xattrs")
    if value is None or value == {}:
        return NO_XATTRS
    if not isinstance(value, dict):
        raise FormatError(f"entry {name!r}: xattrs is not an object")
    out: dict[str, bytes] = {}
    for key, b64 in value.items():
        if not isinstance(b64, str):
            raise FormatError(f"entry {name!r}: xattr {key!r} is not a base64 string")
        try:
            out[key] = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FormatError(f"entry {name!r}: xattr {key!r} is not valid base64") from exc
    return out


@dataclass(slots=True)
class _RawChunk:
    """A reg/chunk TOC record before its compressed size is known."""

    entry: Entry
    file_offset: int
    size: int
    offset: int
    inner_offset: int
    digest: str
    end_offset: int | None  # as recorded (containers/storage), else None
    range_end: int = 0  # where the compressed range to fetch ends, once known

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class _OpenFile:
    """The regular file whose chunk records are being collected."""

    entry: Entry
    chunks: list[_RawChunk] = field(default_factory=list)


def hardlink_target(name: str, link_name: str, earlier: Mapping[str, Entry], source: str) -> str:
    """The regular file that hardlink ``name`` (to ``link_name``) names. ``earlier``: the entries
    before it, their hardlinks already resolved to a file, so one hop suffices; ``source`` names
    where they come from in messages ("the TOC", "the layer")."""
    if not link_name:
        raise FormatError(f"entry {name!r}: hardlink without linkName")
    target = earlier.get(normalize_name(link_name))
    if target is None:
        raise FormatError(f"entry {name!r}: hardlink to {link_name!r}, which is missing or later in {source}")
    if target.type is EntryType.HARDLINK:
        return target.link_name
    if target.type is not EntryType.REG:
        raise FormatError(
            f"entry {name!r}: hardlink to {link_name!r}, which is a {target.type.value}, not a file"
        )
    return target.name


class _TocBuilder:
    """Walks the TOC entries once, validating as it goes."""

    def __init__(self, data_end: int, max_chunk_bytes: int) -> None:
        self.data_end = data_end  # chunks must lie in [0, data_end)
        # innerOffset + size of every chunk: the most of its stream a decode may inflate.
        self.max_chunk_bytes = max_chunk_bytes
        self.entries: dict[str, Entry] = {}
        self.order: list[str] = []
        self.raw_chunks: list[_RawChunk] = []
        self.current: _OpenFile | None = None
        self.prefetch_landmark_at: int | None = None
        self.no_prefetch = False
        self._mtimes: dict[str, int] = {}
        self._modes: dict[int, int] = {}  # one int object per distinct mode, not one per entry

    # -- entries ---------------------------------------------------------------------------

    def add(self, index: int, raw: object) -> None:
        if not isinstance(raw, dict):
            raise FormatError(f"TOC entry #{index} is not a JSON object")
        typ = raw.get("type")
        if not isinstance(typ, str) or (typ not in _TYPES and typ != _CHUNK_TYPE):
            raise FormatError(f"entry {raw.get('name')!r}: unknown entry type {typ!r}")
        if typ == _CHUNK_TYPE:
            self._add_chunk(raw)
            return
        self._finish_file()
        name = normalize_name(raw.get("name"))
        if name in self.entries:
            raise FormatError(f"entry {name!r}: duplicate entry in the TOC")
        entry = self._entry(raw, name, _TYPES[typ])
        self.entries[name] = entry
        self.order.append(name)
        if name == PREFETCH_LANDMARK:
            self.prefetch_landmark_at = len(self.order) - 1
        elif name == NO_PREFETCH_LANDMARK:
            self.no_prefetch = True
        if entry.type is EntryType.REG and entry.size > 0:
            self.current = _OpenFile(entry)
            self._add_chunk(raw, own=True)

    def _entry(self, raw: Mapping[str, object], name: str, typ: EntryType) -> Entry:
        if name == "" and typ is not EntryType.DIR:
            raise FormatError(f"entry {raw.get('name')!r}: the layer root must be a directory")
        mode = _int_field(raw, "mode", name) & 0o7777
        entry = Entry(
            name=name,
            type=typ,
            mode=self._modes.setdefault(mode, mode),
            uid=_int_field(raw, "uid", name, limit=_ID_MAX),
            gid=_int_field(raw, "gid", name, limit=_ID_MAX),
            mtime_ns=self._mtime_ns(_str_field(raw, "modtime", name)),
            xattrs=_xattrs(raw, name),
        )
        size = _int_field(raw, "size", name)
        if typ is EntryType.REG:
            entry.size = size
            digest = _str_field(raw, "digest", name)
            if digest:
                entry.digest = check_digest(digest, f"entry {name!r} digest")
        elif typ in (EntryType.CHAR, EntryType.BLOCK):
            entry.dev_major = _int_field(raw, "devMajor", name, limit=_ID_MAX)
            entry.dev_minor = _int_field(raw, "devMinor", name, limit=_ID_MAX)
        elif typ is EntryType.SYMLINK:
            entry.link_name = _str_field(raw, "linkName", name)
            if not entry.link_name:
                raise FormatError(f"entry {name!r}: symlink without linkName")
        elif typ is EntryType.HARDLINK:
            entry.link_name = self._hardlink_target(raw, name)
        return entry

    def _mtime_ns(self, value: str) -> int:
        ns = self._mtimes.get(value)
        if ns is None:
            ns = parse_mtime_ns(value)
            if len(self._mtimes) < _MTIME_CACHE_SIZE:
                self._mtimes[value] = ns
        return ns

    def _hardlink_target(self, raw: Mapping[str, object], name: str) -> str:
        return hardlink_target(name, _str_field(raw, "linkName", name), self.entries, "the TOC")

    # -- chunks ----------------------------------------------------------------------------

    def _add_chunk(self, raw: Mapping[str, object], *, own: bool = False) -> None:
        """A chunk record; ``own``: the regular file's record itself (its first chunk)."""
        cur = self.current
        raw_name = raw.get("name")
        if cur is None:
            raise FormatError(f"entry {raw_name!r}: chunk that follows no non-empty regular file")
        name = cur.entry.name
        # SGZ repeats the file's name on chunk records; a different name means a mangled TOC.
        if not own and raw_name not in (None, "") and normalize_name(raw_name) != name:
            raise FormatError(f"entry {raw_name!r}: chunk record inside the chunks of {name!r}")
        kind = _str_field(raw, "chunkType", name)
        if kind not in _CHUNK_KINDS:
            raise FormatError(f"entry {name!r}: unknown chunkType {kind!r}")
        file_offset = _int_field(raw, "chunkOffset", name)
        size = _int_field(raw, "chunkSize", name)
        if size == 0:  # eStargz: 0 means "up to the end of the file"
            size = cur.entry.size - file_offset
        if size <= 0 or file_offset + size > INT64_MAX:
            raise FormatError(f"entry {name!r}: chunk at file offset {file_offset} has size {size}")
        end_offset = raw.get("endOffset")
        chunk = _RawChunk(
            entry=cur.entry,
            file_offset=file_offset,
            size=size,
            offset=_int_field(raw, "offset", name),
            inner_offset=_int_field(raw, "innerOffset", name),
            digest=self._chunk_digest(raw, cur, name, file_offset, size),
            end_offset=_int_field(raw, "endOffset", name) if end_offset is not None else None,
        )
        if chunk.offset >= self.data_end:
            raise FormatError(
                f"entry {name!r}: chunk offset {chunk.offset} is beyond the data region "
                f"(ends at {self.data_end})"
            )
        if chunk.inner_offset + size > self.max_chunk_bytes:
            # Decoding inflates the stream up to the chunk's end: a chunk far inside a stream of
            # zeros would otherwise cost ~1000 times its compressed bytes in memory.
            raise FormatError(
                f"entry {name!r}: chunk at file offset {file_offset} ends at innerOffset "
                f"{chunk.inner_offset} + size {size} of its stream, beyond the "
                f"{self.max_chunk_bytes}-byte chunk limit"
            )
        cur.chunks.append(chunk)

    @staticmethod
    def _chunk_digest(
        raw: Mapping[str, object], cur: _OpenFile, name: str, file_offset: int, size: int
    ) -> str:
        digest = _str_field(raw, "chunkDigest", name)
        if digest:
            return check_digest(digest, f"entry {name!r} chunkDigest")
        # Legacy CRFS stargz has only the whole-file digest; it is the chunk digest when the
        # single chunk is the whole file (SGZ's Verifiers() falls back the same way).
        whole = file_offset == 0 and size == cur.entry.size and raw.get("type") != _CHUNK_TYPE
        if whole and cur.entry.digest:
            return cur.entry.digest
        raise FormatError(f"entry {name!r}: missing chunkDigest for the chunk at file offset {file_offset}")

    def _finish_file(self) -> None:
        """Check that the open file's chunks tile its content exactly."""
        cur, self.current = self.current, None
        if cur is None:
            return
        pos = 0
        for c in cur.chunks:
            if c.file_offset != pos:
                kind = "gap" if c.file_offset > pos else "overlap"
                raise FormatError(
                    f"entry {cur.entry.name!r}: chunks do not tile the file ({kind} at offset {pos}, "
                    f"next chunk starts at {c.file_offset})"
                )
            pos += c.size
        if pos != cur.entry.size:
            raise FormatError(
                f"entry {cur.entry.name!r}: chunk sizes sum to {pos}, file size is {cur.entry.size}"
            )
        self.raw_chunks.extend(cur.chunks)

    # -- finishing -------------------------------------------------------------------------

    def finish(self) -> None:
        """Close the last file and compute every chunk's compressed range."""
        self._finish_file()
        self.attach_chunks()

    def attach_chunks(self) -> None:
        """Give every chunk its compressed range: from its stream's start up to the next stream
        start (or the frame end containers/storage records), but never more than what the
        stream's chunks can need. The stream may go on legitimately (SGZ writes the tar headers
        of the entries that follow into it), and a chunk followed by nothing would otherwise
        make the reader fetch everything up to the TOC, however far that is."""
        # Stream by stream (one small list alive at a time) to find where each range ends, then
        # the Chunks in file order, so that each file's stay sorted.
        ordered = sorted(self.raw_chunks, key=lambda c: (c.offset, c.inner_offset, c.size))
        stream: list[_RawChunk] = []
        for offset, group in itertools.groupby(ordered, key=lambda c: c.offset):
            if stream:
                _close_stream(stream, next_start=offset)
            stream = list(group)
        if stream:
            _close_stream(stream, next_start=self.data_end)
        del ordered, stream
        for c in self.raw_chunks:
            # Positional: a few hundred thousand of these in a big layer.
            c.entry.chunks.append(
                Chunk(c.file_offset, c.size, c.offset, c.range_end - c.offset, c.inner_offset, c.digest)
            )

    def ordered_with_parents(self) -> dict[str, Entry]:
        """Entries in TOC order, each preceded by any parent directory the TOC omits."""
        out: dict[str, Entry] = {}
        for name in ["", *self.order]:
            missing: list[str] = []
            parent = parent_name(name) if name else None
            while parent is not None and parent not in out and parent not in self.entries:
                missing.append(parent)
                parent = parent_name(parent) if parent else None
            for p in reversed(missing):
                out[p] = Entry(name=p, type=EntryType.DIR, mode=0o755)
            if name in self.entries:
                out[name] = self.entries[name]
            elif name == "":
                out[""] = Entry(name="", type=EntryType.DIR, mode=0o755)
        for name in out:
            parent_entry = out.get(parent_name(name)) if name else None
            if parent_entry is not None and parent_entry.type is not EntryType.DIR:
                raise FormatError(
                    f"entry {name!r}: parent {parent_entry.name!r} is a {parent_entry.type.value}"
                )
        return out

    def prefetch(self) -> tuple[list[str], int]:
        """Prioritized names and the blob offset that ends the prioritized region."""
        at = self.prefetch_landmark_at
        if at is None:
            return [], 0
        if self.no_prefetch:
            raise FormatError(f"both {PREFETCH_LANDMARK!r} and {NO_PREFETCH_LANDMARK!r} are present")
        names = self.order[:at]
        landmark = self.entries[PREFETCH_LANDMARK]
        if not landmark.chunks:
            raise FormatError(f"entry {PREFETCH_LANDMARK!r}: landmark has no content")
        end = landmark.chunks[0].compressed_offset
        last = max(
            (c.compressed_offset + c.compressed_size for n in names for c in self.entries[n].chunks),
            default=0,
        )
        if last > end:
            # Newer SGZ (min chunk size) may pack the landmark into the stream of the last
            # prioritized file: then the region ends where that shared stream ends.
            end = landmark.chunks[0].compressed_offset + landmark.chunks[0].compressed_size
            if last > end:
                raise FormatError(f"entry {PREFETCH_LANDMARK!r}: prioritized chunks extend past the landmark")
        return names, end


def _close_stream(chunks: list[_RawChunk], *, next_start: int) -> None:
    """Set ``range_end`` of the chunks of one stream (sorted by inner offset), the next stream
    starting at ``next_start``; FormatError when two of them overlap (honest writers put each
    chunk's bytes in a stream once: overlapping chunks would let N records over one stream
    decode to N different chunks, each up to the chunk limit)."""
    offset = chunks[0].offset
    prev = chunks[0]
    for c in chunks[1:]:
        if c.inner_offset < prev.inner_offset + prev.size:
            if (c.inner_offset, c.size, c.digest) == (prev.inner_offset, prev.size, prev.digest):
                continue  # the same chunk listed twice (equal files): one chunk, not an overlap
            raise FormatError(
                f"entry {c.name!r}: chunk at innerOffset {c.inner_offset} (+{c.size}) overlaps the "
                f"chunk of {prev.name!r} at innerOffset {prev.inner_offset} (+{prev.size}) in the "
                f"stream at blob offset {offset}"
            )
        prev = c
    cap = offset + compressed_bound(prev.inner_offset + prev.size)
    for c in chunks:
        end = next_start
        if c.end_offset is not None:
            # containers/storage records where the frame ends; trust it only inside the range.
            if not offset < c.end_offset <= end:
                raise FormatError(f"entry {c.name!r}: endOffset {c.end_offset} outside ({offset}, {end}]")
            end = c.end_offset
        c.range_end = min(end, cap)


def _check_toc_offset(toc_offset: int, blob_size: int) -> None:
    if not 0 <= toc_offset <= blob_size:
        raise FormatError(f"TOC offset {toc_offset} is outside the blob (size {blob_size})")


def _check_version(version: object) -> None:
    if version != TOC_VERSION or isinstance(version, bool):
        raise FormatError(f"unsupported TOC version {version!r} (want {TOC_VERSION})")


def _index(
    builder: _TocBuilder, *, format: str, compression: Compression, toc_offset: int, blob_size: int
) -> LayerIndex:
    builder.finish()
    entries = builder.ordered_with_parents()
    prefetch, prefetch_end = builder.prefetch()
    return LayerIndex(
        format=format,
        compression=compression,
        entries=entries,
        prefetch=prefetch,
        prefetch_end=prefetch_end,
        no_prefetch=builder.no_prefetch,
        toc_offset=toc_offset,
        blob_size=blob_size,
    )


def index_from_toc(
    toc: object,
    *,
    format: str,
    compression: Compression,
    toc_offset: int,
    blob_size: int,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> LayerIndex:
    """Validate a decoded TOC JSON document and build the layer index.

    ``toc_offset`` is where the format's metadata starts in the blob (the TOC gzip member, or
    the skippable frame holding the zstd:chunked TOC); every chunk must lie before it.
    ``max_chunk_bytes`` bounds innerOffset + size of every chunk (see ``bounds``).
    ``index_from_toc_text`` does the same from the JSON text at a fraction of the memory.
    """
    _check_toc_offset(toc_offset, blob_size)
    if not isinstance(toc, dict):
        raise FormatError("TOC JSON is not an object")
    _check_version(toc.get("version"))
    raw_entries = toc.get("entries")
    if not isinstance(raw_entries, list):
        raise FormatError("TOC has no entries list")
    builder = _TocBuilder(data_end=toc_offset, max_chunk_bytes=max_chunk_bytes)
    for i, raw in enumerate(raw_entries):
        builder.add(i, raw)
    return _index(builder, format=format, compression=compression, toc_offset=toc_offset, blob_size=blob_size)


def index_from_toc_text(
    text: str,
    *,
    format: str,
    compression: Compression,
    toc_offset: int,
    blob_size: int,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> LayerIndex:
    """``index_from_toc`` for the TOC's JSON text, decoding one entry at a time.

    The whole document never exists as Python objects (about 800 bytes per entry, several
    times the JSON): each entry is validated and dropped as soon as it is decoded.
    """
    _check_toc_offset(toc_offset, blob_size)
    builder = _TocBuilder(data_end=toc_offset, max_chunk_bytes=max_chunk_bytes)
    try:
        _read_toc_text(text, builder)
    except FormatError:
        raise
    except (ValueError, RecursionError) as exc:  # json.JSONDecodeError, too many digits, nesting
        raise FormatError(f"TOC is not valid JSON: {exc}") from exc
    return _index(builder, format=format, compression=compression, toc_offset=toc_offset, blob_size=blob_size)


def _skip_space(text: str, pos: int) -> int:
    match = _JSON_SPACE_RE.match(text, pos)
    return match.end() if match else pos


def _expect(text: str, pos: int, allowed: str) -> str:
    char = text[pos : pos + 1]
    if not char or char not in allowed:
        found = repr(char) if char else "the end"
        raise json.JSONDecodeError(f"expected one of {allowed!r}, found {found}", text, pos)
    return char


def _read_toc_text(text: str, builder: _TocBuilder) -> None:
    """Walk the top-level object of the TOC, feeding each element of "entries" to ``builder``
    as it is decoded; other members are decoded whole ("version" is checked)."""
    pos = _skip_space(text, 0)
    if text[pos : pos + 1] != "{":
        raise FormatError("TOC JSON is not an object")
    pos = _skip_space(text, pos + 1)
    seen: set[str] = set()
    version: object = None
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            _expect(text, pos, '"')
            key, pos = _JSON.raw_decode(text, pos)  # a JSON string: a str
            if key in seen:  # json.loads would keep the last one; a TOC has no reason to repeat
                raise FormatError(f"TOC JSON has the member {key!r} twice")
            seen.add(key)
            pos = _skip_space(text, pos)
            _expect(text, pos, ":")
            pos = _skip_space(text, pos + 1)
            if key == "entries" and text[pos : pos + 1] == "[":
                pos = _read_entries(text, pos + 1, builder)
            else:
                value, pos = _JSON.raw_decode(text, pos)
                if key == "version":
                    _check_version(value)  # Go writes it first: checked before any entry
                    version = value
                elif key == "entries":
                    raise FormatError("TOC has no entries list")
            pos = _skip_space(text, pos)
            if _expect(text, pos, ",}") == "}":
                pos += 1
                break
            pos = _skip_space(text, pos + 1)
    if _skip_space(text, pos) != len(text):
        raise json.JSONDecodeError("extra data after the TOC object", text, pos)
    _check_version(version)
    if "entries" not in seen:
        raise FormatError("TOC has no entries list")


def _read_entries(text: str, pos: int, builder: _TocBuilder) -> int:
    """Feed the elements of the array whose "[" is just before ``pos``; returns the position
    after its "]"."""
    pos = _skip_space(text, pos)
    if text[pos : pos + 1] == "]":
        return pos + 1
    index = 0
    while True:
        raw, pos = _JSON.raw_decode(text, pos)
        builder.add(index, raw)
        index += 1
        separator = _JSON_NEXT_RE.match(text, pos)  # one match per entry: ",", spaces, or "]"
        if separator is None:
            raise json.JSONDecodeError("expected ',' or ']' after an entry", text, _skip_space(text, pos))
        if separator.group(1) == "]":
            return separator.end(1)
        pos = separator.end()
