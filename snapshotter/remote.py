"""Remote (lazily pulled) layers: decide whether a layer can be served lazily, mount it, keep it.

The snapshotter asks this module four things, and knows nothing else about lazy layers:
``explain(labels)`` (can this layer be lazy, and if not, why), ``mount(labels, mountpoint)``,
``check(mountpoint)`` and ``unmount(mountpoint)``. Here the registry client, the format parsers,
the chunk reader and the FUSE layer filesystem are wired together.

containerd passes, as Prepare labels, the layer descriptor's ``containerd.io/snapshot/*``
annotations and, when a handler adds them (ctr-remote rpull, the CRI plugin, nerdctl), the image
reference and the layer digest. Without those two labels a layer cannot be fetched lazily.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.cache import ChunkCache
from snapshotter.fetcher import (
    AuthError,
    BlobNotFoundError,
    DigestMismatchError,
    FetchError,
    ManifestNotFoundError,
    RegistryClient,
    ResolvedImage,
)
from snapshotter.formats import MAX_FOOTER_SIZE, locate_toc, parse_toc
from snapshotter.formats.index import FormatError, LayerIndex
from snapshotter.fuse.layerfs import LayerFS, LayerTree, MountedLayer, is_fuse_mountpoint
from snapshotter.reader import LayerReader, ReaderConfig

log = logging.getLogger(__name__)

TARGET_REF_LABEL = "containerd.io/snapshot.ref"
REMOTE_LABEL = "containerd.io/snapshot/remote"
REMOTE_LABEL_VALUE = "remote snapshot"
TOC_DIGEST_LABEL = "containerd.io/snapshot/stargz/toc.digest"
# Image reference and layer digest, from ctr-remote's handler or from the CRI plugin/nerdctl.
REFERENCE_LABELS = ("containerd.io/snapshot/remote/stargz.reference", "containerd.io/snapshot/cri.image-ref")
DIGEST_LABELS = ("containerd.io/snapshot/remote/stargz.digest", "containerd.io/snapshot/cri.layer-digest")
RESOLVE_TTL_SECONDS = 60.0
ZSTD_CHUNKED_ANNOTATIONS = (
    "io.containers.zstd-chunked.manifest-checksum",
    "io.github.containers.zstd-chunked.manifest-checksum",
)


class NotLazyError(Exception):
    """This layer will be pulled normally; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def fetch_failure_reason(exc: FetchError) -> str:
    """The short reason recorded for a layer that was not served lazily because of the registry."""
    if isinstance(exc, AuthError):
        return "auth-failed"
    if isinstance(exc, ManifestNotFoundError | BlobNotFoundError):
        return "not-found"
    if isinstance(exc, DigestMismatchError):
        return "digest-mismatch"
    return "registry-unreachable"


@dataclass(frozen=True)
class LayerRef:
    reference: str
    digest: str


def layer_ref(labels: Mapping[str, str]) -> LayerRef:
    """The image reference and layer digest from Prepare labels, or NotLazyError saying why."""
    reference = next((labels[k] for k in REFERENCE_LABELS if labels.get(k)), "")
    digest = next((labels[k] for k in DIGEST_LABELS if labels.get(k)), "")
    if not reference or not digest:
        raise NotLazyError(
            "no-remote-labels",
            "containerd sent no image reference/layer digest labels (plain `ctr image pull`, or the "
            "CRI plugin with disable_snapshot_annotations = true)",
        )
    return LayerRef(reference, digest)


@dataclass
class _Mounted:
    ref: LayerRef
    index: LayerIndex
    reader: LayerReader
    fuse: MountedLayer
    mounted_at: float


class RemoteLayers:
    def __init__(
        self,
        client: RegistryClient,
        cache: ChunkCache,
        loop: asyncio.AbstractEventLoop,
        *,
        reader_config: ReaderConfig | None = None,
        max_toc_bytes: int = 64 << 20,
        mount_timeout: float = 60.0,
    ) -> None:
        self.mount_timeout = mount_timeout
        self.client = client
        self.cache = cache
        self.loop = loop
        self.reader_config = reader_config or ReaderConfig()
        self.max_toc_bytes = max_toc_bytes
        self._mounts: dict[Path, _Mounted] = {}
        # containerd prepares an image's layers one after another: resolve its manifest once.
        self._resolved: dict[str, tuple[float, asyncio.Task[ResolvedImage]]] = {}
        self.not_lazy = collections.Counter[str]()  # reason -> layers pulled normally
        self.lazy_mounts = 0

    # --- called from snapshotter worker threads -------------------------------------------------

    def mount(self, labels: Mapping[str, str], mountpoint: Path) -> None:
        """Mount the layer lazily at ``mountpoint`` or raise NotLazyError (recorded and logged)."""
        future = asyncio.run_coroutine_threadsafe(self._mount(labels, mountpoint), self.loop)
        timeout = self.mount_timeout
        try:
            future.result(timeout)
        except NotLazyError as exc:
            self.not_lazy[exc.reason] += 1
            log.info(
                "layer not served lazily; containerd will download it",
                extra={"reason": exc.reason, "detail": exc.detail, "layer": labels.get(TARGET_REF_LABEL, "")},
            )
            raise
        except TimeoutError:
            future.cancel()
            self.not_lazy["timeout"] += 1
            raise NotLazyError("timeout", f"mounting took longer than {timeout}s") from None

    def check(self, mountpoint: Path) -> bool:
        mounted = self._mounts.get(mountpoint)
        return mounted is not None and mounted.fuse.is_alive()

    def unmount(self, mountpoint: Path) -> None:
        mounted = self._mounts.pop(mountpoint, None)
        if mounted is not None:
            mounted.fuse.unmount()
            asyncio.run_coroutine_threadsafe(mounted.reader.close(), self.loop).result(30)
        elif is_fuse_mountpoint(mountpoint):  # left by an earlier daemon
            from snapshotter.fuse.layerfs import unmount

            unmount(mountpoint)

    def stats(self) -> dict[str, Any]:
        return {
            "lazy_mounts": self.lazy_mounts,
            "not_lazy": dict(self.not_lazy),
            "cache": {
                "bytes": self.cache.total_bytes,
                "hits": self.cache.hits,
                "misses": self.cache.misses,
                "evictions": self.cache.evictions,
            },
            "layers": {
                m.ref.digest: {
                    "mountpoint": str(mp),
                    "reference": m.ref.reference,
                    "format": m.index.format,
                    "blob_size": m.index.blob_size,
                    "files": len(m.index.entries),
                    "prefetch_files": len(m.index.prefetch),
                    "read_errors": m.fuse.fs.read_errors,
                    **m.reader.stats.snapshot(),
                }
                for mp, m in self._mounts.items()
            },
        }

    def stats_json(self) -> str:
        return json.dumps(self.stats(), indent=2, sort_keys=True)

    # --- on the loop ----------------------------------------------------------------------------

    async def _mount(self, labels: Mapping[str, str], mountpoint: Path) -> None:
        ref = layer_ref(labels)
        index = await self._index(ref, labels)
        blob = self.client.blob(ref.reference, ref.digest, index.blob_size)
        reader = LayerReader(index, blob, self.cache, self.loop, layer=ref.digest, config=self.reader_config)
        tree = await asyncio.to_thread(LayerTree, index)
        fuse = MountedLayer(LayerFS(tree, reader, layer=ref.digest), mountpoint)
        try:
            await asyncio.to_thread(fuse.start)
        except OSError as exc:
            raise NotLazyError("fuse-mount-failed", str(exc)) from None
        self._mounts[mountpoint] = _Mounted(ref, index, reader, fuse, time.time())
        self.lazy_mounts += 1
        reader.start()
        log.info(
            "layer mounted lazily",
            extra={
                "layer": ref.digest,
                "format": index.format,
                "files": len(index.entries),
                "at": str(mountpoint),
            },
        )

    async def _resolve(self, reference: str) -> ResolvedImage:
        now = time.monotonic()
        cached = self._resolved.get(reference)
        if cached is not None:
            when, task = cached
            failed = task.done() and (task.cancelled() or task.exception() is not None)
            if now - when > RESOLVE_TTL_SECONDS or failed:
                cached = None
        if cached is None:
            cached = (now, self.loop.create_task(self.client.resolve(reference)))
            self._resolved[reference] = cached
        return await asyncio.shield(cached[1])

    async def _index(self, ref: LayerRef, labels: Mapping[str, str]) -> LayerIndex:
        """Fetch and verify the layer's TOC."""
        try:
            image = await self._resolve(ref.reference)
        except FetchError as exc:
            raise NotLazyError(fetch_failure_reason(exc), f"{ref.reference}: {exc}") from None
        layer = next((layer for layer in image.layers if layer.digest == ref.digest), None)
        if layer is None:
            raise NotLazyError("layer-not-in-manifest", f"{ref.digest} is not a layer of {ref.reference}")
        annotations = {**layer.annotations, **labels}
        expected = annotations.get(TOC_DIGEST_LABEL) or next(
            (annotations[k] for k in ZSTD_CHUNKED_ANNOTATIONS if annotations.get(k)), None
        )
        if not expected:
            media = layer.media_type
            why = (
                "Docker media type: the registry manifest cannot carry layer annotations"
                if "docker" in media
                else "no TOC digest annotation (not an eStargz/zstd:chunked layer)"
            )
            raise NotLazyError("no-toc-digest", f"{ref.digest} ({media}): {why}")
        blob = self.client.blob(ref.reference, ref.digest, layer.size)
        try:
            tail_start = max(0, layer.size - MAX_FOOTER_SIZE)
            (tail,) = await blob.read_ranges([(tail_start, layer.size)])
            location = locate_toc(tail, layer.size, annotations)
            (raw,) = await blob.read_ranges([(location.offset, location.offset + location.length)])
            return await asyncio.to_thread(
                parse_toc,
                raw,
                location,
                blob_size=layer.size,
                expected_digest=expected,
                max_toc_bytes=self.max_toc_bytes,
            )
        except FetchError as exc:
            raise NotLazyError(fetch_failure_reason(exc), f"{ref.digest}: {exc}") from None
        except FormatError as exc:
            raise NotLazyError("bad-toc", f"{ref.digest}: {exc}") from None

    async def close(self) -> None:
        for mountpoint in list(self._mounts):
            await asyncio.to_thread(self.unmount, mountpoint)
        await self.client.close()
