"""Entry points for stargz-family blobs: find the TOC from the blob's tail, parse and verify it,
and decompress and verify one chunk.

Callers fetch ``MAX_FOOTER_SIZE`` bytes from the blob's end, call ``locate_toc``, fetch
``[location.offset, location.offset + location.length)``, call ``parse_toc``, and later use
``decompress_chunk`` on each chunk's compressed range. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from snapshotter.formats import estargz, zstdchunked
from snapshotter.formats.index import Chunk, Compression, FormatError, LayerIndex
from snapshotter.formats.toc import check_digest, index_from_toc

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
    if len(raw) != location.length:
        raise FormatError(f"TOC: got {len(raw)} bytes, the footer says {location.length}")
    if location.length > max_toc_bytes:
        raise FormatError(
            f"TOC is {location.length} compressed bytes, larger than the {max_toc_bytes}-byte limit"
        )
    if location.compression is Compression.ZSTD:
        return zstdchunked.decompress_toc(raw, location.uncompressed_length, max_toc_bytes)
    return estargz.decompress_toc(raw, max_toc_bytes)


def _verify_toc(raw: bytes, toc_json: bytes, location: TocLocation, expected: str) -> None:
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
    verify: bool = True,
) -> LayerIndex:
    """Decompress, verify and validate the TOC; ``raw`` = blob[offset : offset + length].

    ``expected_digest`` is the manifest's toc.digest annotation (for zstd:chunked the
    manifest-checksum of the compressed TOC is accepted too). Without one, FormatError unless
    ``verify=False`` is passed explicitly (an unverified TOC lets a registry serve anything).
    """
    if expected_digest is None and verify:
        raise FormatError("no TOC digest to verify against (pass verify=False to skip verification)")
    toc_json = read_toc_json(raw, location, max_toc_bytes=max_toc_bytes)
    if expected_digest is not None:
        _verify_toc(raw, toc_json, location, expected_digest)
    try:
        toc = json.loads(toc_json)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"TOC is not valid JSON: {exc}") from exc
    return index_from_toc(
        toc,
        format=location.format,
        compression=location.compression,
        toc_offset=location.metadata_start,
        blob_size=blob_size,
    )


def chunk_digest_ok(data: bytes, digest: str) -> bool:
    """True when ``data`` hashes to ``digest`` ("sha256:<hex>")."""
    return digest == "sha256:" + hashlib.sha256(data).hexdigest()


def decompress_chunk(compression: Compression, data: bytes, chunk: Chunk) -> bytes:
    """Exactly ``chunk.size`` verified bytes of a chunk from its compressed range ``data``.

    Decompresses no more than ``inner_offset + size`` bytes. FormatError when the stream is
    corrupt or too short; ChunkDigestError when the bytes do not match ``chunk.digest``.
    """
    want = chunk.inner_offset + chunk.size
    if compression is Compression.GZIP:
        out = estargz.gunzip_prefix(data, want)
    elif compression is Compression.ZSTD:
        out = zstdchunked.unzstd_prefix(data, want)
    else:
        out = bytes(data[:want])
    if len(out) < want:
        raise FormatError(
            f"chunk at blob offset {chunk.compressed_offset}: stream holds {len(out)} bytes, need {want}"
        )
    piece = out[chunk.inner_offset :]
    if not chunk_digest_ok(piece, chunk.digest):
        raise ChunkDigestError(
            f"chunk at blob offset {chunk.compressed_offset} (file offset {chunk.file_offset}): "
            f"digest mismatch, want {chunk.digest}"
        )
    return piece
