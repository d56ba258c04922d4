"""Checking converted images: read one back (from a layout or a registry) and compare every layer
with its source tar through the project's own parsers; ``ctr-remote``'s conversions as the
reference our builder must match. Shared by the unit, integration and end-to-end convert tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from snapshotter.convert import decompress
from snapshotter.fetcher import OCI_MANIFEST, CredentialStore, HostsConfig, RegistryClient
from snapshotter.formats import (
    MAX_FOOTER_SIZE,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    Compression,
    EntryType,
    LayerIndex,
    decompress_chunk,
    locate_toc,
    nydus,
    parse_toc,
    read_toc_json,
)
from snapshotter.formats.zstdchunked import MANIFEST_CHECKSUM_ANNOTATION
from snapshotter.image import OCI_CONFIG, OciLayout
from tests.support.services import Containerd

FORMAT_MEDIA_TYPES = {
    "estargz": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstdchunked": "application/vnd.oci.image.layer.v1.tar+zstd",
    "nydus": nydus.MEDIA_TYPE,
}
# ctr-remote's tuned conversion: a chunk size that splits big.bin (768 KiB) and busybox into
# several chunks, and a record file of files to prioritize.
TUNED_CHUNK_SIZE = 256 << 10
PRIORITIZED = ("/bin/busybox", "/etc/motd", "/data/big.bin")
# Everything in a TOC entry depends only on the input tar and the options, except the
# compressed offsets: Go's deflate/zstd encoders differ from zlib/libzstd, and SGZ also splits a
# layer into GOMAXPROCS parts that each start a new stream. So offsets are compared only
# structurally (same number of distinct streams, each chunk starting one).
OFFSET_FIELDS = frozenset({"offset", "innerOffset"})


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- reading a converted image back ----------------------------------------------------------------


def read_index(blob: bytes, desc: Mapping[str, Any]) -> LayerIndex:
    """Parse a converted layer blob the way the snapshotter does, verifying its TOC/bootstrap."""
    annotations: dict[str, str] = desc.get("annotations", {})
    if nydus.is_nydus_layer(desc["mediaType"], annotations):
        boot = nydus.locate_bootstrap(blob[-nydus.FOOTER_SIZE :], len(blob))
        expected = nydus.bootstrap_digest(annotations)
        assert expected is not None, "nydus layer without a bootstrap digest annotation"
        raw = blob[boot.offset : boot.offset + boot.length]
        return nydus.parse_bootstrap(raw, boot, blob_size=len(blob), expected_digest=expected)
    loc = locate_toc(blob[-MAX_FOOTER_SIZE:], len(blob), annotations)
    raw = blob[loc.offset : loc.offset + loc.length]
    # The TOC digest annotation is the sha256 of the TOC JSON itself.
    assert sha256(read_toc_json(raw, loc)) == annotations[TOC_DIGEST_ANNOTATION]
    return parse_toc(raw, loc, blob_size=len(blob), expected_digest=annotations[TOC_DIGEST_ANNOTATION])


def check_layer_against_tar(index: LayerIndex, blob: bytes, blobs: Mapping[str, bytes], tar: bytes) -> None:
    """Every entry of the source tar is in the index with the same attributes and bytes."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for ti in tf:
            name = ti.name.rstrip("/")
            entry = index.entries[name]
            assert (entry.mode, entry.uid, entry.gid) == (ti.mode & 0o7777, ti.uid, ti.gid), name
            assert entry.mtime_ns == int(ti.mtime) * 10**9, name
            xattrs = {
                k.removeprefix("SCHILY.xattr."): v.encode()
                for k, v in ti.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            assert entry.xattrs == xattrs, name
            if ti.issym():
                assert (entry.type, entry.link_name) == (EntryType.SYMLINK, ti.linkname), name
            elif ti.islnk():
                assert (entry.type, entry.link_name) == (EntryType.HARDLINK, ti.linkname), name
            elif ti.isdir():
                assert entry.type is EntryType.DIR, name
            else:
                f = tf.extractfile(ti)
                want = f.read() if f else b""
                got = b"".join(
                    decompress_chunk(
                        index.compression,
                        (blobs[c.blob] if c.blob else blob)[
                            c.compressed_offset : c.compressed_offset + c.compressed_size
                        ],
                        c,
                    )
                    for c in entry.chunks
                )
                assert (entry.type, entry.size, got) == (EntryType.REG, len(want), want), name


def check_converted(
    manifest: Mapping[str, Any],
    config: Mapping[str, Any],
    blobs: Mapping[str, bytes],
    tars: Sequence[bytes],
    fmt: str,
    *,
    prioritized: Sequence[str] = (),
) -> list[LayerIndex]:
    """Check a converted image (manifest, config and every layer blob) against its source tars."""
    assert manifest["mediaType"] == OCI_MANIFEST and manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    assert len(manifest["layers"]) == len(tars) == len(config["rootfs"]["diff_ids"])
    if fmt == "nydus":
        assert manifest["annotations"].items() >= nydus.manifest_annotations().items()
    indexes = []
    for desc, tar, diff_id in zip(manifest["layers"], tars, config["rootfs"]["diff_ids"], strict=True):
        blob = blobs[desc["digest"]]
        assert (sha256(blob), len(blob)) == (desc["digest"], desc["size"])
        assert desc["mediaType"] == FORMAT_MEDIA_TYPES[fmt]
        if fmt == "nydus":
            assert diff_id == sha256(tar)  # nydus keeps the source DiffIDs
        else:
            stream = decompress(blob, "gzip" if fmt == "estargz" else "zstd")
            assert diff_id == sha256(stream)
            assert desc["annotations"][UNCOMPRESSED_SIZE_ANNOTATION] == str(len(stream))
        index = read_index(blob, desc)
        assert index.format == fmt
        check_layer_against_tar(index, blob, blobs, tar)
        if prioritized:
            names = {e.rstrip("/") for e in index.entries}
            wanted = [p.strip("/") for p in prioritized if p.strip("/") in names]
            # In access order among what is prefetched (with their parent directories).
            assert [p for p in index.prefetch if p in wanted] == wanted
        indexes.append(index)
    return indexes


def read_layout_image(layout: OciLayout, tag: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]:
    """Manifest, config and layer blobs of the image tagged ``tag`` in ``layout``, verified."""
    image = layout.resolve(tag)
    manifest = json.loads(image.manifest)
    config = json.loads(layout.read_blob(image.config.digest))
    blobs = {d.digest: layout.read_blob(d.digest, d.size) for d in image.layers}
    return manifest, config, blobs


def read_image(ref: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]:
    """Manifest, config and layer blobs of ``ref``, read with the project's registry client."""

    async def read() -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]:
        async with RegistryClient(HostsConfig(None), CredentialStore()) as client:
            image = await client.resolve(ref)
            config = await client.blob(ref, image.config.digest, image.config.size).read_all()
            blobs = {d.digest: await client.blob(ref, d.digest, d.size).read_all() for d in image.layers}
            return json.loads(image.manifest), json.loads(config), blobs

    return asyncio.run(read())


# -- ctr-remote's conversions ------------------------------------------------------------------------


def ctr_bytes(cd: Containerd, *args: str) -> bytes:
    """``ctr ARGS`` with binary stdout (``Containerd.ctr`` decodes text)."""
    cmd = ["ctr", "--address", cd.address, "-n", cd.namespace, *args]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr.decode(errors='replace')}\n{cd.log_tail()}"
    return proc.stdout


def ctr_manifest(cd: Containerd, digest: str) -> dict[str, Any]:
    """The image manifest ``digest`` names in containerd's content store (an index's only one)."""
    doc: dict[str, Any] = json.loads(ctr_bytes(cd, "content", "get", digest))
    if "manifests" in doc:  # an index: take the (only) platform manifest
        return ctr_manifest(cd, doc["manifests"][0]["digest"])
    return doc


def ctr_remote_convert(cd: Containerd, ref: str, fmt: str, tuned: bool, tmp_path: Path) -> dict[str, Any]:
    """``ctr-remote image convert --fmt --oci`` of ``ref`` (pulled into ``cd``), with ``tuned`` the
    chunk size and record file above (written into ``tmp_path``); the converted manifest."""
    target = f"{ref}-{fmt}{'-tuned' if tuned else ''}"
    args = ["image", "convert", f"--{fmt}", "--oci"]
    if tuned:
        record = tmp_path / "record.json"
        record.write_text("".join(json.dumps({"path": p}) + "\n" for p in PRIORITIZED))
        args += ["--estargz-chunk-size", str(TUNED_CHUNK_SIZE), "--estargz-record-in", str(record)]
    out = cd.ctr(*args, ref, target, binary="ctr-remote").stdout.split()
    assert out and out[-1].startswith("sha256:"), f"ctr-remote printed no digest: {out}"
    return ctr_manifest(cd, out[-1])


def read_toc(blob: bytes, annotations: dict[str, str]) -> tuple[LayerIndex, bytes]:
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


def toc_without_offsets(toc: bytes) -> list[dict[str, Any]]:
    """The TOC's entries without the fields Go's encoders make differ (see OFFSET_FIELDS)."""
    return [{k: v for k, v in e.items() if k not in OFFSET_FIELDS} for e in json.loads(toc)["entries"]]


def toc_stream_count(toc: bytes) -> int:
    """How many compressed streams the TOC's chunks start."""
    return len({e["offset"] for e in json.loads(toc)["entries"] if "offset" in e})
