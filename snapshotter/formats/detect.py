"""Entry points for stargz-family blobs: find the TOC from the blob's tail, parse and verify it,
and decompress and verify one chunk.

Callers fetch ``MAX_FOOTER_SIZE`` bytes from the blob's end, call ``locate_toc``, fetch
``[location.offset, location.offset + location.length)``, call ``parse_toc``, and later use
``decode_stream`` on the compressed range of the chunks that share a stream (or
``decompress_chunk`` on one chunk's). Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from snapshotter.formats import deflate_resume, estargz, zstdchunked
from snapshotter.formats.bounds import DEFAULT_MAX_CHUNK_BYTES
from snapshotter.formats.index import Chunk, Compression, FormatError, LayerIndex, ResumePoint
from snapshotter.formats.toc import check_digest, index_from_toc_text

# The 64-byte containers/storage footer plus its skippable-frame header is the largest footer;
# it also covers the 51/47-byte gzip ones and ctr-remote's 40 + 8.
MAX_FOOTER_SIZE = zstdchunked.CS_FOOTER_SIZE + zstdchunked.SKIPPABLE_HEADER_SIZE
DEFAULT_MAX_TOC_BYTES = 64 << 20
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
_EMPTY_ANNOTATIONS: Mapping[str, str] = {}


class ChunkDigestError(FormatError):
    """A chunk decompressed fine but its sha256 differs from the TOC's chunk digest."""


@dataclass(frozen=True)
class TocLocation:
    """Where a blob's TOC is and how to read it.

    ``offset``/``length``: the compressed TOC bytes to fetch (for eStargz the whole TOC gzip
    member, for zstd:chunked the zstd frame inside the skippable frame). ``footer_size``: blob
    bytes the footer occupies at the end (0 when the position came from annotations and no
    footer was recognized). ``uncompressed_length``: the TOC JSON size when the format records it.
    """

    format: str
    compression: Compression
    offset: int
    length: int
    footer_size: int
    uncompressed_length: int | None = None

    @property
    def metadata_start(self) -> int:
        """Where the format's metadata begins: chunk data must end before this offset."""
        if self.compression is Compression.ZSTD:
            return self.offset - zstdchunked.SKIPPABLE_HEADER_SIZE
        return self.offset


def toc_digest_from_annotations(annotations: Mapping[str, str]) -> str | None:
    """The digest a caller should pass to ``parse_toc``: SGZ's toc.digest, else manifest-checksum."""
    return annotations.get(TOC_DIGEST_ANNOTATION) or zstdchunked.checksum_from_annotations(annotations)


def _zstd_location(pos: zstdchunked.ManifestPosition, blob_size: int, source: str) -> TocLocation:
    end = blob_size - pos.footer_size
    if pos.offset < zstdchunked.SKIPPABLE_HEADER_SIZE or pos.compressed_length <= 0:
        raise FormatError(f"{source}: TOC at {pos.offset} (+{pos.compressed_length}) is not a valid position")
    if pos.offset + pos.compressed_length > end:
        raise FormatError(
            f"{source}: TOC at {pos.offset} (+{pos.compressed_length}) points outside the blob "
            f"(data ends at {end})"
        )
    return TocLocation(
        format=zstdchunked.FORMAT,
        compression=Compression.ZSTD,
        offset=pos.offset,
        length=pos.compressed_length,
        footer_size=pos.footer_size,
        uncompressed_length=pos.uncompressed_length,
    )


def _gzip_location(
    fmt: str, parse: Callable[[bytes], int], size: int, tail: bytes, blob_size: int
) -> TocLocation:
    if len(tail) < size:
        raise FormatError(f"blob too short for a {size}-byte footer")
    toc_offset = parse(tail[-size:])
    if toc_offset >= blob_size - size:
        raise FormatError(
            f"{size}-byte footer: TOC offset {toc_offset} points outside the blob "
            f"(footer starts at {blob_size - size})"
        )
    return TocLocation(
        format=fmt,
        compression=Compression.GZIP,
        offset=toc_offset,
        length=blob_size - size - toc_offset,
        footer_size=size,
    )


def locate_toc(
    tail: bytes, blob_size: int, annotations: Mapping[str, str] = _EMPTY_ANNOTATIONS
) -> TocLocation:
    """Find the TOC from the blob's last ``min(MAX_FOOTER_SIZE, blob_size)`` bytes.

    zstd:chunked position annotations, when present, win over any footer (containers/storage
    itself never reads the footer). Otherwise the footers are tried in turn: zstd:chunked
    (64 or 40 bytes, told apart by their magic), eStargz (51), legacy stargz (47).
    """
    if blob_size < 0 or len(tail) > blob_size:
        raise FormatError(f"tail of {len(tail)} bytes is longer than the blob ({blob_size} bytes)")
    pos = zstdchunked.position_from_annotations(annotations)
    if pos is not None:
        try:
            footer_size = zstdchunked.parse_footer(tail).footer_size
        except FormatError:
            footer_size = 0
        pos = zstdchunked.ManifestPosition(
            pos.offset, pos.compressed_length, pos.uncompressed_length, footer_size
        )
        return _zstd_location(pos, blob_size, "zstd:chunked annotation")
    problems: list[str] = []
    try:
        return _zstd_location(zstdchunked.parse_footer(tail), blob_size, "zstd:chunked footer")
    except FormatError as exc:
        problems.append(str(exc))
    gzip_kinds = (
        (estargz.FORMAT, estargz.parse_gzip_footer, estargz.FOOTER_SIZE),
        (estargz.LEGACY_FORMAT, estargz.parse_legacy_footer, estargz.LEGACY_FOOTER_SIZE),
    )
    for fmt, parse, size in gzip_kinds:
        try:
            return _gzip_location(fmt, parse, size, tail, blob_size)
        except FormatError as exc:
            problems.append(str(exc))
    raise FormatError("no eStargz or zstd:chunked footer found: " + "; ".join(problems))


def read_toc_json(raw: bytes, location: TocLocation, *, max_toc_bytes: int = DEFAULT_MAX_TOC_BYTES) -> bytes:
    """The uncompressed TOC JSON bytes (unverified); ``raw`` as for ``parse_toc``."""
    return bytes(_toc_json(raw, location, max_toc_bytes))


def _toc_json(raw: bytes, location: TocLocation, max_toc_bytes: int) -> bytes | bytearray:
    if len(raw) != location.length:
        raise FormatError(f"TOC: got {len(raw)} bytes, the footer says {location.length}")
    if location.length > max_toc_bytes:
        raise FormatError(
            f"TOC is {location.length} compressed bytes, larger than the {max_toc_bytes}-byte limit"
        )
    if location.compression is Compression.ZSTD:
        return zstdchunked.decompress_toc(raw, location.uncompressed_length, max_toc_bytes)
    return estargz.decompress_toc(raw, max_toc_bytes)


def _verify_toc(raw: bytes, toc_json: bytes | bytearray, location: TocLocation, expected: str) -> None:
    check_digest(expected, "expected TOC digest")
    got = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    if got == expected:
        return
    # zstd:chunked's manifest-checksum covers the compressed TOC instead of the JSON.
    if location.compression is Compression.ZSTD and "sha256:" + hashlib.sha256(raw).hexdigest() == expected:
        return
    raise FormatError(f"TOC digest mismatch: TOC JSON is {got}, expected {expected}")


def parse_toc(
    raw: bytes,
    location: TocLocation,
    *,
    blob_size: int,
    expected_digest: str | None,
    max_toc_bytes: int = DEFAULT_MAX_TOC_BYTES,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    verify: bool = True,
) -> LayerIndex:
    """Decompress, verify and validate the TOC; ``raw`` = blob[offset : offset + length].

    ``expected_digest`` is the manifest's toc.digest annotation (for zstd:chunked the
    manifest-checksum of the compressed TOC is accepted too). Without one, FormatError unless
    ``verify=False`` is passed explicitly (an unverified TOC lets a registry serve anything).
    ``max_chunk_bytes`` bounds how far into its stream any chunk may end (innerOffset + size).
    """
    if expected_digest is None and verify:
        raise FormatError("no TOC digest to verify against (pass verify=False to skip verification)")
    toc_json = _toc_json(raw, location, max_toc_bytes)
    if expected_digest is not None:
        _verify_toc(raw, toc_json, location, expected_digest)
    try:  # as json.loads decodes bytes
        text = toc_json.decode(json.detect_encoding(toc_json), "surrogatepass")
    except UnicodeDecodeError as exc:
        raise FormatError(f"TOC is not valid JSON: {exc}") from exc
    del toc_json  # up to max_toc_bytes that the index does not need while it is built
    # Entry by entry: the whole document as Python objects would cost several times the JSON.
    return index_from_toc_text(
        text,
        format=location.format,
        compression=location.compression,
        toc_offset=location.metadata_start,
        blob_size=blob_size,
        max_chunk_bytes=max_chunk_bytes,
    )


def chunk_digest_ok(data: bytes, digest: str) -> bool:
    """True when ``data`` hashes to ``digest`` ("sha256:<hex>")."""
    return digest == "sha256:" + hashlib.sha256(data).hexdigest()


def inflate_prefix(compression: Compression, data: bytes, want: int) -> bytes:
    """At most ``want`` uncompressed bytes from the start of the stream ``data`` (fewer only if
    it ends cleanly before); the output bound holds whatever the stream claims."""
    if compression is Compression.GZIP:
        return estargz.gunzip_prefix(data, want)
    if compression is Compression.ZSTD:
        return zstdchunked.unzstd_prefix(data, want)
    if compression is Compression.GZIP_SPAN:
        raise FormatError("a gzip span is inflated from its checkpoint (inflate_span)")
    return bytes(data[:want])


def inflate_span(data: bytes, resume: ResumePoint | None, want: int) -> bytes:
    """At most ``want`` bytes of a gzip span (Compression.GZIP_SPAN) inflated from its checkpoint
    ``resume``; bounded like ``inflate_prefix``."""
    if resume is None:
        raise FormatError("a gzip span without its checkpoint")
    window = _window(resume.window)
    return deflate_resume.inflate_from(data, resume.bit, window, want, member_start=resume.member_start)


def _window(frame: bytes) -> bytes:
    """A checkpoint's window from its zstd frame (bounded: a window is at most 32 KiB)."""
    if not frame:
        return b""
    return zstdchunked.unzstd_prefix(frame, deflate_resume.WINDOW_SIZE)


def _where(chunk: Chunk) -> str:
    return (
        f"chunk at blob offset {chunk.compressed_offset}, inner offset {chunk.inner_offset} "
        f"(file offset {chunk.file_offset})"
    )


def decode_stream(
    compression: Compression,
    data: bytes,
    chunks: Sequence[Chunk],
    *,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    resume: ResumePoint | None = None,
) -> list[bytes]:
    """The verified bytes of each of ``chunks``, in order; they all lie in the one stream that
    ``data`` (their shared compressed range) starts with (for GZIP_SPAN, inflated from the
    checkpoint ``resume``).

    The stream is inflated once, up to the end of the furthest chunk, however many chunks share
    it (ctr-remote's --estargz-min-chunk-size packs many small files into one stream), and never
    beyond ``max_chunk_bytes``. FormatError when the stream is corrupt or too short or a chunk
    ends beyond the limit; ChunkDigestError when a chunk's bytes do not match its digest.
    """
    if not chunks:
        return []
    furthest = max(chunks, key=lambda c: c.inner_offset + c.size)
    want = furthest.inner_offset + furthest.size
    if want > max_chunk_bytes:
        raise FormatError(
            f"{_where(furthest)}: ends {want} bytes into its stream, beyond the "
            f"{max_chunk_bytes}-byte chunk limit"
        )
    if compression is Compression.GZIP_SPAN:
        out = inflate_span(data, resume, want)
    else:
        out = inflate_prefix(compression, data, want)
    view = memoryview(out)
    pieces: list[bytes] = []
    for c in chunks:
        end = c.inner_offset + c.size
        if len(out) < end:
            raise FormatError(f"{_where(c)}: stream holds {len(out)} bytes, need {end}")
        # The one chunk of a stream is the whole output: no copy.
        piece = out if c.inner_offset == 0 and end == len(out) else bytes(view[c.inner_offset : end])
        if not chunk_digest_ok(piece, c.digest):
            raise ChunkDigestError(f"{_where(c)}: digest mismatch, want {c.digest}")
        pieces.append(piece)
    return pieces


def decompress_chunk(
    compression: Compression, data: bytes, chunk: Chunk, *, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> bytes:
    """Exactly ``chunk.size`` verified bytes of a chunk from its compressed range ``data``;
    ``decode_stream`` for one chunk (its errors too)."""
    return decode_stream(compression, data, [chunk], max_chunk_bytes=max_chunk_bytes)[0]
