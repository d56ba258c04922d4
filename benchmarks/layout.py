"""OCI image layouts of the benchmark images, written from layer tars on disk.

Layers are streamed (read, hashed, compressed and written in blocks), so a multi-GiB image never
sits in memory. Everything is deterministic: gzip without a name or time stamp, JSON with sorted
keys, a fixed creation date, so the same layer tars give the same digests on every machine.
A layout holds one image under several tags, one per format (``gzip``, ``estargz``, ...).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
CREATED = "2020-01-01T00:00:00Z"
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
BLOCK = 4 << 20


@dataclass(frozen=True)
class LayerDesc:
    """A layer blob in the layout and what the manifest and config say about it."""

    digest: str
    size: int
    diff_id: str
    media_type: str = MEDIA_TYPE_LAYER_GZIP
    annotations: Mapping[str, str] = field(default_factory=dict)


def _blob_path(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def _init(layout: Path) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    """Store ``data`` as a blob; returns (digest, size)."""
    _init(layout)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = _blob_path(layout, digest)
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return digest, len(data)


def gzip_layer(layout: Path, tar_path: Path, level: int = 6) -> LayerDesc:
    """Compress the tar at ``tar_path`` into a gzip blob of ``layout``, streaming."""
    _init(layout)
    diff = hashlib.sha256()
    blob = hashlib.sha256()
    size = 0
    # wbits 31: a gzip wrapper with mtime 0 and no file name, hence reproducible.
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    fd, tmp_name = tempfile.mkstemp(dir=layout / "blobs" / "sha256", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(tar_path, "rb") as src:
            while block := src.read(BLOCK):
                diff.update(block)
                piece = compressor.compress(block)
                blob.update(piece)
                out.write(piece)
                size += len(piece)
            piece = compressor.flush()
            blob.update(piece)
            out.write(piece)
            size += len(piece)
        digest = "sha256:" + blob.hexdigest()
        os.replace(tmp_name, _blob_path(layout, digest))
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return LayerDesc(digest, size, "sha256:" + diff.hexdigest())


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_image(
    layout: Path,
    tag: str,
    layers: Sequence[LayerDesc],
    *,
    env: Sequence[str] = DEFAULT_ENV,
    created_by: str = "lazysnap benchmarks",
) -> str:
    """Write the config and manifest of an image made of ``layers`` and tag it ``tag`` in
    ``layout``'s index (replacing an older image of that tag). Returns the manifest digest."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {"Env": list(env)},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": CREATED, "created_by": created_by}] * len(layers),
    }
    config_digest, config_size = write_blob(layout, _dumps(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            {
                "mediaType": layer.media_type,
                "digest": layer.digest,
                "size": layer.size,
                **({"annotations": dict(sorted(layer.annotations.items()))} if layer.annotations else {}),
            }
            for layer in layers
        ],
    }
    digest, size = write_blob(layout, _dumps(manifest))
    index = _read_index(layout)
    kept = [m for m in index["manifests"] if m.get("annotations", {}).get(ANNOTATION_REF_NAME) != tag]
    kept.append(
        {
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": digest,
            "size": size,
            "annotations": {ANNOTATION_REF_NAME: tag},
            "platform": {"architecture": "amd64", "os": "linux"},
        }
    )
    index["manifests"] = kept
    (layout / "index.json").write_bytes(_dumps(index))
    return digest


def _read_index(layout: Path) -> dict[str, Any]:
    path = layout / "index.json"
    if not path.exists():
        return {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": []}
    return cast(dict[str, Any], json.loads(path.read_text()))


def tags(layout: Path) -> list[str]:
    """Tags present in ``layout``'s index."""
    return [
        str(m["annotations"][ANNOTATION_REF_NAME])
        for m in _read_index(layout)["manifests"]
        if ANNOTATION_REF_NAME in m.get("annotations", {})
    ]


def manifest(layout: Path, tag: str) -> dict[str, Any]:
    """The manifest tagged ``tag``."""
    for m in _read_index(layout)["manifests"]:
        if m.get("annotations", {}).get(ANNOTATION_REF_NAME) == tag:
            return cast(dict[str, Any], json.loads(_blob_path(layout, m["digest"]).read_text()))
    raise KeyError(f"no tag {tag!r} in {layout}")


def image_size(layout: Path, tag: str) -> int:
    """Sum of the compressed layer sizes of the image tagged ``tag``."""
    return sum(int(layer["size"]) for layer in manifest(layout, tag)["layers"])


def env(layout: Path, tag: str) -> list[str]:
    config = json.loads(_blob_path(layout, manifest(layout, tag)["config"]["digest"]).read_text())
    return [str(e) for e in config.get("config", {}).get("Env") or DEFAULT_ENV]


def layer_tars(layout: Path, tag: str) -> Iterator[bytes]:
    """The uncompressed tar of every gzip layer of ``tag``, bottom first, one at a time."""
    for layer in manifest(layout, tag)["layers"]:
        if not str(layer["mediaType"]).endswith("+gzip"):
            raise ValueError(f"{tag}: layer {layer['digest']} is {layer['mediaType']}, not gzip")
        yield gzip.decompress(_blob_path(layout, layer["digest"]).read_bytes())
