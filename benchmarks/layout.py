"""The benchmark images' layers and tags in OCI layouts, written from layer tars on disk.

What is the benchmark's own: streaming a multi-GiB layer tar through gzip into a blob (read,
hashed, compressed and written in blocks, so it never sits in memory), the benchmark image's
config, and the few questions the harness asks of a layout. Blobs, configs, manifests and tags are
written by ``snapshotter.image.OciLayout``. Everything is deterministic (gzip without a name or
time stamp, canonical JSON, a fixed creation date), so the same layer tars give the same digests
on every machine. A layout holds one image under several tags, one per format (``gzip``,
``estargz``, ...).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from snapshotter.fetcher import Descriptor
from snapshotter.formats.build import MEDIA_TYPE_GZIP as MEDIA_TYPE_LAYER_GZIP
from snapshotter.image import LayoutImage, OciLayout, image_config

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

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size, dict(self.annotations))


def open_layout(layout: Path) -> OciLayout:
    """``layout`` as an OCI layout, created if it is missing."""
    store = OciLayout(layout)
    store.create()
    return store


def gzip_layer(layout: Path, tar_path: Path, level: int = 6) -> LayerDesc:
    """Compress the tar at ``tar_path`` into a gzip blob of ``layout``, streaming."""
    diff = hashlib.sha256()

    def compressed() -> Iterator[bytes]:
        # wbits 31: a gzip wrapper with mtime 0 and no file name, hence reproducible.
        compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
        with open(tar_path, "rb") as src:
            while block := src.read(BLOCK):
                diff.update(block)
                yield compressor.compress(block)
        yield compressor.flush()

    digest, size = open_layout(layout).write_blob_stream(compressed())
    return LayerDesc(digest, size, "sha256:" + diff.hexdigest())


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
    config = image_config([layer.diff_id for layer in layers], env=env, created_by=created_by)
    written = open_layout(layout).write_image(config, [layer.descriptor for layer in layers], tag=tag)
    return written.digest


def tags(layout: Path) -> list[str]:
    """Tags present in ``layout``'s index."""
    return OciLayout(layout).tags()


def _image(layout: Path, tag: str) -> LayoutImage:
    return OciLayout(layout).resolve(tag)


def manifest(layout: Path, tag: str) -> dict[str, Any]:
    """The manifest tagged ``tag``."""
    return cast(dict[str, Any], json.loads(_image(layout, tag).manifest))


def image_size(layout: Path, tag: str) -> int:
    """Sum of the compressed layer sizes of the image tagged ``tag``."""
    return sum(layer.size for layer in _image(layout, tag).layers)


def env(layout: Path, tag: str) -> list[str]:
    config_desc = _image(layout, tag).config
    config = json.loads(OciLayout(layout).read_blob(config_desc.digest, config_desc.size))
    return [str(e) for e in config.get("config", {}).get("Env") or DEFAULT_ENV]


def layer_tars(layout: Path, tag: str) -> Iterator[bytes]:
    """The uncompressed tar of every gzip layer of ``tag``, bottom first, one at a time."""
    store = OciLayout(layout)
    for layer in _image(layout, tag).layers:
        if not layer.media_type.endswith("+gzip"):
            raise ValueError(f"{tag}: layer {layer.digest} is {layer.media_type}, not gzip")
        yield gzip.decompress(store.read_blob(layer.digest, layer.size))
