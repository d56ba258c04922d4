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
import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from snapshotter.cache import ChunkCache
from snapshotter.contract import (
    TARGET_REF_LABEL,
    LayerRef,
    NotLazyError,
    Served,
    layer_ref,
    neighbour_digests,
)
from snapshotter.digest import file_stem
from snapshotter.eager import EagerConfig, EagerFills, fillable
from snapshotter.erofs.layout import BlobLayout, LayoutError, plan_layout, tar_layout
from snapshotter.erofs.writer import ImageError
from snapshotter.erofslayers import BLOB_READAHEAD_BYTES, LOCAL_FLAG, ErofsLayers, LayerBlob
from snapshotter.fetcher import (
    AuthError,
    BlobNotFoundError,
    Descriptor,
    DigestMismatchError,
    FetchError,
    InvalidReferenceError,
    ManifestNotFoundError,
    RegistryClient,
    ResolvedImage,
    parse_reference,
)
from snapshotter.formats import gzindex, registry
from snapshotter.formats.index import FormatError, LayerIndex
from snapshotter.formats.registry import LayerFormat, Location
from snapshotter.fuse.layerfs import FsObserver, LayerFS, MountedLayer
from snapshotter.gzdiscovery import FoundIndex, find_indexes
from snapshotter.layertree import LayerTree
from snapshotter.lookups import Lookups
from snapshotter.mounts import mount_type, unmount
from snapshotter.profile import StartupRecorder
from snapshotter.reader import LayerReader, ReaderConfig
from snapshotter.scheduler import FetchScheduler, SchedulerConfig
from snapshotter.startupsets import LAYER as LAYER_STARTUP
from snapshotter.startupsets import StartupSet, StartupSets
from snapshotter.tocstore import StoredToc, TocStore

log = logging.getLogger(__name__)

MAX_NEIGHBOURS = 32
# Indexes fetched ahead for layers not mounted yet are held at most this long, and cost at most
# this much memory at once: an image's layers that never get mounted (a failed pull, a layer
# another snapshotter takes) must not hold memory forever. A parsed index costs about 2 KiB per
# entry (benchmarks/results/2026-12-06-toc-cost.md).
SPECULATIVE_TTL_SECONDS = 120.0
SPECULATIVE_BUDGET_BYTES = 256 << 20
INDEX_BYTES_PER_ENTRY = 2048
RESOLVE_TTL_SECONDS = 60.0
# The hole between a data blob's startup files and the rest. The kernel reads a blob ahead by more
# than its readahead setting past the last startup file (EROFS's readahead and the blob file's
# add up): with one BLOB_READAHEAD_BYTES of hole, a container that read a startup file to its
# end still fetched the whole next file on demand (tests/e2e/test_shared_profile.py). A hole is
# free: it is read as zeros, never fetched.
STARTUP_SEPARATION_BYTES = 4 * BLOB_READAHEAD_BYTES
TAIL_FETCH_BYTES = 256 << 10  # footer + TOC of a layer of up to a few thousand files


def fetch_failure_reason(exc: FetchError) -> str:
    """The short reason recorded for a layer that was not served lazily because of the registry."""
    if isinstance(exc, AuthError):
        return "auth-failed"
    if isinstance(exc, ManifestNotFoundError | BlobNotFoundError):
        return "not-found"
    if isinstance(exc, DigestMismatchError):
        return "digest-mismatch"
    return "registry-unreachable"


Discovered = tuple[dict[str, FoundIndex], list[str]]  # gzip indexes by layer, artifacts skipped


class Indexed(NamedTuple):
    """A layer's verified index and the format it came in."""

    layer_format: LayerFormat
    layer_index: LayerIndex


class LayerMount(Protocol):
    """A mounted lazy layer, whichever backend serves it."""

    @property
    def read_errors(self) -> int: ...
    @property
    def local(self) -> bool: ...  # reads a local copy of the layer: nothing to fetch or serve
    def is_alive(self) -> bool: ...
    def unmount(self) -> None: ...


class FuseMount:
    """The per-file FUSE backend: a ``LayerFS`` served by libfuse in a thread."""

    def __init__(self, layer: MountedLayer) -> None:
        self.layer = layer
        self.local = False

    @property
    def read_errors(self) -> int:
        return self.layer.fs.read_errors

    def is_alive(self) -> bool:
        return self.layer.is_alive()

    def unmount(self) -> None:
        self.layer.unmount()


@dataclass
class _Mounted:
    ref: LayerRef
    index: LayerIndex
    reader: LayerReader
    mount: LayerMount
    startup_source: str = LAYER_STARTUP  # what chose the startup set (startupsets.LOCAL, SHARED)
    startup_files: int = 0  # the profile's files in this layer


class RemoteLayers:
    def __init__(
        self,
        client: RegistryClient,
        cache: ChunkCache,
        loop: asyncio.AbstractEventLoop,
        tocs: TocStore,
        *,
        reader_config: ReaderConfig | None = None,
        max_toc_bytes: int = 32 << 20,
        max_chunk_bytes: int = 64 << 20,
        mount_timeout: float = 60.0,
        recorder: StartupRecorder | None = None,
        erofs: ErofsLayers | None = None,
        scheduler_config: SchedulerConfig | None = None,
        gzip_index: bool = True,
        shared_profiles: bool = True,
    ) -> None:
        self.client = client
        self.gzip_index = gzip_index  # look for referrer gzip indexes of plain gzip layers
        # The kernel backend (EROFS over data blobs); None: the per-file FUSE backend.
        self.erofs = erofs
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
        # Each image's startup working set: a profile recorded here, else one shared in the registry.
        self.startup_sets = StartupSets(
            client,
            loop,
            self.mount_executor,
            recorder=recorder,
            shared=shared_profiles,
            list_referrers=self._referrers,
        )
        # One fetch scheduler per registry host, shared by every layer and image fetched from it.
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.schedulers: dict[str, FetchScheduler] = {}
        self._mounts: dict[Path, _Mounted] = {}
        self._mount_locks: collections.defaultdict[Path, threading.Lock] = collections.defaultdict(
            threading.Lock
        )
        # containerd prepares an image's layers one after another: resolve its manifest once, and
        # list its referrers once for both discoveries (gzip indexes, a shared startup profile).
        self._resolved: Lookups[ResolvedImage] = Lookups(loop, RESOLVE_TTL_SECONDS)
        self._referrer_lists: Lookups[list[Descriptor]] = Lookups(loop, RESOLVE_TTL_SECONDS)
        self._indexes: dict[str, asyncio.Task[Indexed]] = {}  # TOCs being fetched, by layer digest
        # The gzip indexes attached to an image, looked up once per pulled manifest digest.
        self._gzip_indexes: Lookups[Discovered] = Lookups(loop, RESOLVE_TTL_SECONDS)
        # Of those, the ones fetched ahead for a neighbour: digest -> when the fetch started.
        self._speculative: dict[str, float] = {}
        # The blob tails fetched with each layer's metadata (its last chunks come with the footer
        # and TOC), until the layer is mounted and its reader takes them: digest -> (offset, bytes).
        self._tails: dict[str, tuple[int, bytes]] = {}
        self.not_lazy = collections.Counter[str]()  # reason -> layers pulled normally
        self._closed = False
        self.lazy_mounts = 0
        self.eager: EagerFills | None = None  # the eager fallback, when [fallback] mode = "eager"

    # --- called from snapshotter worker threads -------------------------------------------------

    def mount(self, labels: Mapping[str, str], mountpoint: Path, lowerdirs: Sequence[Path] = ()) -> Served:
        """Mount the layer lazily at ``mountpoint`` (idempotent), or with the eager fallback fill
        it there, or raise NotLazyError (recorded and logged). Never raises anything else: any
        failure means "pull it normally"."""
        layer = labels.get(TARGET_REF_LABEL, "")
        with self._mount_locks[mountpoint]:
            if self.check(mountpoint):
                return Served.MOUNTED
            self._drop(mountpoint)  # a dead mount of ours or of an earlier process
            future = asyncio.run_coroutine_threadsafe(self._mount(labels, mountpoint), self.loop)
            try:
                future.result(self.mount_timeout)
            except NotLazyError as exc:
                if self.eager is not None and fillable(exc):
                    return self._fill_eagerly(labels, mountpoint, lowerdirs, exc)
                self._not_lazy(exc, layer)
                raise
            except TimeoutError:
                future.cancel()
                timeout = NotLazyError(
                    "timeout",
                    f"mounting took longer than {self.mount_timeout}s",
                    required=registry.requires_lazy_mount(labels),
                )
                self._not_lazy(timeout, layer)
                raise timeout from None
            except Exception as exc:
                log.exception("unexpected error mounting a lazy layer", extra={"layer": layer})
                err = NotLazyError(
                    "internal", f"{type(exc).__name__}: {exc}", required=registry.requires_lazy_mount(labels)
                )
                self._not_lazy(err, layer)
                raise err from None
        return Served.MOUNTED

    def enable_eager(self, root: Path, config: EagerConfig) -> None:
        """Turn on the eager fallback: layers that cannot be lazy are unpacked here (staged under
        ``root``/eager) and handed over through the handshake. Call before serving."""
        self.eager = EagerFills(
            root,
            self.loop,
            resolve=self._resolve,
            blob=self.client.blob,
            scheduler=self._scheduler,
            lazy_capable=self._lazy_capable,
            config=config,
        )
        self.eager.clear_staging()

    @staticmethod
    def _lazy_capable(layer: Descriptor) -> bool:
        """Whether a layer of an image will (very likely) be mounted lazily: the eager fallback
        does not fetch such layers ahead."""
        return registry.format_of(layer.media_type, layer.annotations) is not None

    def _fill_eagerly(
        self, labels: Mapping[str, str], mountpoint: Path, lowerdirs: Sequence[Path], why: NotLazyError
    ) -> Served:
        """The eager fallback for a layer that cannot be lazy (``why``): fill ``mountpoint`` with
        it, or NotLazyError saying why neither worked (recorded and logged)."""
        assert self.eager is not None
        layer = labels.get(TARGET_REF_LABEL, "")
        try:
            ref = layer_ref(labels)
            future = asyncio.run_coroutine_threadsafe(
                self.eager.fill(ref, dict(labels), mountpoint, lowerdirs), self.loop
            )
            future.result()  # the fill has its own timeout
        except NotLazyError as exc:
            err = NotLazyError(exc.reason, f"{exc.detail} (not lazy: {why.reason}: {why.detail})")
            self._not_lazy(err, layer)
            raise err from None
        except Exception as exc:
            log.exception("unexpected error in the eager fallback", extra={"layer": layer})
            err = NotLazyError("eager-internal", f"{type(exc).__name__}: {exc}")
            self._not_lazy(err, layer)
            raise err from None
        return Served.FILLED

    def _not_lazy(self, exc: NotLazyError, layer: str) -> None:
        self.not_lazy[exc.reason] += 1
        log.info(
            "layer not served lazily; containerd will download it",
            extra={"reason": exc.reason, "detail": exc.detail, "layer": layer},
        )

    def mounted(self) -> int:
        """How many lazy layers this process serves right now."""
        return len(self._mounts)

    def check(self, mountpoint: Path) -> bool:
        mounted = self._mounts.get(mountpoint)
        return mounted is not None and mounted.mount.is_alive()

    def unmount(self, mountpoint: Path) -> None:
        """Take the layer at ``mountpoint`` down (and any stale mount there). Logs, never raises."""
        with self._mount_locks[mountpoint]:
            self._drop(mountpoint)

    def _drop(self, mountpoint: Path) -> None:
        mounted = self._mounts.pop(mountpoint, None)
        try:
            if mounted is not None:
                try:
                    mounted.mount.unmount()
                finally:
                    asyncio.run_coroutine_threadsafe(mounted.reader.close(), self.loop).result(30)
            while mount_type(mountpoint) in ("erofs", "fuse", "fuse.lazysnap"):  # left by an earlier process
                unmount(mountpoint)
        except Exception:
            log.exception("failed to unmount a lazy layer", extra={"at": str(mountpoint)})

    def forget_unused(self, digests_in_use: set[str]) -> None:
        """Drop stored TOCs (and metadata images, local blobs) of layers no snapshot uses any more."""
        for digest in list(self.tocs.digests()):
            if digest not in digests_in_use:
                self.tocs.remove(digest)
                if self.erofs is not None:
                    self.erofs.image_path(digest).unlink(missing_ok=True)
                    self.erofs.layout_path(digest).unlink(missing_ok=True)
                    self.erofs.remove_local_blob(digest)
                    self.cache.set_local_bytes(self.erofs.local_blob_bytes())

    def stats(self) -> dict[str, Any]:
        blobs = {"blobs": self.erofs.server.stats()} if self.erofs is not None else {}
        return {
            **blobs,  # the blob server's counters (EROFS backend): reads in flight, resent requests
            "lazy_mounts": self.lazy_mounts,
            "not_lazy": dict(self.not_lazy),
            "profiles": self.startup_sets.stats(),  # the startup sets layers were mounted with
            **({"eager": self.eager.stats()} if self.eager is not None else {}),
            "registry": dict(self.client.transport.counters),
            "links": {host: scheduler.snapshot() for host, scheduler in self.schedulers.items()},
            "cache": {
                "bytes": self.cache.total_bytes,
                "local_blob_bytes": self.cache.local_bytes,  # complete layers kept whole
                "max_bytes": self.cache.max_bytes,
                "bytes_by_class": self.cache.class_bytes(),
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
                    # local / shared: an image profile chose startup_files; layer: the format's list
                    "startup_source": m.startup_source,
                    "startup_files": m.startup_files,
                    "read_errors": m.mount.read_errors,
                    "local_blob": m.mount.local,  # served by the kernel from a local copy alone
                    **m.reader.stats.snapshot(),
                }
                for mp, m in list(self._mounts.items())
            },
        }

    # --- on the loop ----------------------------------------------------------------------------

    async def _mount(self, labels: Mapping[str, str], mountpoint: Path) -> None:
        ref = layer_ref(labels)
        self._fetch_neighbours(ref, labels)
        startup: StartupSet | None = None
        # A layer whose metadata this node kept was mounted here before (a restart, a remount, an
        # image sharing it): its startup set was fetched then, and the registry must not be
        # needed to mount it again.
        wanted = self.recorder is not None or self.startup_sets.shared
        mounted_before = ref.digest not in self._indexes and self.tocs.has(ref.digest)  # not fetched ahead
        if wanted and self.reader_config.prefetch and not mounted_before:
            (fmt, index), startup = await self.startup_sets.for_image(
                ref.reference, lambda: self._manifest_digest(ref), self._index(ref, labels)
            )
        else:
            fmt, index = await self._index(ref, labels)
        try:
            await self._mount_index(ref, index, mountpoint, labels, startup)
        except NotLazyError as exc:
            exc.required = fmt.lazy_only
            raise

    async def _manifest_digest(self, ref: LayerRef) -> str:
        """The digest of the image manifest the layer is pulled with."""
        return ref.manifest_digest or (await self._resolve(ref)).manifest_digest

    def _reader(self, ref: LayerRef, index: LayerIndex, startup: list[str] | None = None) -> LayerReader:
        oversized = max((c.size for e in index.entries.values() for c in e.chunks), default=0)
        if oversized > self.max_chunk_bytes:
            raise NotLazyError("chunk-too-large", f"{ref.digest}: a chunk of {oversized} bytes")
        return LayerReader(
            index,
            self.client.blob(ref.reference, ref.digest, index.blob_size),
            self.cache,
            self.loop,
            layer=ref.digest,
            other_blobs={d: self.client.blob(ref.reference, d, size) for d, size in index.blobs.items()},
            scheduler=self._scheduler(ref),
            config=self.reader_config,
            executor=self.chunk_executor,
            startup_files=startup,
        )

    def _scheduler(self, ref: LayerRef) -> FetchScheduler:
        """The fetch scheduler of the layer's registry (mirrors included: one link to reason about)."""
        try:
            host = parse_reference(ref.reference).host
        except InvalidReferenceError as exc:
            raise NotLazyError("bad-labels", str(exc)) from None
        scheduler = self.schedulers.get(host)
        if scheduler is None:
            scheduler = self.schedulers[host] = FetchScheduler(self.loop, self.scheduler_config, name=host)
        return scheduler

    def _first_reads(self, ref: LayerRef) -> Callable[[str], None] | None:
        if self.recorder is None:
            return None
        self.loop.call_later(self.recorder.window + 1, self._flush_profiles)
        manifest = ref.manifest_digest
        if not manifest:  # resolved by now when the startup set was looked up
            with contextlib.suppress(InvalidReferenceError):
                task = self._resolved.peek(str(parse_reference(ref.reference)))
                if task is not None and task.done() and not task.cancelled() and task.exception() is None:
                    manifest = task.result().manifest_digest
        return self.recorder.layer_mounted(ref.reference, manifest)

    def _layer_blob(
        self,
        erofs: ErofsLayers,
        ref: LayerRef,
        tree: LayerTree,
        index: LayerIndex,
        reader: LayerReader,
        on_first_read: Callable[[str], None] | None,
        *,
        adopting: bool = False,
        startup_files: list[str] | None = None,
    ) -> LayerBlob:
        """The layer's data blob: its startup set (the image's profile's files, else its
        prioritized files) first, in access order, and a readahead's worth of hole before the
        rest; or, while mounted images point into an earlier layout of it
        (``ErofsLayers.blob_layout``), that one."""
        layout = erofs.blob_layout(
            ref.digest, tree, lambda: self._plan(tree, index, startup_files), adopting=adopting
        )
        blob = LayerBlob(layout, reader, on_first_read=on_first_read, observer=self.fs_observer)
        blob.local_path = erofs.local_blob(ref.digest, layout)
        return blob

    def _start_fetching(
        self, ref: LayerRef, reader: LayerReader, mount: LayerMount, blob: LayerBlob | None
    ) -> None:
        """Offer a mounted layer's chunks to the scheduler, unless it reads a local copy."""
        if mount.local:
            reader.stats.prefetch_done = reader.stats.background_done = True  # nothing to fetch
            return
        if blob is not None:  # the EROFS backend keeps a complete layer as a local blob
            reader.on_complete = functools.partial(self._layer_complete, ref.digest, blob)
        reader.start()

    def _layer_complete(self, digest: str, blob: LayerBlob) -> None:
        """Every chunk of a layer is in the cache (on the loop): keep its data blob as a local
        file, when the cache budget has room for it, so that later mounts need no process."""
        erofs = self.erofs
        if erofs is None or blob.local_path is not None or self._closed:
            return
        if not self.cache.room_for_local(blob.size):
            log.info(
                "layer complete; no room in the cache budget to keep it as a local blob",
                extra={"layer": digest, "blob_size": blob.size, "local_bytes": self.cache.local_bytes},
            )
            return
        self.mount_executor.submit(self._assemble, erofs, digest, blob)

    def _assemble(self, erofs: ErofsLayers, digest: str, blob: LayerBlob) -> None:
        try:
            if not erofs.assemble(digest, blob.layout, blob.reader):
                return  # a chunk left the cache meanwhile: the layer stays served from chunks
            blob.local_path = erofs.local_blob_path(digest)
            self.cache.set_local_bytes(erofs.local_blob_bytes())
            # Its chunks now exist twice; they are the first to go when the cache needs room.
            self.cache.release([c.digest for e in blob.reader.index.entries.values() for c in e.chunks])
        except Exception:
            log.exception("failed to keep a complete layer as a local blob", extra={"layer": digest})

    @staticmethod
    def _plan(tree: LayerTree, index: LayerIndex, startup_files: list[str] | None = None) -> BlobLayout:
        """A plain tar layer's data blob is its uncompressed tar stream: neighbours in the blob are
        neighbours in the compressed spans it is fetched by. Else startup files first (so that
        the kernel's readahead past them reads a hole, not files nobody asked for)."""
        if index.tar_size:
            return tar_layout(tree, index.tar_offsets, index.tar_size)
        order = startup_files if startup_files is not None else index.prefetch
        return plan_layout(tree, order, separation=STARTUP_SEPARATION_BYTES)

    async def _mount_index(
        self,
        ref: LayerRef,
        index: LayerIndex,
        mountpoint: Path,
        labels: Mapping[str, str],
        startup: StartupSet | None = None,
    ) -> None:
        # An image profile replaces the layer's own prefetch list: it says what this image reads.
        startup_files = startup.in_layer(index.entries.__contains__) if startup is not None else None
        reader = self._reader(ref, index, startup_files)
        tree = await self.loop.run_in_executor(self.mount_executor, LayerTree, index)
        on_first_read = self._first_reads(ref)
        mount: LayerMount
        if self.erofs is not None:
            erofs = self.erofs
            blob = self._layer_blob(
                erofs, ref, tree, index, reader, on_first_read, startup_files=startup_files
            )
            mounting = self.loop.run_in_executor(
                self.mount_executor, erofs.mount, ref.digest, tree, blob, mountpoint, labels
            )
            try:
                mount = await asyncio.shield(mounting)
            except asyncio.CancelledError:
                mounting.add_done_callback(
                    lambda f: f.cancelled() or f.exception() or self.mount_executor.submit(f.result().unmount)
                )
                raise
            except (OSError, ImageError) as exc:
                raise NotLazyError("erofs-mount-failed", f"{ref.digest}: {exc}") from None
        else:
            blob = None
            fuse = MountedLayer(
                LayerFS(
                    tree, reader, layer=ref.digest, on_first_read=on_first_read, observer=self.fs_observer
                ),
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
            mount = FuseMount(fuse)
        source = startup.source if startup is not None else LAYER_STARTUP
        self._mounts[mountpoint] = _Mounted(ref, index, reader, mount, source, len(startup_files or ()))
        self.startup_sets.counted(startup)
        self.lazy_mounts += 1
        tail = self._tails.pop(ref.digest, None)
        if tail is not None and not mount.local:
            reader.seed(*tail)
        self._start_fetching(ref, reader, mount, blob)
        log.info(
            "layer mounted lazily",
            extra={
                "layer": ref.digest,
                "format": index.format,
                "files": len(index.entries),
                "backend": "fuse" if self.erofs is None else "erofs-local" if mount.local else "erofs",
                "at": str(mountpoint),
            },
        )

    async def start(self) -> None:
        """Take up what an earlier manager left (EROFS backend): rebuild the blob sources of the
        layers still mounted from their stored metadata, then start or resume the blob server,
        whose connection the fd holder kept. Reads that waited meanwhile go on."""
        if self.erofs is None:
            return
        erofs = self.erofs
        adopted: list[tuple[Path, _Mounted, LayerBlob]] = []
        for mountpoint, labels in erofs.recorded().items():
            try:
                ref = layer_ref(labels)
                stored = await self._stored_index(ref)
                if stored is None:
                    raise NotLazyError("no-stored-toc", f"{ref.digest}: its metadata is gone")
                index = stored.layer_index
                reader = self._reader(ref, index)
                tree = await self.loop.run_in_executor(self.mount_executor, LayerTree, index)
                try:
                    blob = self._layer_blob(erofs, ref, tree, index, reader, None, adopting=True)
                except LayoutError as exc:  # serving another layout would give wrong bytes
                    raise NotLazyError("bad-layout", f"{ref.digest}: {exc}") from None
            except NotLazyError as exc:
                log.warning(
                    "cannot serve a lazy layer left mounted; dropping it",
                    extra={"at": str(mountpoint), "reason": str(exc)},
                )
                await self.loop.run_in_executor(self.mount_executor, unmount, mountpoint)
                continue
            local = bool(labels.get(LOCAL_FLAG)) and blob.local_path is not None
            mount = erofs.adopt(ref.digest, blob, mountpoint, local=local)
            adopted.append((mountpoint, _Mounted(ref, index, reader, mount), blob))
        self.cache.set_local_bytes(erofs.local_blob_bytes())
        served = [(mp, m, blob) for mp, m, blob in adopted if not m.mount.local]
        sources = {file_stem(m.ref.digest): blob for _, m, blob in served}
        await self.loop.run_in_executor(self.mount_executor, erofs.start, sources)
        if not erofs.server.resumed:
            # A fresh connection: the served mounts were dropped (the daemon mounts them again);
            # those over local blobs need none and stay.
            adopted = [a for a in adopted if a[1].mount.local]
        for mountpoint, mounted, blob in adopted:
            self._mounts[mountpoint] = mounted
            self._start_fetching(mounted.ref, mounted.reader, mounted.mount, blob)
        if adopted:
            log.info("lazy layers taken over from the previous FUSE manager", extra={"layers": len(adopted)})

    def _flush_profiles(self) -> None:
        """Save startup profiles once a window has closed (off the loop; not after close)."""
        if self.recorder is not None and not self._closed:
            self.mount_executor.submit(self.recorder.flush)

    async def _resolve(self, ref: LayerRef) -> ResolvedImage:
        """The image manifest the layer belongs to: the one containerd pulled when a label names
        its digest (resolved by digest and verified), else what the reference resolves to now."""
        try:
            parsed = parse_reference(ref.reference)
        except InvalidReferenceError as exc:
            raise NotLazyError("bad-labels", str(exc)) from None
        if ref.manifest_digest:
            parsed = dataclasses.replace(parsed, digest=ref.manifest_digest)
        task = self._resolved.task(str(parsed), lambda: self.client.resolve(parsed))
        try:
            return await asyncio.shield(task)
        except FetchError as exc:
            raise NotLazyError(fetch_failure_reason(exc), f"{ref.reference}: {exc}") from None

    async def _parse(
        self, fmt: LayerFormat, raw: bytes, location: Location, blob_size: int, expected: str
    ) -> LayerIndex:
        parse = functools.partial(
            fmt.parse, raw, location, blob_size, expected, self.max_toc_bytes, self.max_chunk_bytes
        )
        return await self.loop.run_in_executor(self.mount_executor, parse)

    def _fetch_neighbours(self, ref: LayerRef, labels: Mapping[str, str]) -> None:
        """containerd prepares an image's layers one after another, each costing round trips to
        fetch its TOC; start fetching the TOCs of the layers above this one now, in parallel,
        within the budget for indexes of layers not mounted yet."""
        self._expire_speculative()
        for digest in neighbour_digests(labels, MAX_NEIGHBOURS):
            if (
                len(self._speculative) >= MAX_NEIGHBOURS
                or self._speculative_bytes() > SPECULATIVE_BUDGET_BYTES
            ):
                break
            if digest != ref.digest and digest not in self._indexes and not self.tocs.has(digest):
                self._start_index(dataclasses.replace(ref, digest=digest), {})
                self._speculative[digest] = self.loop.time()

    def _speculative_bytes(self) -> int:
        """What the parsed indexes fetched ahead cost, estimated from their metadata's size."""
        total = 0
        for digest in self._speculative:
            task = self._indexes.get(digest)
            if task is not None and task.done() and not task.cancelled() and task.exception() is None:
                total += len(task.result().layer_index.entries) * INDEX_BYTES_PER_ENTRY
        return total

    def _expire_speculative(self) -> None:
        now = self.loop.time()
        for digest, started in list(self._speculative.items()):
            task = self._indexes.get(digest)
            if task is None:  # mounted (consumed) meanwhile
                del self._speculative[digest]
            elif now - started > SPECULATIVE_TTL_SECONDS and task.done():
                del self._speculative[digest]
                del self._indexes[digest]  # its metadata stays stored; a mount parses it again
                self._tails.pop(digest, None)

    def _start_index(self, ref: LayerRef, labels: Mapping[str, str]) -> asyncio.Task[Indexed]:
        task = self.loop.create_task(self._fetch_index(ref, labels))
        # A neighbour fetched ahead may never be mounted; its failure is reported when it is.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._indexes[ref.digest] = task
        return task

    async def _index(self, ref: LayerRef, labels: Mapping[str, str]) -> Indexed:
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
                self._speculative.pop(ref.digest, None)

    async def _stored_index(self, ref: LayerRef) -> Indexed | None:
        """The index from the metadata verified at first mount, if we kept it (restart, remount)."""
        stored = await self.loop.run_in_executor(self.mount_executor, self.tocs.load, ref.digest)
        if stored is None:
            return None
        fmt = registry.by_name(stored.format)
        try:
            index = await self._parse(
                fmt, stored.raw, stored.location, stored.blob_size, stored.expected_digest
            )
        except FormatError as exc:
            log.warning(
                "stored TOC no longer verifies; fetching it again",
                extra={"layer": ref.digest, "error": str(exc)},
            )
            self.tocs.remove(ref.digest)
            return None
        return Indexed(fmt, index)

    async def _fetch_index(self, ref: LayerRef, labels: Mapping[str, str]) -> Indexed:
        """Find the layer in its manifest, fetch its footer and metadata, verify the metadata
        against the digest the manifest gives, parse it and keep it."""
        image = await self._resolve(ref)
        if ref.manifest_digest and image.manifest_digest != ref.manifest_digest:
            raise NotLazyError(
                "manifest-mismatch",
                f"{ref.reference} resolved to {image.manifest_digest}, "
                f"containerd pulled {ref.manifest_digest}",
            )
        layer = next((layer for layer in image.layers if layer.digest == ref.digest), None)
        if layer is None:
            raise NotLazyError("layer-not-in-manifest", f"{ref.digest} is not a layer of {ref.reference}")
        annotations = gzindex.without_discovery({**layer.annotations, **labels})
        fmt = registry.format_of(layer.media_type, annotations)
        if fmt is None and gzindex.is_plain_gzip_layer(layer.media_type) and self.gzip_index:
            found = await self._gzip_index_of(ref, image.manifest_digest)
            annotations = {**annotations, **found.annotations()}
            fmt = registry.format_of(layer.media_type, annotations)
        if fmt is None:
            media = layer.media_type
            why = (
                "Docker media type: the registry manifest cannot carry layer annotations"
                if "docker" in media
                else "no TOC digest annotation (not an eStargz/zstd:chunked/Nydus-like layer)"
            )
            raise NotLazyError("no-toc-digest", f"{ref.digest} ({media}): {why}")
        try:
            try:
                expected = fmt.expected_digest(annotations)
            except FormatError as exc:
                raise NotLazyError("bad-toc", f"{ref.digest}: {exc}") from None
            if not expected:
                raise NotLazyError(
                    "no-toc-digest", f"{ref.digest}: a {fmt.name} layer without its metadata digest"
                )
            index = await self._fetch_metadata(ref, fmt, layer.size, expected, annotations)
            sizes = {layer.digest: layer.size for layer in image.layers}
            for digest, size in index.blobs.items():  # chunks kept once per image, in lower layers
                if sizes.get(digest) != size:
                    self.tocs.remove(ref.digest)
                    raise NotLazyError(
                        "bad-toc",
                        f"{ref.digest}: chunks in {digest} ({size} bytes), not a layer of {ref.reference}",
                    )
        except NotLazyError as exc:
            exc.required = fmt.lazy_only
            raise
        return Indexed(fmt, index)

    async def _referrers(self, reference: str, manifest_digest: str) -> list[Descriptor]:
        """The referrers of manifest ``manifest_digest`` in ``reference``'s repository, listed once
        per RESOLVE_TTL_SECONDS for every discovery that asks."""
        parsed = parse_reference(reference)
        key = f"{parsed.host}/{parsed.repository}@{manifest_digest}"
        task = self._referrer_lists.task(key, lambda: self.client.referrers(parsed, manifest_digest))
        return await asyncio.shield(task)

    async def _gzip_index_of(self, ref: LayerRef, manifest_digest: str) -> FoundIndex:
        """The gzip index attached to the pulled manifest for this layer (discovery runs once per
        manifest, for all its layers); NotLazyError saying why there is none."""
        task = self._gzip_indexes.task(
            manifest_digest,
            lambda: find_indexes(self.client, ref.reference, manifest_digest, self._referrers),
        )
        try:
            found, skipped = await asyncio.shield(task)
        except FetchError as exc:
            raise NotLazyError(
                fetch_failure_reason(exc), f"{ref.digest}: looking for a gzip index: {exc}"
            ) from None
        index = found.get(ref.digest)
        if index is None:
            why = f"; skipped: {'; '.join(skipped)}" if skipped else ""
            # The reason plain layers always had: no lazily pullable metadata.
            raise NotLazyError(
                "no-toc-digest",
                f"{ref.digest}: a plain gzip layer, and no gzip index of it is attached to "
                f"{manifest_digest} (lazysnap index --push){why}",
            )
        return index

    async def _fetch_metadata(
        self, ref: LayerRef, fmt: LayerFormat, size: int, expected: str, annotations: Mapping[str, str]
    ) -> LayerIndex:
        """Fetch the layer's footer and metadata (TOC or bootstrap), verify, parse, keep them."""
        if fmt.metadata_blob is not None:
            return await self._fetch_metadata_blob(ref, fmt, size, expected, annotations)
        blob = self.client.blob(ref.reference, ref.digest, size)
        try:
            # One request for the footer and, for most layers, the whole metadata before it.
            tail_start = max(0, size - TAIL_FETCH_BYTES)
            (tail,) = await blob.read_ranges([(tail_start, size)])
            location = fmt.locate(tail, size, annotations, self.max_toc_bytes)
            if location.length > self.max_toc_bytes:  # checked before a byte of it is fetched
                raise NotLazyError(
                    "bad-toc", f"{ref.digest}: metadata of {location.length} bytes is over the limit"
                )
            if location.offset >= tail_start:
                raw = tail[location.offset - tail_start : location.offset - tail_start + location.length]
            else:
                (raw,) = await blob.read_ranges([(location.offset, location.offset + location.length)])
            index = await self._parse(fmt, raw, location, size, expected)
        except FetchError as exc:
            raise NotLazyError(fetch_failure_reason(exc), f"{ref.digest}: {exc}") from None
        except FormatError as exc:
            raise NotLazyError("bad-toc", f"{ref.digest}: {exc}") from None
        if location.offset > tail_start:  # the tail holds chunks too: the reader takes them
            self._tails[ref.digest] = (tail_start, tail[: location.offset - tail_start])
            while len(self._tails) > 2 * MAX_NEIGHBOURS:  # layers never mounted: forget the oldest
                del self._tails[next(iter(self._tails))]
        stored = StoredToc(ref.reference, size, expected, fmt.name, location, raw)
        await self.loop.run_in_executor(self.mount_executor, self.tocs.save, ref.digest, stored)
        return index

    async def _fetch_metadata_blob(
        self, ref: LayerRef, fmt: LayerFormat, size: int, expected: str, annotations: Mapping[str, str]
    ) -> LayerIndex:
        """A layer whose metadata is a blob of its own (a gzip index): fetch it whole, verify it
        against the digest discovery pinned, parse, keep it."""
        assert fmt.metadata_blob is not None
        reason = "bad-gzip-index"
        try:
            location = fmt.locate(b"", size, annotations, self.max_toc_bytes)
            digest, length = fmt.metadata_blob(location)
            raw = await self.client.blob(ref.reference, digest, length).read_all()
            index = await self._parse(fmt, raw, location, size, expected)
        except FetchError as exc:
            raise NotLazyError(fetch_failure_reason(exc), f"{ref.digest}: gzip index: {exc}") from None
        except FormatError as exc:
            raise NotLazyError(reason, f"{ref.digest}: {exc}") from None
        stored = StoredToc(ref.reference, size, expected, fmt.name, location, raw)
        await self.loop.run_in_executor(self.mount_executor, self.tocs.save, ref.digest, stored)
        return index

    def can_hand_over(self) -> bool:
        """Whether this process's lazy layers would survive its stop for a successor: EROFS mounts
        over a blob connection that the fd holder keeps. (The per-file FUSE backend's mounts end
        with the process.)"""
        return self.erofs is not None and self.erofs.can_hand_over()

    def prepare_handover(self) -> bool:
        """Make sure the fd holder runs and keeps the blob connection; False when the lazy layers
        would not survive a stop for a successor (then this process must not hand over)."""
        return self.erofs is not None and self.erofs.prepare_handover()

    async def close(self, *, handover: bool = False) -> None:
        """Stop serving. ``handover``: leave the EROFS mounts and the blob connection (kept by the
        fd holder) to the next manager, which resumes them; else unmount every lazy layer."""
        self._closed = True
        if self.eager is not None:
            await self.eager.close()
        if handover and self.erofs is not None:
            await self.loop.run_in_executor(
                self.mount_executor, functools.partial(self.erofs.stop, handover=True)
            )
            for mounted in list(self._mounts.values()):
                await mounted.reader.close(release=False)
            self._mounts.clear()
        else:
            for mountpoint in list(self._mounts):
                await self.loop.run_in_executor(self.mount_executor, self.unmount, mountpoint)
            if self.erofs is not None:
                await self.loop.run_in_executor(
                    self.mount_executor, functools.partial(self.erofs.stop, handover=False)
                )
        for scheduler in self.schedulers.values():
            await scheduler.close()
        await self.client.close()
        if self.recorder is not None:
            await self.loop.run_in_executor(self.mount_executor, self.recorder.flush)
        self.mount_executor.shutdown(wait=False, cancel_futures=True)
        self.chunk_executor.shutdown(wait=False, cancel_futures=True)
