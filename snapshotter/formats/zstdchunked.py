"""zstd:chunked byte layout: skippable frames, both footers, both annotation families, the TOC frame.

Two footers exist. stargz-snapshotter's ``ctr-remote`` writes a 40-byte payload (magic
"GnUlInUx"); current containers/storage writes 64 bytes (magic "GNUlInUx") that add the
tar-split position. Both sit in a zstd skippable frame at the end of the blob. Annotations
(``io.containers.zstd-chunked.*`` from SGZ, ``io.github.containers.zstd-chunked.*`` from
containers/storage) carry the same TOC position and are preferred when present.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import zstandard

from snapshotter.formats.index import FormatError

FORMAT = "zstdchunked"
SGZ_FOOTER_SIZE = 40
CS_FOOTER_SIZE = 64
SKIPPABLE_HEADER_SIZE = 8  # LE32 magic + LE32 frame size
SGZ_MAGIC = b"GnUlInUx"
CS_MAGIC = b"GNUlInUx"
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"  # 0x184D2A50; the low nibble may be anything
ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
MANIFEST_TYPE_CRFS = 1

MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"
CS_MANIFEST_CHECKSUM_ANNOTATION = "io.github.containers.zstd-chunked.manifest-checksum"
CS_MANIFEST_POSITION_ANNOTATION = "io.github.containers.zstd-chunked.manifest-position"
CS_TARSPLIT_POSITION_ANNOTATION = "io.github.containers.zstd-chunked.tarsplit-position"

# A window bigger than libzstd's default limit (128 MiB) would let a crafted frame make us
# allocate that much before producing a byte.
_MAX_WINDOW = 1 << 27


@dataclass(frozen=True)
class ManifestPosition:
    """Where the compressed TOC ("manifest") is: ``offset`` is past its skippable-frame header."""

    offset: int
    compressed_length: int
    uncompressed_length: int
    footer_size: int = 0  # bytes at the blob's end taken by the footer frame (0: not known)


def skippable_frame(payload: bytes) -> bytes:
    """Wrap ``payload`` in a zstd skippable frame (decoders ignore it)."""
    return SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


def sgz_footer(toc_offset: int, compressed_length: int, uncompressed_length: int) -> bytes:
    """The 40-byte footer payload ctr-remote writes (wrap it with ``skippable_frame``)."""
    fields = struct.pack("<4Q", toc_offset, compressed_length, uncompressed_length, MANIFEST_TYPE_CRFS)
    return fields + SGZ_MAGIC


def cs_footer(
    toc_offset: int,
    compressed_length: int,
    uncompressed_length: int,
    tarsplit: tuple[int, int, int] = (0, 0, 0),
) -> bytes:
    """The 64-byte footer payload of current containers/storage (tar-split offset/lengths added)."""
    fields = struct.pack(
        "<7Q", toc_offset, compressed_length, uncompressed_length, MANIFEST_TYPE_CRFS, *tarsplit
    )
    return fields + CS_MAGIC


def _is_skippable_header(header: bytes, payload_size: int) -> bool:
    if len(header) != SKIPPABLE_HEADER_SIZE:
        return False
    magic, size = struct.unpack("<II", header)
    return bool(magic & 0xFFFFFFF0 == 0x184D2A50 and size == payload_size)


def parse_footer(tail: bytes) -> ManifestPosition:
    """Read either zstd:chunked footer from the blob's last bytes; FormatError if there is none."""
    magic = tail[-8:]
    if magic == SGZ_MAGIC:
        size = SGZ_FOOTER_SIZE
    elif magic == CS_MAGIC:
        size = CS_FOOTER_SIZE
    else:
        raise FormatError(f"zstd:chunked footer: magic {magic!r} is neither {SGZ_MAGIC!r} nor {CS_MAGIC!r}")
    if len(tail) < size + SKIPPABLE_HEADER_SIZE:
        raise FormatError(f"zstd:chunked footer: blob too short for a {size}-byte footer frame")
    if not _is_skippable_header(tail[-size - SKIPPABLE_HEADER_SIZE : -size], size):
        raise FormatError(f"zstd:chunked footer: the {size}-byte footer is not in a skippable frame")
    offset, clen, ulen, mtype = struct.unpack_from("<4Q", tail, len(tail) - size)
    if mtype != MANIFEST_TYPE_CRFS:
        raise FormatError(f"zstd:chunked footer: manifest type {mtype}, want {MANIFEST_TYPE_CRFS}")
    return ManifestPosition(offset, clen, ulen, footer_size=size + SKIPPABLE_HEADER_SIZE)


def position_from_annotations(annotations: Mapping[str, str]) -> ManifestPosition | None:
    """The TOC position from the manifest annotations (either family), or None if absent."""
    for key in (CS_MANIFEST_POSITION_ANNOTATION, MANIFEST_POSITION_ANNOTATION):
        value = annotations.get(key)
        if value is None:
            continue
        parts = value.split(":")
        if len(parts) != 4 or not all(p.isdigit() and p.isascii() for p in parts):
            raise FormatError(f"annotation {key}={value!r}: want offset:length:uncompressed:type")
        offset, clen, ulen, mtype = (int(p) for p in parts)
        if mtype != MANIFEST_TYPE_CRFS:
            raise FormatError(f"annotation {key}={value!r}: manifest type {mtype}, want {MANIFEST_TYPE_CRFS}")
        return ManifestPosition(offset, clen, ulen)
    return None


def checksum_from_annotations(annotations: Mapping[str, str]) -> str | None:
    """The digest of the compressed TOC (``manifest-checksum``, either family), or None."""
    for key in (CS_MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_CHECKSUM_ANNOTATION):
        if key in annotations:
            return annotations[key]
    return None


def unzstd_prefix(data: bytes, want: int) -> bytes:
    """Decompress at most ``want`` bytes from the zstd frames at the start of ``data``.

    Skippable frames are passed over. Returns fewer bytes only when the input ends; a corrupt
    frame raises FormatError. Output never exceeds ``want`` bytes (bomb-safe).
    """
    dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
    pieces: list[bytes] = []
    got = 0
    try:
        with dctx.stream_reader(data, read_across_frames=True, closefd=False) as reader:
            while got < want:
                piece = reader.read(want - got)
                if not piece:
                    break
                pieces.append(piece)
                got += len(piece)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd stream: {exc}") from exc
    # Usually one read returns everything: return it as is rather than copy it.
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def decompress_toc(raw: bytes, uncompressed_length: int | None, max_toc_bytes: int) -> bytes:
    """The TOC JSON from its zstd frame, refusing more than ``max_toc_bytes`` of output."""
    if uncompressed_length is not None and uncompressed_length > max_toc_bytes:
        raise FormatError(f"TOC is {uncompressed_length} bytes, larger than the {max_toc_bytes}-byte limit")
    data = unzstd_prefix(raw, max_toc_bytes + 1)
    if len(data) > max_toc_bytes:
        raise FormatError(f"TOC is larger than the {max_toc_bytes}-byte limit")
    if uncompressed_length is not None and len(data) != uncompressed_length:
        raise FormatError(f"TOC decompressed to {len(data)} bytes, the footer says {uncompressed_length}")
    if not data:
        raise FormatError("TOC: zstd frame is empty or truncated")
    return data
