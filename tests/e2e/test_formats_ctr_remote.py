"""Our eStargz / zstd:chunked parser reads what stargz-snapshotter's ``ctr-remote`` writes, and
our builder writes the same TOC as ctr-remote for the same layer.

The standard test image is converted with ``ctr-remote image convert --estargz|--zstdchunked
--oci`` inside a private containerd; the converted layer blobs and manifest come back out of
containerd's content store with ``ctr content get``.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from snapshotter.formats import (
    MAX_FOOTER_SIZE,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    Compression,
    EntryType,
    LayerIndex,
    build_blob,
    decompress_chunk,
    locate_toc,
    parse_toc,
    read_toc_json,
)
from snapshotter.formats.zstdchunked import MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_POSITION_ANNOTATION
from tests.e2e.conftest import ContainerdFactory
from tests.support import oci
from tests.support.oci import PushedImage
from tests.support.services import Containerd, Registry, require_privileges

TUNED_CHUNK_SIZE = 256 << 10  # splits big.bin (768 KiB) and busybox into several chunks
PRIORITIZED = ("/bin/busybox", "/etc/motd", "/data/big.bin")
MEDIA_TYPES = {
    "estargz": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstdchunked": "application/vnd.oci.image.layer.v1.tar+zstd",
}
# Everything in a TOC entry depends only on the input tar and the options, except the
# compressed offsets: Go's deflate/zstd encoders differ from zlib/libzstd, and SGZ also splits a
# layer into GOMAXPROCS parts that each start a new stream. So offsets are compared only
# structurally (same number of distinct streams, each chunk starting one).
OFFSET_FIELDS = frozenset({"offset", "innerOffset"})


def _ctr_bytes(cd: Containerd, *args: str) -> bytes:
    """``ctr ARGS`` with binary stdout (``Containerd.ctr`` decodes text)."""
    cmd = ["ctr", "--address", cd.address, "-n", cd.namespace, *args]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr.decode(errors='replace')}\n{cd.log_tail()}"
    return proc.stdout


def _manifest(cd: Containerd, digest: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_ctr_bytes(cd, "content", "get", digest))
    if "manifests" in doc:  # an index: take the (only) platform manifest
        return _manifest(cd, doc["manifests"][0]["digest"])
    return doc


def _convert(cd: Containerd, ref: str, fmt: str, tuned: bool, tmp_path: Path) -> dict[str, Any]:
    target = f"{ref}-{fmt}{'-tuned' if tuned else ''}"
    args = ["image", "convert", f"--{fmt}", "--oci"]
    if tuned:
        record = tmp_path / "record.json"
        record.write_text("".join(json.dumps({"path": p}) + "\n" for p in PRIORITIZED))
        args += ["--estargz-chunk-size", str(TUNED_CHUNK_SIZE), "--estargz-record-in", str(record)]
    out = cd.ctr(*args, ref, target, binary="ctr-remote").stdout.split()
    assert out and out[-1].startswith("sha256:"), f"ctr-remote printed no digest: {out}"
    return _manifest(cd, out[-1])


def _read_layer(blob: bytes, annotations: dict[str, str]) -> tuple[LayerIndex, bytes]:
    """Parse a converted blob the way the snapshotter will; returns the index and TOC JSON."""
    loc = locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob), annotations)
    raw = blob[loc.offset : loc.offset + loc.length]
    index = parse_toc(raw, loc, blob_size=len(blob), expected_digest=annotations[TOC_DIGEST_ANNOTATION])
    if loc.compression is Compression.ZSTD:
        # the compressed-TOC checksum verifies too, and the footer agrees with the annotation
        parse_toc(raw, loc, blob_size=len(blob), expected_digest=annotations[MANIFEST_CHECKSUM_ANNOTATION])
        footer_loc = locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob))
        assert (footer_loc.offset, footer_loc.length, footer_loc.footer_size) == (loc.offset, loc.length, 48)
    return index, read_toc_json(raw, loc)


def _check_against_source(blob: bytes, index: LayerIndex, layer_tar: bytes) -> None:
    with tarfile.open(fileobj=io.BytesIO(layer_tar), mode="r:") as tf:
        for ti in tf:
            name = ti.name.rstrip("/")
            entry = index.entries[name]
            assert (entry.mode, entry.uid, entry.gid) == (ti.mode & 0o7777, ti.uid, ti.gid), name
            assert entry.mtime_ns == int(ti.mtime) * 10**9, name
            if ti.issym():
                assert (entry.type, entry.link_name) == (EntryType.SYMLINK, ti.linkname), name
            elif ti.islnk():
                assert (entry.type, entry.link_name) == (EntryType.HARDLINK, ti.linkname), name
            elif ti.isdir():
                assert entry.type is EntryType.DIR, name
            else:
                f = tf.extractfile(ti)
                expected = f.read() if f else b""
                got = b"".join(
                    decompress_chunk(
                        index.compression,
                        blob[c.compressed_offset : c.compressed_offset + c.compressed_size],
                        c,
                    )
                    for c in entry.chunks
                )
                assert (entry.type, entry.size, got) == (EntryType.REG, len(expected), expected), name


def _without_offsets(toc: bytes) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in OFFSET_FIELDS} for e in json.loads(toc)["entries"]]


def _stream_count(toc: bytes) -> int:
    return len({e["offset"] for e in json.loads(toc)["entries"] if "offset" in e})


@pytest.fixture
def converter(
    registry: Registry, base_image: PushedImage, containerd_factory: ContainerdFactory
) -> Containerd:
    """A private containerd that has pulled the standard image (ctr-remote convert needs it local)."""
    require_privileges(("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo", "runc"))
    cd = containerd_factory()
    cd.pull(base_image.ref)
    return cd


@pytest.mark.parametrize("tuned", [False, True], ids=["defaults", "chunked-prioritized"])
@pytest.mark.parametrize("fmt", ["estargz", "zstdchunked"])
def test_ctr_remote_output_parses_and_matches_our_builder(
    converter: Containerd, base_image: PushedImage, fmt: str, tuned: bool, tmp_path: Path
) -> None:
    manifest = _convert(converter, base_image.ref, fmt, tuned, tmp_path)
    spec = oci.test_image_layers()
    assert len(manifest["layers"]) == len(spec.layers)
    for desc, layer in zip(manifest["layers"], spec.layers, strict=True):
        assert desc["mediaType"] == MEDIA_TYPES[fmt]
        annotations: dict[str, str] = desc["annotations"]
        blob = _ctr_bytes(converter, "content", "get", desc["digest"])
        assert len(blob) == desc["size"]
        index, their_toc = _read_layer(blob, annotations)
        assert index.format == fmt
        source = oci.layer_tar(layer)
        _check_against_source(blob, index, source)

        compression = Compression.GZIP if fmt == "estargz" else Compression.ZSTD
        ours = build_blob(
            source,
            compression,
            chunk_size=TUNED_CHUNK_SIZE if tuned else 4 << 20,
            prioritized_files=PRIORITIZED if tuned else (),
            allow_missing_prioritized=True,
        )
        # Same entries, in the same order, with the same attributes, chunking and digests.
        assert _without_offsets(ours.toc_json) == _without_offsets(their_toc)
        assert _stream_count(ours.toc_json) == _stream_count(their_toc)
        # Our blob reads back through the same path, with the same index shape.
        our_index, _ = _read_layer(ours.blob, ours.annotations)
        assert list(our_index.entries) == list(index.entries)
        assert our_index.prefetch == index.prefetch and our_index.no_prefetch == index.no_prefetch
        for name, entry in index.entries.items():
            assert [(c.file_offset, c.size, c.digest) for c in our_index.entries[name].chunks] == [
                (c.file_offset, c.size, c.digest) for c in entry.chunks
            ], name
        # Same annotation keys. The uncompressed size matches too (for zstd:chunked neither of us
        # ends the tar with the end-of-archive blocks). The DiffID does not: Go re-serializes tar
        # headers (e.g. writes "0000000" device fields where Python's tarfile writes NULs), we copy
        # them byte for byte, and the gzip TOC entry (part of the tar) holds different offsets.
        assert set(ours.annotations) == set(annotations)
        if fmt == "zstdchunked":
            assert set(ours.annotations) >= {MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_POSITION_ANNOTATION}
        assert ours.annotations[UNCOMPRESSED_SIZE_ANNOTATION] == annotations[UNCOMPRESSED_SIZE_ANNOTATION]
