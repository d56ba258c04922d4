"""The eager fallback: layers that cannot be served lazily are fetched and unpacked by lazysnap
itself, all layers of an image at once, and handed to the snapshotter through the remote-snapshot
handshake. Runs in the FUSE manager, which has the registry client and the fetch schedulers.

How a pull goes (containerd prepares an image's layers one after another, each Prepare waiting for
the one before to be committed):

1. The first Prepare whose layer cannot be lazy asks ``fill``. The image's config is fetched and
   verified against the manifest; its ``rootfs.diff_ids`` give every layer's chain ID, so the
   Prepare's target chain ID names the layer (and proves the image is the one containerd pulls).
2. That layer and every layer above it that will not be lazy start at once, ``layers_at_once`` at
   a time (lowest first): each is fetched front to back in pieces through its registry's fetch
   scheduler (``download.LayerDownload``), decompressed and unpacked as the bytes arrive
   (``decompress``, ``tarreader``, ``apply``) into a staging directory ``ROOT/eager/N/fs``, with
   both its digest and its DiffID verified at the end.
3. Each Prepare waits for its own layer, gives the directories containerd would have created with
   a lower layer's attributes those attributes (the lower layers are committed by then), and
   renames the staging directory over the snapshot's empty ``fs`` directory: the snapshotter then
   commits it as an ordinary snapshot (nothing to mount again after a restart).

Anything that goes wrong (registry, corrupt data, a digest or DiffID that does not match, a full
disk, a timeout) raises ``NotLazyError`` with an ``eager-*`` reason; the staging directory is
removed and nothing reaches the snapshot, so containerd pulls that layer itself. Staged layers
nobody claims (containerd gave up, or unpacked them itself) are removed after a while; a layer
below one claimed is never asked for again and goes at once.

Unpacked layers are snapshot data, not cache: the chunk cache's budget does not apply. Instead a
pull starts only if the disk holds the image's compressed size above ``min_free_bytes``, and a
layer fails ("eager-disk-full") as soon as free space falls below that while it unpacks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.contract import TARGET_REF_LABEL, LayerRef, NotLazyError
from snapshotter.digest import InvalidDigestError, validate_digest
from snapshotter.eager.apply import Applied, LayerError, apply_layer, copy_up_parents
from snapshotter.eager.decompress import DigestError, LayerStream, ReadAhead, StreamError, compression_of
from snapshotter.eager.download import DownloadError, LayerDownload
from snapshotter.eager.tarreader import SparseError, TarError, TarReader
from snapshotter.fetcher import BlobReader, Descriptor, FetchError, ResolvedImage
from snapshotter.mounts import remove_tree
from snapshotter.scheduler import FetchScheduler

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 8 << 20
DISK_CHECK_BYTES = 64 << 20  # free space is checked after every this many bytes written
# Why a layer was not lazy, for which an eager fill cannot help either: containerd's labels are
# missing or wrong, or the registry refused or lost the image.
NOT_FILLABLE = frozenset(
    {
        "no-remote-labels",
        "bad-labels",
        "auth-failed",
        "not-found",
        "registry-unreachable",
        "manifest-mismatch",
        "layer-not-in-manifest",
    }
)


@dataclass(frozen=True)
class EagerConfig:
    layers_at_once: int = 4
    window_bytes: int = 16 << 20  # per layer: fetched ahead of its unpacker
    min_free_bytes: int = 1 << 30
    timeout_seconds: float = 1800.0  # a Prepare waits at most this long for its layer
    unclaimed_seconds: float = 120.0  # a staged layer nobody asked for is dropped after this
    min_piece_bytes: int = 0  # a floor under the scheduler's piece size


def fillable(exc: NotLazyError) -> bool:
    """Whether a layer refused for this reason may still be filled eagerly."""
    return not exc.required and exc.reason not in NOT_FILLABLE


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            chains.append("sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest())
    return chains


class _FillError(Exception):
    """A layer's fill failed: ``reason`` (eager-*) and ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class _Layer:
    index: int
    descriptor: Descriptor
    diff_id: str
    chain_id: str
    task: asyncio.Task[tuple[Path, Applied]] | None = None  # None: not started (or dropped)
    download: LayerDownload | None = None
    claimed: bool = False  # being moved into a snapshot
    started_at: float = 0.0
    expiry: asyncio.TimerHandle | None = None


@dataclass
class _Session:
    """One image being filled: its key (repository and manifest digest), where its blobs are,
    its layers."""

    key: str
    reference: str
    layers: list[_Layer]
    by_chain: dict[str, int] = field(default_factory=dict)


class EagerFills:
    """The eager fallback of one FUSE manager; create and call on its event loop."""

    def __init__(
        self,
        root: Path,
        loop: asyncio.AbstractEventLoop,
        *,
        resolve: Callable[[LayerRef], Awaitable[ResolvedImage]],
        blob: Callable[[str, str, int], BlobReader],
        scheduler: Callable[[LayerRef], FetchScheduler],
        lazy_capable: Callable[[Descriptor], bool],
        config: EagerConfig | None = None,
    ) -> None:
        self.root = root
        self.staging = root / "eager"
        self.loop = loop
        self.config = config or EagerConfig()
        self._resolve = resolve
        self._blob = blob
        self._scheduler = scheduler
        self._lazy_capable = lazy_capable
        self._sessions: dict[str, asyncio.Task[_Session]] = {}
        self._slots = asyncio.Semaphore(self.config.layers_at_once)
        threads = self.config.layers_at_once + 2  # the unpacking, and moves and removals
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="lazysnap-eager")
        self._serial = 0
        self.fills = 0
        self.failures = collections.Counter[str]()
        self.bytes_fetched = 0
        self.bytes_unpacked = 0
        self._closed = False

    # --- life -----------------------------------------------------------------------------------

    def clear_staging(self) -> None:
        """Remove what an earlier process left staged (blocking; at start)."""
        if self.staging.exists():
            remove_tree(self.staging)
        self.staging.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def close(self) -> None:
        self._closed = True
        for session_task in list(self._sessions.values()):
            if not session_task.done() or session_task.cancelled() or session_task.exception():
                session_task.cancel()
                continue
            for layer in session_task.result().layers:
                self._drop(layer)
        self._sessions.clear()
        await self.loop.run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(OSError):
            remove_tree(self.staging)

    def stats(self) -> dict[str, Any]:
        active = 0
        for task in self._sessions.values():
            if task.done() and not task.cancelled() and task.exception() is None:
                active += sum(1 for layer in task.result().layers if layer.task and not layer.task.done())
        return {
            "fills": self.fills,
            "failures": dict(self.failures),
            "active_layers": active,
            "fetched_bytes": self.bytes_fetched,
            "unpacked_bytes": self.bytes_unpacked,
        }

    # --- the handshake --------------------------------------------------------------------------

    async def fill(
        self, ref: LayerRef, labels: dict[str, str], mountpoint: Path, lowerdirs: Sequence[Path]
    ) -> None:
        """Put the layer ``ref`` (Prepare ``labels``), unpacked and verified, at ``mountpoint`` (the
        new snapshot's empty ``fs`` directory), the parent chain's directories being
        ``lowerdirs`` (nearest first). NotLazyError (an ``eager-*`` reason) when it cannot."""
        try:
            await self._fill(ref, labels.get(TARGET_REF_LABEL, ""), mountpoint, lowerdirs)
        except _FillError as exc:
            self.failures[exc.reason] += 1
            raise NotLazyError(exc.reason, exc.detail) from None

    async def _fill(self, ref: LayerRef, target: str, mountpoint: Path, lowerdirs: Sequence[Path]) -> None:
        if self._closed:
            raise _FillError("eager-stopping", "the FUSE manager is stopping")
        self._check_mountpoint(mountpoint)
        session = await self._session(ref)
        index = session.by_chain.get(target)
        if index is None:
            raise _FillError(
                "eager-not-in-image",
                f"chain {target} is not a layer of {session.key} as this registry serves it now",
            )
        layer = session.layers[index]
        if layer.descriptor.digest != ref.digest:
            raise _FillError(
                "eager-not-in-image", f"chain {target} is layer {layer.descriptor.digest}, not {ref.digest}"
            )
        if layer.claimed:
            raise _FillError("eager-claimed", f"{ref.digest} is being handed to another snapshot")
        self._start(session, index)
        task = layer.task
        assert task is not None
        started = time.monotonic()
        try:
            staged, applied = await asyncio.wait_for(asyncio.shield(task), self.config.timeout_seconds)
        except TimeoutError:
            self._drop(layer)
            waited = self.config.timeout_seconds
            raise _FillError("eager-timeout", f"{ref.digest} not unpacked within {waited}s") from None
        except _FillError:
            self._drop(layer)
            raise
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # this Prepare was cancelled
            raise _FillError("eager-cancelled", f"{ref.digest}: its fill was stopped") from None
        if layer.claimed or layer.task is not task:  # another Prepare of the same layer took it
            raise _FillError("eager-claimed", f"{ref.digest} was handed to another snapshot")
        layer.claimed = True
        try:
            self._drop_below(session, index)
            await self.loop.run_in_executor(
                self._executor, self._move_into_place, staged, applied, mountpoint, lowerdirs
            )
        except OSError as exc:
            raise _FillError(
                "eager-internal", f"{ref.digest}: moving the unpacked layer into place: {exc}"
            ) from None
        finally:
            layer.claimed = False
            self._drop(layer)
            self._forget_if_idle(session)
        self.fills += 1
        self.bytes_unpacked += applied.bytes_written
        log.info(
            "layer unpacked by lazysnap (eager fallback)",
            extra={
                "layer": ref.digest,
                "index": index,
                "entries": applied.entries,
                "bytes": applied.bytes_written,
                "waited_s": round(time.monotonic() - started, 3),
                "took_s": round(time.monotonic() - layer.started_at, 3),
                "at": str(mountpoint),
            },
        )

    def _check_mountpoint(self, mountpoint: Path) -> None:
        """Only a snapshot's ``fs`` directory under this root may be replaced."""
        if mountpoint.name != "fs" or mountpoint.parent.parent != self.root / "snapshots":
            raise _FillError("eager-internal", f"{mountpoint} is not a snapshot directory of {self.root}")

    # --- sessions -------------------------------------------------------------------------------

    async def _session(self, ref: LayerRef) -> _Session:
        try:
            image = await self._resolve(ref)
        except NotLazyError as exc:
            raise _FillError(f"eager-{exc.reason}", exc.detail) from None
        key = _session_key(image)
        task = self._sessions.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self.loop.create_task(self._new_session(ref, image))
            self._sessions[key] = task
        return await asyncio.shield(task)

    async def _new_session(self, ref: LayerRef, image: ResolvedImage) -> _Session:
        """The image's layers with their DiffIDs and chain IDs, from its verified config."""
        config = image.config
        if config.size > MAX_CONFIG_BYTES:
            raise _FillError("eager-bad-config", f"image config of {config.size} bytes")
        try:
            raw = await self._blob(ref.reference, config.digest, config.size).read_all()
        except FetchError as exc:
            raise _FillError("eager-fetch-failed", f"image config {config.digest}: {exc}") from None
        try:
            doc = json.loads(raw)
            diff_ids = doc["rootfs"]["diff_ids"]
            if not isinstance(diff_ids, list):
                raise TypeError("rootfs.diff_ids is not a list")
            diff_ids = [validate_digest(d) for d in diff_ids]
        except (ValueError, KeyError, TypeError, InvalidDigestError) as exc:
            raise _FillError("eager-bad-config", f"image config {config.digest}: {exc}") from None
        if len(diff_ids) != len(image.layers):
            raise _FillError(
                "eager-bad-config",
                f"image config lists {len(diff_ids)} DiffIDs for {len(image.layers)} layers",
            )
        chains = chain_ids(diff_ids)
        layers = [
            _Layer(i, descriptor, diff_id, chain)
            for i, (descriptor, diff_id, chain) in enumerate(zip(image.layers, diff_ids, chains, strict=True))
        ]
        session = _Session(_session_key(image), ref.reference, layers)
        session.by_chain = {layer.chain_id: layer.index for layer in reversed(layers)}
        return session

    def _start(self, session: _Session, index: int) -> None:
        """Start the layer ``index`` unless it runs, and every layer above it that will not be lazy
        and does not run yet: the pull asks for them next. The disk must hold them all."""
        current = session.layers[index]
        above = [
            layer
            for layer in session.layers[index + 1 :]
            if layer.task is None
            and compression_of(layer.descriptor.media_type)
            and not self._lazy_capable(layer.descriptor)
        ]
        wanted = ([current] if current.task is None else []) + above
        if not wanted:
            return
        try:
            self._check_space(wanted)
        except _FillError:
            if current.task is None:
                raise
            return  # this layer runs; the ones above try again when they are asked for
        for layer in wanted:
            layer.task = self.loop.create_task(self._run(session, layer))
            layer.task.add_done_callback(functools.partial(self._finished, session, layer))

    def _check_space(self, layers: list[_Layer]) -> None:
        need = sum(layer.descriptor.size for layer in layers)
        free = shutil.disk_usage(self.staging).free
        if free - need < self.config.min_free_bytes:
            raise _FillError(
                "eager-disk-full",
                f"{free} bytes free under {self.staging}; the layers need at least their compressed "
                f"size ({need}) and fallback.min_free_bytes ({self.config.min_free_bytes}) must stay free",
            )

    def _finished(self, session: _Session, layer: _Layer, task: asyncio.Task[tuple[Path, Applied]]) -> None:
        """A layer's work ended: unless someone claims it soon, drop it."""
        if not task.cancelled():
            task.exception()  # retrieved: a failure is reported to the Prepare that asks
        if layer.task is task and not layer.claimed and not self._closed:
            layer.expiry = self.loop.call_later(self.config.unclaimed_seconds, self._expire, session, layer)

    def _expire(self, session: _Session, layer: _Layer) -> None:
        layer.expiry = None
        if not layer.claimed and layer.task is not None:
            log.info(
                "dropping an eagerly unpacked layer nobody asked for",
                extra={"layer": layer.descriptor.digest},
            )
            self._drop(layer)
        self._forget_if_idle(session)

    def _drop_below(self, session: _Session, index: int) -> None:
        """Layers below one claimed are not asked for again by this pull (containerd had them, or
        unpacked them itself): drop them."""
        for layer in session.layers[:index]:
            if not layer.claimed:
                self._drop(layer)

    def _forget_if_idle(self, session: _Session) -> None:
        if all(layer.task is None for layer in session.layers):
            self._sessions.pop(session.key, None)

    def _drop(self, layer: _Layer) -> None:
        """Stop a layer's work if it runs, remove what it staged, and forget it (a later pull
        starts it again)."""
        if layer.expiry is not None:
            layer.expiry.cancel()
            layer.expiry = None
        if layer.download is not None:
            layer.download.close()
        task, layer.task = layer.task, None
        if task is None:
            return
        if not task.done():
            task.cancel()  # the unpacking thread stops at its next read (the download is closed)
        elif not task.cancelled() and task.exception() is None:
            staged, _ = task.result()
            self.loop.run_in_executor(self._executor, _remove_staged, staged)

    # --- one layer ------------------------------------------------------------------------------

    async def _run(self, session: _Session, layer: _Layer) -> tuple[Path, Applied]:
        async with self._slots:
            return await self._unpack(session, layer)

    async def _unpack(self, session: _Session, layer: _Layer) -> tuple[Path, Applied]:
        descriptor = layer.descriptor
        compression = compression_of(descriptor.media_type)
        if compression is None:
            raise _FillError("eager-unsupported", f"{descriptor.digest}: media type {descriptor.media_type}")
        ref = LayerRef(session.reference, descriptor.digest)
        self._serial += 1
        staged = self.staging / f"{self._serial}"
        layer.started_at = time.monotonic()
        try:
            source = self._blob(session.reference, descriptor.digest, descriptor.size)
            scheduler = self._scheduler(ref)
        except (FetchError, NotLazyError, ValueError) as exc:
            raise _FillError("eager-fetch-failed", f"{descriptor.digest}: {exc}") from None
        download = LayerDownload(
            source,
            descriptor.size,
            scheduler,
            self.loop,
            window=self.config.window_bytes,
            min_piece=self.config.min_piece_bytes,
        )
        layer.download = download
        download.start()
        work = self.loop.run_in_executor(
            self._executor, self._unpack_blocking, download, layer, compression, staged
        )
        try:
            applied = await asyncio.shield(work)
        except BaseException:
            download.close()  # a cancelled wait: the thread stops at its next read
            with contextlib.suppress(BaseException):
                await work
            await self.loop.run_in_executor(None, _remove_staged, staged)
            raise
        finally:
            self.bytes_fetched += download.fetched
            layer.download = None
        return staged, applied

    def _unpack_blocking(
        self, download: LayerDownload, layer: _Layer, compression: str, staged: Path
    ) -> Applied:
        """Fetch, decompress, unpack and verify one layer into ``staged/fs`` (a worker thread)."""
        digest = layer.descriptor.digest
        fs = staged / "fs"
        staged.mkdir(mode=0o700)
        fs.mkdir(mode=0o755)
        stream = LayerStream(download.read, compression, digest, layer.diff_id)
        since_check = 0

        def written(nbytes: int) -> None:
            nonlocal since_check
            since_check += nbytes
            if since_check >= DISK_CHECK_BYTES:
                since_check = 0
                free = shutil.disk_usage(fs).free
                if free < self.config.min_free_bytes:
                    raise _FillError(
                        "eager-disk-full",
                        f"{digest}: {free} bytes left free under {fs}, below fallback.min_free_bytes",
                    )

        ahead = ReadAhead(stream)  # decompression and hashing overlap with unpacking
        try:
            tar = TarReader(ahead.read)
            applied = apply_layer(tar, os.fsencode(fs), overlay=layer.index > 0, on_written=written)
            ahead.finish()
        except DownloadError as exc:
            raise _FillError("eager-fetch-failed", f"{digest}: {exc}") from None
        except DigestError as exc:
            reason = "eager-diffid-mismatch" if "DiffID" in str(exc) else "eager-digest-mismatch"
            raise _FillError(reason, str(exc)) from None
        except SparseError as exc:
            raise _FillError("eager-unsupported", f"{digest}: {exc}") from None
        except (StreamError, TarError, LayerError) as exc:
            raise _FillError("eager-bad-layer", f"{digest}: {exc}") from None
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise _FillError("eager-disk-full", f"{digest}: {exc}") from None
            raise _FillError("eager-bad-layer", f"{digest}: {exc}") from None
        finally:
            download.close()  # a producer waiting for bytes stops
            ahead.close()
        return applied

    def _move_into_place(
        self, staged: Path, applied: Applied, mountpoint: Path, lowerdirs: Sequence[Path]
    ) -> None:
        """Give implicitly created directories their lower layers' attributes, then rename the
        staged tree over the snapshot's empty directory, keeping that directory's owner and mode."""
        fs = staged / "fs"
        copy_up_parents(os.fsencode(fs), applied.implicit_dirs, [os.fsencode(p) for p in lowerdirs])
        st = os.lstat(mountpoint)
        if not stat.S_ISDIR(st.st_mode) or os.listdir(mountpoint):
            raise OSError(f"{mountpoint} is not an empty directory")
        os.chown(fs, st.st_uid, st.st_gid)
        os.chmod(fs, stat.S_IMODE(st.st_mode))
        os.rename(fs, mountpoint)
        os.rmdir(staged)


def _session_key(image: ResolvedImage) -> str:
    """Images are filled per repository and manifest: the same manifest in another repository
    is read from there."""
    return f"{image.reference.host}/{image.reference.repository}@{image.manifest_digest}"


def _remove_staged(staged: Path) -> None:
    try:
        remove_tree(staged)
    except OSError as exc:
        log.warning("cannot remove a staged layer", extra={"path": str(staged), "error": str(exc)})
