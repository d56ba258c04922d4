"""Layer formats: parse a lazily pullable layer's index (eStargz, zstd:chunked, Nydus-like) and
build blobs.

Pure functions on bytes; no sockets, no files. The contract every parser produces is in
``snapshotter.formats.index``; ``snapshotter.formats.registry`` says which format a layer is in.
This package re-exports the public API; the builders load on first use, so that a process that
only parses (the daemon, the FUSE manager) never imports them.
"""

from typing import TYPE_CHECKING, Any

from snapshotter.formats.bounds import DEFAULT_MAX_CHUNK_BYTES, compressed_bound
from snapshotter.formats.detect import (
    DEFAULT_MAX_TOC_BYTES,
    MAX_FOOTER_SIZE,
    TOC_DIGEST_ANNOTATION,
    ChunkDigestError,
    TocLocation,
    chunk_digest_ok,
    decode_stream,
    decompress_chunk,
    locate_toc,
    parse_toc,
    read_toc_json,
    toc_digest_from_annotations,
)
from snapshotter.formats.index import (
    Chunk,
    Compression,
    Entry,
    EntryType,
    FormatError,
    LayerIndex,
)
from snapshotter.formats.nydus import (
    BootstrapLocation,
    bootstrap_digest,
    is_nydus_layer,
    locate_bootstrap,
    parse_bootstrap,
)
from snapshotter.formats.toc import (
    LANDMARK_NAMES,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_CHUNK_BYTES",
    "DEFAULT_MAX_TOC_BYTES",
    "LANDMARK_NAMES",
    "MAX_FOOTER_SIZE",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TOC_DIGEST_ANNOTATION",
    "TOC_TAR_NAME",
    "UNCOMPRESSED_SIZE_ANNOTATION",
    "BootstrapLocation",
    "BuiltBlob",
    "Chunk",
    "ChunkDigestError",
    "Compression",
    "Entry",
    "EntryType",
    "FormatError",
    "LayerIndex",
    "TocLocation",
    "bootstrap_digest",
    "build_blob",
    "build_estargz",
    "build_nydus",
    "build_nydus_image",
    "build_zstdchunked",
    "chunk_digest_ok",
    "compressed_bound",
    "decode_stream",
    "decompress_chunk",
    "is_nydus_layer",
    "locate_bootstrap",
    "locate_toc",
    "parse_bootstrap",
    "parse_toc",
    "read_toc_json",
    "toc_digest_from_annotations",
]

_BUILDERS = {
    "DEFAULT_CHUNK_SIZE": "build",
    "UNCOMPRESSED_SIZE_ANNOTATION": "build",
    "BuiltBlob": "build",
    "build_blob": "build",
    "build_estargz": "build",
    "build_zstdchunked": "build",
    "build_nydus": "build_nydus",
    "build_nydus_image": "build_nydus",
}

if TYPE_CHECKING:
    from snapshotter.formats.build import (
        DEFAULT_CHUNK_SIZE,
        UNCOMPRESSED_SIZE_ANNOTATION,
        BuiltBlob,
        build_blob,
        build_estargz,
        build_zstdchunked,
    )
    from snapshotter.formats.build_nydus import build_nydus, build_nydus_image


def __getattr__(name: str) -> Any:
    module = _BUILDERS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
