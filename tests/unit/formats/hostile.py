"""Layers a hostile registry could serve, built byte by byte (our builders refuse to write them),
and honest layouts our builders do not produce (several files packed into one stream).

The memory tests import these in a subprocess (``tests.support.memory``), so each builder takes
plain arguments and returns plain bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib

import zstandard

from snapshotter.formats.build import estargz_toc_and_footer, zstdchunked_toc_and_footer
from snapshotter.formats.index import TYPE_CODES, Compression, EntryType
from snapshotter.formats.nydus import (
    BOOTSTRAP_MAGIC,
    CHUNK,
    ENTRY,
    HEADER,
    HEADER_SIZE,
    VERSION,
    XATTR,
    pack_footer,
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- Nydus-like bootstraps ----------------------------------------------------------------------


def nydus_bootstrap(
    *, files: int, refs_per_file: int, xattrs: int = 0, xattrs_per_file: int = 0, chunk_size: int = 4096
) -> tuple[bytes, str]:
    """A valid-looking nydus blob whose ``files`` regular files all point at the same run of
    ``refs_per_file`` chunk refs (every ref names one zero chunk), and at the same run of
    ``xattrs_per_file`` of its ``xattrs`` xattr records. Returns (blob, bootstrap digest)."""
    zero = bytes(chunk_size)
    frame = zstandard.ZstdCompressor().compress(zero)
    strings = bytearray()

    def add(value: bytes) -> tuple[int, int]:
        strings.extend(value)
        return len(strings) - len(value), len(value)

    xattr_rows = b"".join(XATTR.pack(*add(b"user.k%d" % i), *add(b"v")) for i in range(xattrs))
    rows = ENTRY.pack(
        0, 0, 0, 0, TYPE_CODES[EntryType.DIR], 0, 0, 0o755, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, bytes(32)
    )
    size = refs_per_file * chunk_size
    whole = b"\1" * 32 if refs_per_file > 1 else bytes(32)  # any digest: parsing never reads content
    for i in range(files):
        rows += ENTRY.pack(
            *add(b"f%d" % i), 0, 0, TYPE_CODES[EntryType.REG], 0, 0, 0o644, 0, 0, 0, size,
            0, 0, 0, refs_per_file, 0, xattrs_per_file, whole,
        )  # fmt: skip
    tables = [
        (rows, files + 1),
        (CHUNK.pack(hashlib.sha256(zero).digest(), 0, chunk_size, 0, len(frame), 0), 1),
        (bytes(4 * refs_per_file), refs_per_file),
        (xattr_rows, xattrs),
        (b"", 0),
        (b"", 0),
        (bytes(strings), len(strings)),
    ]
    directory: list[int] = []
    offset = HEADER_SIZE
    for table, count in tables:
        directory += (offset, count)
        offset += len(table)
    bootstrap = HEADER.pack(BOOTSTRAP_MAGIC, VERSION, 0, HEADER_SIZE, chunk_size, 0, *directory)
    bootstrap += b"".join(table for table, _ in tables)
    stored = zstandard.ZstdCompressor(level=19).compress(bootstrap)
    blob = frame + stored + pack_footer(len(frame), len(stored), len(bootstrap))
    return blob, sha256(stored)


# -- stargz-family blobs ------------------------------------------------------------------------


def compress(compression: Compression, data: bytes) -> bytes:
    if compression is Compression.ZSTD:
        return zstandard.ZstdCompressor(level=3).compress(data)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def stargz_blob(
    compression: Compression, data_region: bytes, entries: list[dict[str, object]]
) -> tuple[bytes, str, dict[str, str]]:
    """``data_region`` followed by a TOC of ``entries`` (eStargz for GZIP, ctr-remote's
    zstd:chunked for ZSTD); returns (blob, TOC digest, manifest annotations)."""
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    if compression is Compression.GZIP:
        _, tail = estargz_toc_and_footer(toc, len(data_region))
        annotations: dict[str, str] = {}
    else:
        tail, annotations = zstdchunked_toc_and_footer(toc, len(data_region))
    return data_region + tail, sha256(toc), annotations


def inner_offset_bomb(
    compression: Compression, zeros: int, size: int = 16
) -> tuple[bytes, str, dict[str, str]]:
    """One stream of ``zeros`` zero bytes (it compresses ~1000:1) and a file whose only chunk
    sits at its very end: reading it inflates the whole stream first."""
    stream = compress(compression, bytes(zeros))
    entry = {
        "name": "bomb",
        "type": "reg",
        "size": size,
        "offset": 0,
        "innerOffset": zeros - size,
        "chunkDigest": sha256(bytes(size)),
        "digest": sha256(bytes(size)),
    }
    return stargz_blob(compression, stream, [{"name": "", "type": "dir"}, entry])


def packed_layer(
    compression: Compression, files: dict[str, bytes], *, trailer: bytes = b""
) -> tuple[bytes, str, dict[str, str]]:
    """What ``ctr-remote --estargz-min-chunk-size`` writes: every file's tar header and content
    in ONE compressed stream, each chunk found by its innerOffset, then ``trailer`` (more tar
    headers, say) in the same stream."""
    tar = io.BytesIO()
    entries: list[dict[str, object]] = [{"name": "", "type": "dir"}]
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            inner = tar.tell() - len(data) - (-len(data) % 512)
            entries.append(
                {
                    "name": name,
                    "type": "reg",
                    "size": len(data),
                    "offset": 0,
                    "innerOffset": inner,
                    "digest": sha256(data),
                    "chunkDigest": sha256(data),
                }
            )
        end = tar.tell()
    plain = tar.getvalue()[:end] + trailer
    return stargz_blob(compression, compress(compression, plain), entries)
