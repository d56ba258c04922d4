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
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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
from snapshotter.formats import MAX_FOOTER_SIZE, TocLocation, locate_toc, nydus, parse_toc
from snapshotter.formats.index import FormatError, LayerIndex
from snapshotter.formats.nydus import BootstrapLocation
from snapshotter.fuse.layerfs import FsObserver, LayerFS, MountedLayer, is_fuse_mountpoint, unmount
from snapshotter.layertree import LayerTree
from snapshotter.profile import StartupRecorder
from snapshotter.reader import LayerReader, OnDemandActivity, ReaderConfig
from snapshotter.tocstore import StoredToc, TocStore

log = logging.getLogger(__name__)

TARGET_REF_LABEL = "containerd.io/snapshot.ref"
REMOTE_LABEL = "containerd.io/snapshot/remote"
REMOTE_LABEL_VALUE = "remote snapshot"
TOC_DIGEST_LABEL = "containerd.io/snapshot/stargz/toc.digest"
# Image reference and layer digest, from ctr-remote's handler or from the CRI plugin/nerdctl.
REFERENCE_LABELS = ("containerd.io/snapshot/remote/stargz.reference", "containerd.io/snapshot/cri.image-ref")
DIGEST_LABELS = ("containerd.io/snapshot/remote/stargz.digest", "containerd.io/snapshot/cri.layer-digest")
# Comma-separated digests of this layer and the ones above it in the image.
NEIGHBOUR_LABELS = ("containerd.io/snapshot/remote/stargz.layers", "containerd.io/snapshot/cri.image-layers")
MAX_NEIGHBOURS = 32
RESOLVE_TTL_SECONDS = 60.0
TAIL_FETCH_BYTES = 256 << 10  # footer + TOC of a layer of up to a few thousand files
ZSTD_CHUNKED_ANNOTATIONS = (
    "io.containers.zstd-chunked.manifest-checksum",
    "io.github.containers.zstd-chunked.manifest-checksum",
)


class NotLazyError(Exception):
    """This layer will be pulled normally; ``reason`` is a short machine-readable word.

    ``required``: the layer is in a format only lazysnap can mount (Nydus-like), so a normal pull
    cannot work either and Prepare must fail with this error instead."""

    def __init__(self, reason: str, detail: str, *, required: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.required = required


def fetch_failure_reason(exc: FetchError) -> str:
    """The short reason recorded for a layer that was not served lazily because of the registry."""
    if isinstance(exc, AuthError):
        return "auth-failed"
    if isinstance(exc, ManifestNotFoundError | BlobNotFoundError):
        return "not-found"
    if isinstance(exc, DigestMismatchError):
        return "digest-mismatch"
    return "registry-unreachable"


class LazyMounts(Protocol):
    """What the snapshotter asks of lazy layers: RemoteLayers in the FUSE manager, or the
    daemon's client of it."""

    def mount(self, labels: Mapping[str, str], mountpoint: Path) -> None: ...
    def check(self, mountpoint: Path) -> bool: ...
    def unmount(self, mountpoint: Path) -> None: ...
    def forget_unused(self, digests_in_use: set[str]) -> None: ...


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


class RemoteLayers:
    def __init__(
        self,
        client: RegistryClient,
        cache: ChunkCache,
        loop: asyncio.AbstractEventLoop,
        tocs: TocStore,
        *,
        reader_config: ReaderConfig | None = None,
        max_toc_bytes: int = 64 << 20,
        max_chunk_bytes: int = 64 << 20,
        mount_timeout: float = 60.0,
        recorder: StartupRecorder | None = None,
    ) -> None:
        self.client = client
        self.recorder = recorder  # startup profiles, when [profile] record is on
        self.fs_observer: FsObserver | None = None  # metrics of FUSE operations
        self.cache = cache
        self.loop = loop
        self.tocs = tocs
        self.reader_config = reader_config or ReaderConfig()
        self.max_toc_bytes = max_toc_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.mount_timeout = mount_timeout
        # Pools of their own: mounting waits on the loop, chunk decoding must never queue behind it.
        self.mount_executor = ThreadPoolExecutor(8, thread_name_prefix="lazysnap-mount")
        self.chunk_executor = ThreadPoolExecutor(8, thread_name_prefix="lazysnap-chunk")
        self.activity = OnDemandActivity()  # shared: background fetches yield to any layer's reads
        self._mounts: dict[Path, _Mounted] = {}
        self._mount_locks: collections.defaultdict[Path, threading.Lock] = collections.defaultdict(
            threading.Lock
        )
        # containerd prepares an image's layers one after another: resolve its manifest once.
        self._resolved: dict[str, tuple[float, asyncio.Task[ResolvedImage]]] = {}
        self._indexes: dict[str, asyncio.Task[LayerIndex]] = {}  # TOCs being fetched, by layer digest
        self.not_lazy = collections.Counter[str]()  # reason -> layers pulled normally
        self._closed = False
        self.lazy_mounts = 0

    # --- called from snapshotter worker threads -------------------------------------------------

    def mount(self, labels: Mapping[str, str], mountpoint: Path) -> None:
        """Mount the layer lazily at ``mountpoint`` (idempotent) or raise NotLazyError (recorded
        and logged). Never raises anything else: any failure means "pull it normally"."""
        layer = labels.get(TARGET_REF_LABEL, "")
        with self._mount_locks[mountpoint]:
            if self.check(mountpoint):
                return
            self._drop(mountpoint)  # a dead mount of ours or of an earlier process
            future = asyncio.run_coroutine_threadsafe(self._mount(labels, mountpoint), self.loop)
            try:
                future.result(self.mount_timeout)
            except NotLazyError as exc:
                self._not_lazy(exc, layer)
                raise
            except TimeoutError:
                future.cancel()
                timeout = NotLazyError(
                    "timeout",
                    f"mounting took longer than {self.mount_timeout}s",
                    required=nydus.is_nydus_layer("", labels),
                )
                self._not_lazy(timeout, layer)
                raise timeout from None
            except Exception as exc:
                log.exception("unexpected error mounting a lazy layer", extra={"layer": layer})
                err = NotLazyError(
                    "internal", f"{type(exc).__name__}: {exc}", required=nydus.is_nydus_layer("", labels)
                )
                self._not_lazy(err, layer)
                raise err from None

    def _not_lazy(self, exc: NotLazyError, layer: str) -> None:
        self.not_lazy[exc.reason] += 1
        log.info(
            "layer not served lazily; containerd will download it",
            extra={"reason": exc.reason, "detail": exc.detail, "layer": layer},
        )

    def check(self, mountpoint: Path) -> bool:
        mounted = self._mounts.get(mountpoint)
        return mounted is not None and mounted.fuse.is_alive()

    def unmount(self, mountpoint: Path) -> None:
        """Take the layer at ``mountpoint`` down (and any stale mount there). Logs, never raises."""
        with self._mount_locks[mountpoint]:
            self._drop(mountpoint)

    def _drop(self, mountpoint: Path) -> None:
        mounted = self._mounts.pop(mountpoint, None)
        try:
            if mounted is not None:
                try:
                    mounted.fuse.unmount()
                finally:
                    asyncio.run_coroutine_threadsafe(mounted.reader.close(), self.loop).result(30)
            while is_fuse_mountpoint(mountpoint):  # stacked or left by an earlier process
                unmount(mountpoint)
        except Exception:
            log.exception("failed to unmount a lazy layer", extra={"at": str(mountpoint)})

    def forget_unused(self, digests_in_use: set[str]) -> None:
        """Drop stored TOCs of layers no snapshot uses any more."""
        for path in self.tocs.dir.glob("*.json"):
            digest = path.stem.replace("-", ":", 1)
            if digest not in digests_in_use:
                self.tocs.remove(digest)

    def stats(self) -> dict[str, Any]:
        return {
            "lazy_mounts": self.lazy_mounts,
            "not_lazy": dict(self.not_lazy),
            "registry": dict(self.client.transport.counters),
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
                for mp, m in list(self._mounts.items())
            },
        }

    # --- on the loop ----------------------------------------------------------------------------

    async def _mount(self, labels: Mapping[str, str], mountpoint: Path) -> None:
        ref = layer_ref(labels)
        self._fetch_neighbours(ref, labels)
        index = await self._index(ref, labels)
        try:
            await self._mount_index(ref, index, mountpoint)
        except NotLazyError as exc:
            exc.required = index.format == "nydus"
            raise

    async def _mount_index(self, ref: LayerRef, index: LayerIndex, mountpoint: Path) -> None:
        oversized = max((c.size for e in index.entries.values() for c in e.chunks), default=0)
        if oversized > self.max_chunk_bytes:
            raise NotLazyError("chunk-too-large", f"{ref.digest}: a chunk of {oversized} bytes")
        blob = self.client.blob(ref.reference, ref.digest, index.blob_size)
        reader = LayerReader(
            index,
            blob,
            self.cache,
            self.loop,
            layer=ref.digest,
            other_blobs={d: self.client.blob(ref.reference, d, size) for d, size in index.blobs.items()},
            config=self.reader_config,
            executor=self.chunk_executor,
            activity=self.activity,
        )
        tree = await self.loop.run_in_executor(self.mount_executor, LayerTree, index)
        on_first_read = None
        if self.recorder is not None:
            on_first_read = self.recorder.layer_mounted(ref.reference)
            self.loop.call_later(self.recorder.window + 1, self._flush_profiles)
        fuse = MountedLayer(
            LayerFS(tree, reader, layer=ref.digest, on_first_read=on_first_read, observer=self.fs_observer),
            mountpoint,
        )
        started = self.loop.run_in_executor(self.mount_executor, fuse.start)
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:
            # The mount goes on in its thread; once it is up, take it down again.
            started.add_done_callback(lambda _: self.mount_executor.submit(fuse.unmount))
            raise
        except OSError as exc:
            raise NotLazyError("fuse-mount-failed", str(exc)) from None
        self._mounts[mountpoint] = _Mounted(ref, index, reader, fuse)
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

    def _flush_profiles(self) -> None:
        """Save startup profiles once a window has closed (off the loop; not after close)."""
        if self.recorder is not None and not self._closed:
            self.mount_executor.submit(self.recorder.flush)

    async def _resolve(self, reference: str) -> ResolvedImage:
        now = time.monotonic()
        for old in [r for r, (when, _) in self._resolved.items() if now - when > RESOLVE_TTL_SECONDS]:
            del self._resolved[old]
        cached = self._resolved.get(reference)
        if cached is not None:
            task = cached[1]
            if task.done() and (task.cancelled() or task.exception() is not None):
                cached = None
        if cached is None:
            cached = (now, self.loop.create_task(self.client.resolve(reference)))
            self._resolved[reference] = cached
        return await asyncio.shield(cached[1])

    async def _parse(
        self, raw: bytes, location: TocLocation | BootstrapLocation, blob_size: int, expected: str
    ) -> LayerIndex:
        if isinstance(location, BootstrapLocation):
            parse: Callable[[], LayerIndex] = functools.partial(
                nydus.parse_bootstrap,
                raw,
                location,
                blob_size=blob_size,
                expected_digest=expected,
                max_bytes=self.max_toc_bytes,
            )
        else:
            parse = functools.partial(
                parse_toc,
                raw,
                location,
                blob_size=blob_size,
                expected_digest=expected,
                max_toc_bytes=self.max_toc_bytes,
            )
        return await self.loop.run_in_executor(self.mount_executor, parse)

    def _fetch_neighbours(self, ref: LayerRef, labels: Mapping[str, str]) -> None:
        """containerd prepares an image's layers one after another, each costing round trips to
        fetch its TOC; start fetching the TOCs of the layers above this one now, in parallel."""
        listed = next((labels[k] for k in NEIGHBOUR_LABELS if labels.get(k)), "")
        for digest in [d.strip() for d in listed.split(",") if d.strip()][:MAX_NEIGHBOURS]:
            if digest != ref.digest and digest not in self._indexes and not self.tocs.has(digest):
                self._start_index(LayerRef(ref.reference, digest), {})

    def _start_index(self, ref: LayerRef, labels: Mapping[str, str]) -> asyncio.Task[LayerIndex]:
        task = self.loop.create_task(self._fetch_index(ref, labels))
        # A neighbour fetched ahead may never be mounted; its failure is reported when it is.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._indexes[ref.digest] = task
        return task

    async def _index(self, ref: LayerRef, labels: Mapping[str, str]) -> LayerIndex:
        """The layer's verified index: being fetched ahead (a neighbour's mount started it),
        stored at an earlier mount, or fetched now."""
        task = self._indexes.get(ref.digest)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            stored = await self._stored_index(ref)
            if stored is not None:
                return stored
            task = self._start_index(ref, labels)
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._indexes.pop(ref.digest, None)

    async def _stored_index(self, ref: LayerRef) -> LayerIndex | None:
        """The index from the TOC verified at first mount, if we kept it (restart, remount)."""
        stored = await self.loop.run_in_executor(self.mount_executor, self.tocs.load, ref.digest)
        if stored is None:
            return None
        try:
            return await self._parse(stored.raw, stored.location, stored.blob_size, stored.expected_digest)
        except FormatError as exc:
            log.warning(
                "stored TOC no longer verifies; fetching it again",
                extra={"layer": ref.digest, "error": str(exc)},
            )
            self.tocs.remove(ref.digest)
            return None

    async def _fetch_index(self, ref: LayerRef, labels: Mapping[str, str]) -> LayerIndex:
        """Fetch the layer's footer and TOC, verify the TOC against the manifest, keep it."""
        try:
            image = await self._resolve(ref.reference)
        except FetchError as exc:
            raise NotLazyError(fetch_failure_reason(exc), f"{ref.reference}: {exc}") from None
        layer = next((layer for layer in image.layers if layer.digest == ref.digest), None)
        if layer is None:
            raise NotLazyError("layer-not-in-manifest", f"{ref.digest} is not a layer of {ref.reference}")
        annotations = {**layer.annotations, **labels}
        if nydus.is_nydus_layer(layer.media_type, annotations):
            index = await self._fetch_bootstrap(ref, layer.size, annotations)
            sizes = {layer.digest: layer.size for layer in image.layers}
            for digest, size in index.blobs.items():  # chunks kept once per image, in lower layers
                if sizes.get(digest) != size:
                    self.tocs.remove(ref.digest)
                    raise NotLazyError(
                        "bad-toc",
                        f"{ref.digest}: chunks in {digest} ({size} bytes), not a layer of {ref.reference}",
                        required=True,
                    )
            return index
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
        toc = await self._fetch_metadata(
            ref,
            layer.size,
            expected,
            lambda tail: locate_toc(tail[-MAX_FOOTER_SIZE:], layer.size, annotations),
        )
        return toc

    async def _fetch_bootstrap(self, ref: LayerRef, size: int, annotations: Mapping[str, str]) -> LayerIndex:
        """A Nydus-like layer: its bootstrap sits before the footer, verified against the manifest."""
        try:
            expected = nydus.bootstrap_digest(annotations)
        except FormatError as exc:
            raise NotLazyError("bad-toc", f"{ref.digest}: {exc}", required=True) from None
        if not expected:
            raise NotLazyError(
                "no-toc-digest",
                f"{ref.digest}: Nydus-like layer without {nydus.BOOTSTRAP_DIGEST_ANNOTATION}",
                required=True,
            )
        try:
            return await self._fetch_metadata(
                ref,
                size,
                expected,
                lambda tail: nydus.locate_bootstrap(tail, size, max_bytes=self.max_toc_bytes),
            )
        except NotLazyError as exc:
            exc.required = True
            raise

    async def _fetch_metadata(
        self,
        ref: LayerRef,
        size: int,
        expected: str,
        locate: Callable[[bytes], TocLocation | BootstrapLocation],
    ) -> LayerIndex:
        """Fetch the layer's footer and metadata (TOC or bootstrap), verify, parse, keep them."""
        blob = self.client.blob(ref.reference, ref.digest, size)
        try:
            # One request for the footer and, for most layers, the whole metadata before it.
            tail_start = max(0, size - TAIL_FETCH_BYTES)
            (tail,) = await blob.read_ranges([(tail_start, size)])
            location = locate(tail)
            if location.length > self.max_toc_bytes:  # checked before a byte of it is fetched
                raise NotLazyError(
                    "bad-toc", f"{ref.digest}: metadata of {location.length} bytes is over the limit"
                )
            if location.offset >= tail_start:
                raw = tail[location.offset - tail_start : location.offset - tail_start + location.length]
            else:
                (raw,) = await blob.read_ranges([(location.offset, location.offset + location.length)])
            index = await self._parse(raw, location, size, expected)
        except FetchError as exc:
            raise NotLazyError(fetch_failure_reason(exc), f"{ref.digest}: {exc}") from None
        except FormatError as exc:
            raise NotLazyError("bad-toc", f"{ref.digest}: {exc}") from None
        stored = StoredToc(ref.reference, size, expected, location, raw)
        await self.loop.run_in_executor(self.mount_executor, self.tocs.save, ref.digest, stored)
        return index

    async def close(self) -> None:
        self._closed = True
        for mountpoint in list(self._mounts):
            await self.loop.run_in_executor(self.mount_executor, self.unmount, mountpoint)
        await self.client.close()
        if self.recorder is not None:
            await self.loop.run_in_executor(self.mount_executor, self.recorder.flush)
        self.mount_executor.shutdown(wait=False, cancel_futures=True)
        self.chunk_executor.shutdown(wait=False, cancel_futures=True)
