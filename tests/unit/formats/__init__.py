"""Helpers shared by the format tests: a varied sample tar, parsing a whole blob, TOC rewriting."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from typing import Any

from snapshotter.formats import (
    MAX_FOOTER_SIZE,
    BuiltBlob,
    Compression,
    LayerIndex,
    decompress_chunk,
    locate_toc,
    parse_toc,
    read_toc_json,
)
from snapshotter.formats.build import estargz_toc_and_footer, zstdchunked_toc_and_footer

MTIME = 1577836800
BIG = bytes(hashlib.sha256(i.to_bytes(4, "big")).digest()[i % 32] for i in range(300_000))


def _info(name: str, type_: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mtime = MTIME
    ti.mode = 0o644
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti


def sample_tar() -> bytes:
    """A PAX tar with every entry kind the formats must carry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(ti: tarfile.TarInfo, data: bytes = b"") -> None:
            ti.size = len(data) if ti.isreg() else 0
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)

        add(_info("etc", tarfile.DIRTYPE, mode=0o755))
        add(_info("etc/hosts"), b"127.0.0.1 localhost\n")
        add(_info("etc/empty"))
        add(_info("data/big.bin", mode=0o600, uid=1000, gid=1001, uname="alice", gname="staff"), BIG)
        add(_info("data/small", mode=0o4755), b"x")
        add(_info("data/link", tarfile.LNKTYPE, linkname="data/small"))
        add(_info("data/link2", tarfile.LNKTYPE, linkname="data/link"))
        add(_info("data/sym", tarfile.SYMTYPE, linkname="../etc/hosts", mode=0o777))
        xattr = _info(
            "data/xattr", pax_headers={"SCHILY.xattr.user.k": "v", "SCHILY.xattr.security.c": "\x01\x02"}
        )
        add(xattr, b"with xattrs\n")
        add(_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666))
        add(_info("dev/fifo", tarfile.FIFOTYPE))
        add(_info("data/.wh.gone"))
        add(_info("data/olddir/.wh..wh..opq"))
        add(_info("data/sp ace<&>é.txt"), b"odd name\n")
        add(_info("a" * 120 + "/long.txt"), b"long path\n")
    return buf.getvalue()


def tar_members(tar: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    """name → (TarInfo, content) of a plain tar."""
    out: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for ti in tf:
            f = tf.extractfile(ti) if ti.isreg() else None
            out[ti.name.rstrip("/")] = (ti, f.read() if f else b"")
    return out


def parse_blob(
    blob: bytes, digest: str | None, annotations: dict[str, str] | None = None, **kw: Any
) -> LayerIndex:
    """locate_toc + parse_toc over a whole in-memory blob."""
    loc = locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob), annotations or {})
    raw = blob[loc.offset : loc.offset + loc.length]
    return parse_toc(raw, loc, blob_size=len(blob), expected_digest=digest, **kw)


def file_bytes(blob: bytes, index: LayerIndex, name: str) -> bytes:
    """A regular file's content reassembled from its chunks."""
    entry = index.entries[name]
    return b"".join(
        decompress_chunk(
            index.compression, blob[c.compressed_offset : c.compressed_offset + c.compressed_size], c
        )
        for c in entry.chunks
    )


def toc_of(built: BuiltBlob) -> dict[str, Any]:
    """The decoded TOC of a built blob."""
    blob = built.blob
    loc = locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob))
    doc: dict[str, Any] = json.loads(read_toc_json(blob[loc.offset : loc.offset + loc.length], loc))
    return doc


def rewrite_toc(
    built: BuiltBlob,
    mutate: Callable[[dict[str, Any]], object],
    *,
    raw_json: bytes | None = None,
) -> tuple[bytes, str]:
    """Re-emit ``built`` with a mutated TOC (or ``raw_json``); returns (blob, toc digest)."""
    doc = toc_of(built)
    mutate(doc)
    body = raw_json if raw_json is not None else toc_json_doc(doc)
    head = built.blob[: built.toc_offset]
    if built.media_type.endswith("gzip"):
        _, tail = estargz_toc_and_footer(body, built.toc_offset)
    else:
        tail, _ = zstdchunked_toc_and_footer(body, built.toc_offset)
    return head + tail, "sha256:" + hashlib.sha256(body).hexdigest()


def toc_json_doc(doc: dict[str, Any]) -> bytes:
    """Serialize a (possibly broken) TOC document; the parser does not care about Go's layout."""
    return json.dumps(doc, indent="\t").encode()


COMPRESSIONS = (Compression.GZIP, Compression.ZSTD)
