"""The layer index every format parser produces and every consumer (layer fs, chunk reader) reads.

A format (eStargz, zstd:chunked, our Nydus-like one) turns its own metadata into a ``LayerIndex``:
the file tree with attributes, and for each regular file the chunks that hold its bytes in the blob.
The index is the source of truth for a lazily mounted layer; nothing else about the format leaks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType


class FormatError(ValueError):
    """A layer's metadata (footer, TOC, bootstrap) is malformed, inconsistent or fails verification.

    The message names the problem; callers add the layer digest and registry host."""


# The xattrs of every entry that has none (most): one shared, read-only empty mapping instead of
# an empty dict per entry (64 bytes each, in indexes of up to millions of entries).
NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})


class EntryType(Enum):
    DIR = "dir"
    REG = "reg"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


# The entry type codes of lazysnap's binary indexes (the Nydus-like bootstrap, the gzip index;
# docs/FORMAT.md, docs/GZIP-INDEX.md), and what their mode fields may hold.
TYPE_CODES: Mapping[EntryType, int] = MappingProxyType(
    {
        EntryType.REG: 1,
        EntryType.DIR: 2,
        EntryType.SYMLINK: 3,
        EntryType.HARDLINK: 4,
        EntryType.CHAR: 5,
        EntryType.BLOCK: 6,
        EntryType.FIFO: 7,
    }
)
TYPES_BY_CODE: Mapping[int, EntryType] = MappingProxyType({code: t for t, code in TYPE_CODES.items()})
DEVICE_TYPES = (EntryType.CHAR, EntryType.BLOCK)
MODE_BITS = 0o7777
EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()  # what an empty file's chunk digest is


class Compression(Enum):
    GZIP = "gzip"
    ZSTD = "zstd"
    NONE = "none"
    # A span of one gzip stream (indexed gzip layers): inflated from the checkpoint the span starts
    # at (``LayerIndex.resume_points``), not from a stream header.
    GZIP_SPAN = "gzip-span"


# slots: an index holds up to millions of these (a ~100-byte Chunk instead of ~250 with a __dict__).
@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a regular file's content and where its compressed bytes are in the blob.

    To read it: fetch blob bytes [compressed_offset, compressed_offset + compressed_size),
    decompress them as one stream (a gzip member or a zstd frame), skip ``inner_offset``
    uncompressed bytes, take ``size`` bytes, and check them against ``digest``.
    """

    file_offset: int  # where this chunk starts within the file's uncompressed content
    size: int  # uncompressed bytes of this chunk
    compressed_offset: int  # blob offset of the compressed stream that holds the chunk
    # Bytes of blob to fetch from compressed_offset to decode the chunk: the stream, or the prefix
    # of it that its chunks need (never more than bounds.compressed_bound of that).
    compressed_size: int
    # Uncompressed offset of the chunk inside that stream (eStargz innerOffset); inner_offset +
    # size is within the chunk limit (bounds.DEFAULT_MAX_CHUNK_BYTES unless the parser got another).
    inner_offset: int
    digest: str  # "sha256:<hex>" of the chunk's uncompressed bytes
    # The blob holding the compressed bytes: "" for the layer's own blob, else the digest of
    # another layer blob of the same image (the Nydus-like format stores a chunk once per image).
    blob: str = ""


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where inflating resumes inside a gzip stream: a checkpoint of an indexed gzip layer.

    The compressed stream of the chunks that start here begins at the byte holding the
    checkpoint's first bit; the deflate block starts at bit ``bit`` (0-7, least significant first)
    of that byte. ``window``: a zstd frame of the (up to 32 KiB of) uncompressed bytes before the
    checkpoint that back-references may reach, b"" when none is needed. ``member_start``: the
    stream begins with a gzip member header instead (no bit offset, no window)."""

    bit: int
    window: bytes = b""
    member_start: bool = False


@dataclass(slots=True)
class Entry:
    """One path of the layer, with tar-like attributes. ``name`` is normalized: no leading "./" or
    "/", no trailing "/", no "." or ".." components; the root directory is ""."""

    name: str
    type: EntryType
    mode: int  # permission bits plus setuid/setgid/sticky (no file-type bits)
    uid: int = 0
    gid: int = 0
    size: int = 0  # regular files: uncompressed content size
    mtime_ns: int = 0
    link_name: str = ""  # symlink target, or (hardlink) the normalized name of the target entry
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=lambda: NO_XATTRS)
    digest: str = ""  # "sha256:<hex>" of the whole content, when the format records it
    chunks: list[Chunk] = field(default_factory=list)  # regular files, sorted by file_offset


@dataclass
class LayerIndex:
    """A parsed, validated layer."""

    format: str  # "estargz", "stargz" (legacy footer), "zstdchunked", "nydus", "gzindex"
    compression: Compression
    entries: dict[str, Entry]  # by normalized name, in the format's order; includes parents
    # Prioritized files (eStargz: entries before .prefetch.landmark), in access order.
    prefetch: list[str] = field(default_factory=list)
    # Blob bytes [0, prefetch_end) hold every prioritized chunk (one range request fetches them);
    # 0 when there is nothing to prefetch.
    prefetch_end: int = 0
    no_prefetch: bool = False  # the layer carries .no.prefetch.landmark
    toc_offset: int = 0  # where the format's metadata starts in the blob
    blob_size: int = 0
    # Other blobs that chunks refer to (``Chunk.blob``), digest -> size; empty for stargz formats.
    blobs: dict[str, int] = field(default_factory=dict)
    # Compression.GZIP_SPAN: the checkpoint each stream starts at, by its compressed offset.
    resume_points: dict[int, ResumePoint] = field(default_factory=dict)
    # Streams are large and shared by many chunks (the spans of an indexed gzip layer): a fetched
    # stream is decoded whole and every chunk in it kept, not only the chunks asked for.
    whole_streams: bool = False
    # Plain tar layers (indexed gzip): where each regular file's content starts in the layer's
    # uncompressed tar stream (``tar_size`` bytes), so a data blob can be laid out as that stream.
    tar_offsets: dict[str, int] = field(default_factory=dict)
    tar_size: int = 0
