"""Resource bounds shared by the parsers and the chunk decoder: what one chunk may cost.

Owns the chunk limit (the most uncompressed bytes of a stream a chunk may lie in, so the most a
decode ever inflates) and the bound on a chunk's compressed range (the most blob bytes a reader
ever fetches to decode it). Both are checked when a layer's index is parsed, so a hostile index
fails there with a FormatError naming the entry, and again when a chunk is decoded.
"""

from __future__ import annotations

# The default of the reader's ``remote.max_chunk_bytes``: eStargz writes 4 MiB chunks, our
# Nydus-like format at most 16 MiB; several small files may share one stream.
DEFAULT_MAX_CHUNK_BYTES = 64 << 20

# Fixed allowance on top of the proportional part of ``compressed_bound``: stream headers (gzip
# 10+ bytes per member, zstd up to 18 per frame), a few deflate block headers, and the whole
# zstd block (at most 128 KiB + 3 bytes) that holds a chunk's last byte.
RANGE_SLACK = 256 << 10


def compressed_bound(uncompressed: int) -> int:
    """The most compressed bytes a stream may take to yield its first ``uncompressed`` bytes.

    Two bytes per byte is beyond any real encoder: a deflate literal costs at most 15 bits and a
    match (3 bytes or more) at most 48; stored deflate and raw zstd blocks add 5 bytes per 64 KiB
    and 3 per 128 KiB. Only a crafted stream (many empty blocks, say) needs more, and then the
    chunk fails to decode instead of costing an unbounded fetch.
    """
    return 2 * uncompressed + RANGE_SLACK
