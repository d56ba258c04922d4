"""Gzip index blobs for tests: take one apart, change a checkpoint, put it back together.

Hostile-index tests need indexes that still pass every structural check (sizes, bounds, digests
pinned by whoever pushes them) but lie about a checkpoint: a bit offset one off, a window of other
bytes. ``rewrite`` re-encodes an index with such a change, following docs/GZIP-INDEX.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import zstandard

from snapshotter.formats.gzindex import BODY_HEAD, CHECKPOINT, HEADER, HEADER_SIZE, IndexLocation, parse_index
from snapshotter.formats.index import LayerIndex


@dataclass
class Decoded:
    header: list[object]
    counts: list[int]
    checkpoints: list[list[int]]  # offset, bit, window length, flags
    windows: list[bytes]
    rest: bytes  # entries, digests, xattrs, strings: unchanged


def decode(data: bytes) -> Decoded:
    header = list(HEADER.unpack_from(data))
    body = zstandard.ZstdDecompressor().decompress(data[HEADER_SIZE:])
    counts = list(BODY_HEAD.unpack_from(body))
    n = counts[1]
    at = BODY_HEAD.size
    checkpoints = [list(CHECKPOINT.unpack_from(body, at + i * CHECKPOINT.size)) for i in range(n)]
    at += n * CHECKPOINT.size
    windows = []
    for cp in checkpoints:
        windows.append(body[at : at + cp[2]])
        at += cp[2]
    return Decoded(header, counts, checkpoints, windows, body[at:])


def encode(d: Decoded) -> bytes:
    for cp, window in zip(d.checkpoints, d.windows, strict=True):
        cp[2] = len(window)
    d.counts[6] = sum(len(w) for w in d.windows)
    body = (
        BODY_HEAD.pack(*d.counts)
        + b"".join(CHECKPOINT.pack(*cp) for cp in d.checkpoints)
        + b"".join(d.windows)
        + d.rest
    )
    d.header[3] = len(body)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(body)
    return HEADER.pack(*d.header) + frame


def rewrite(data: bytes, checkpoint: int, *, bit_delta: int = 0, window: bytes | None = None) -> bytes:
    """``data`` with checkpoint ``checkpoint``'s bit offset moved by ``bit_delta`` (kept in its
    byte) or its window replaced by a zstd frame of ``window``."""
    d = decode(data)
    cp = d.checkpoints[checkpoint]
    if bit_delta:
        bit = cp[1] + bit_delta
        assert bit // 8 == cp[1] // 8, "the move must stay in the checkpoint's byte"
        cp[1] = bit
    if window is not None:
        d.windows[checkpoint] = zstandard.ZstdCompressor(write_content_size=True).compress(window)
    return encode(d)


def parsed(data: bytes, layer: str, blob_size: int) -> LayerIndex:
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return parse_index(
        data, IndexLocation(layer, digest, len(data)), blob_size=blob_size, expected_digest=digest
    )


def span_of(index: LayerIndex, compressed_offset: int) -> int:
    """The number of the checkpoint whose span starts at ``compressed_offset``."""
    return sorted(index.resume_points).index(compressed_offset)
