"""Kernel-served lazy layers: an EROFS metadata image per layer over a data blob the blob server serves.

For each lazily mounted layer the FUSE manager writes an EROFS metadata image from the layer's
index (``ROOT/layers/<digest>.erofs``: every inode, directory, symlink, xattr, whiteout) whose
regular files point into the layer's *data blob*: one flat file of the layer's uncompressed file
contents, laid out in startup order (``snapshotter.erofs.layout``). The blob is a file of the one
FUSE mount the blob server keeps at ``ROOT/blobs``; the kernel mounts the pair at the snapshot's
directory. Lookups, attributes, directories and the page cache are the kernel's: Python runs only
when the kernel reads blob bytes it has not cached, and then ``LayerBlob`` turns the blob range
into file ranges for the chunk reader (cache, or fetch + verify).

The FUSE connection of ``ROOT/blobs`` is kept alive by the fd holder (``snapshotter.fuse.holder``,
``ROOT/fuse-holder.sock``) across a restart or a crash of the manager; the EROFS mounts are kernel
mounts and outlive the manager by themselves. So that a successor can serve the blobs at once, the
mounts are recorded in ``ROOT/lazy-mounts.json`` (mount point → labels), and a new manager rebuilds
their blob sources from the stored layer metadata before it resumes the connection. The blob layout
an image points into is stored beside it (``ROOT/layers/<digest>.layout.json``): a successor, maybe
a newer version that would plan layouts differently, serves the blob as the mounted image expects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.contract import holder_socket
from snapshotter.digest import file_stem
from snapshotter.erofs.layout import BlobLayout, LayoutError, PlacedFile
from snapshotter.erofs.mount import ErofsMountError, is_erofs_mountpoint, mount_erofs
from snapshotter.erofs.mount import unmount as unmount_erofs
from snapshotter.erofs.writer import build_metadata
from snapshotter.fuse.blobserver import BlobServer
from snapshotter.fuse.holder import HolderClient, HolderError, start_holder
from snapshotter.layertree import LayerTree
from snapshotter.ownership import process_exists
from snapshotter.reader import LayerReader

log = logging.getLogger(__name__)

# The kernel's readahead on data blobs. A startup reading many small files walks the blob
# sequentially, and every byte the kernel reads ahead is fetched from the registry: with 1 MiB,
# a python start fetched 24 MB (more than the whole image) for 10 MB read; with 128 KiB, 23 MB
# with background fetch and 19.7 MB without. Long sequential reads are read ahead by the chunk
# reader instead, which knows which file a stream belongs to.
BLOB_READAHEAD_BYTES = 128 << 10
# In the mount record: this mount reads the layer's local data blob (no blob server needed).
LOCAL_FLAG = "lazysnap.local-blob"
ASSEMBLE_PIECE_BYTES = 8 << 20

# Told, after every blob read, the operation's name, its duration in seconds and the errno name it
# failed with ("" on success): the FUSE operation metrics.
Observer = Callable[[str, float, str], None]


class LayerBlob:
    """One layer's data blob as the blob server sees it: blob ranges become file ranges."""

    def __init__(
        self,
        layout: BlobLayout,
        reader: LayerReader,
        *,
        on_first_read: Callable[[str], None] | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.layout = layout
        self.reader = reader
        self.size = layout.blob_size
        self.read_errors = 0
        self.on_first_read = on_first_read  # startup profiles: told each file's path once
        self.observer = observer
        # Once the layer is complete and assembled (``ErofsLayers.assemble``): reads come from
        # this file, and the layer's chunks may leave the cache.
        self.local_path: Path | None = None
        self._read_once: set[str] = set()
        self._lock = threading.Lock()

    def _note_reads(self, names: list[str]) -> None:
        if self.on_first_read is None:
            return
        with self._lock:
            fresh = [n for n in names if n not in self._read_once]
            self._read_once.update(fresh)
        for name in fresh:
            self.on_first_read(name)

    def _read_local(self, path: Path, offset: int, size: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def read(self, offset: int, size: int) -> bytes:
        started = time.perf_counter()
        failed = ""
        try:
            if self.local_path is not None:
                return self._read_local(self.local_path, offset, size)
            pieces = self.layout.locate(offset, size)
            extents = [(p.entry, p.file_offset, p.length) for p in pieces if p.entry is not None]
            self._note_reads([e.name for e, _, _ in extents])
            data = iter(self.reader.read_extents(extents))
            return b"".join(bytes(p.length) if p.entry is None else next(data) for p in pieces)
        except OSError as exc:
            failed = "EIO"
            self.read_errors += 1
            log.error("blob read failed", extra={"layer": self.reader.layer, "error": str(exc)})
            raise
        finally:
            if self.observer is not None:
                self.observer("read", time.perf_counter() - started, failed)

    def read_cached(self, offset: int, size: int) -> bytes | None:
        """The bytes when every chunk they need is local (the blob server answers at once)."""
        if self.local_path is not None:
            try:
                return self._read_local(self.local_path, offset, size)
            except OSError:
                return None  # read() reports it
        pieces = self.layout.locate(offset, size)
        extents = [(p.entry, p.file_offset, p.length) for p in pieces if p.entry is not None]
        found = self.reader.read_cached(extents)
        if found is None:
            return None
        self._note_reads([e.name for e, _, _ in extents])
        data = iter(found)
        return b"".join(bytes(p.length) if p.entry is None else next(data) for p in pieces)


@dataclass
class ErofsMount:
    """A layer mounted through EROFS at ``mountpoint``; ``blob`` serves its data, unless ``local``:
    then the kernel reads a local copy of the data blob and no process is in the path."""

    backend: ErofsLayers
    digest: str
    mountpoint: Path
    blob: LayerBlob
    local: bool = False

    @property
    def read_errors(self) -> int:
        return self.blob.read_errors

    def is_alive(self) -> bool:
        served = self.local or self.backend.serves(self.digest)
        return served and is_erofs_mountpoint(self.mountpoint)

    def unmount(self) -> None:
        self.backend.unmount(self)


class ErofsLayers:
    """The EROFS backend of one FUSE manager: metadata images, the blob server, the mount record."""

    def __init__(
        self,
        root: Path,
        *,
        loop_devices: bool = False,
        workers: int = 64,
        readahead: int = BLOB_READAHEAD_BYTES,
    ) -> None:
        self.root = root
        self.images = root / "layers"
        self.images.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.loop_devices = loop_devices
        self.record_path = root / "lazy-mounts.json"
        blobs = root / "blobs"
        # Not mkdir(exist_ok=True), which stats the directory: a blob mount left by a manager that
        # was killed (its holder keeps it) is served by nobody until this process resumes it, and
        # the stat would wait for that answer forever.
        with contextlib.suppress(FileExistsError):
            blobs.mkdir(mode=0o700)
        self.holder_socket = holder_socket(root)
        self.server = BlobServer(
            blobs,
            state_path=root / "blobs.state",
            keeper=HolderClient(self.holder_socket),
            keeper_name="blobs",
            workers=workers,
            readahead=readahead,
        )
        self._lock = threading.Lock()
        self._users: dict[str, int] = {}  # blob name -> mounts using it
        self._record: dict[str, dict[str, str]] = self._load_record()

    # --- life -----------------------------------------------------------------------------------

    def recorded(self) -> dict[Path, dict[str, str]]:
        """The mounts an earlier manager made that are still mounted: mount point -> labels."""
        return {Path(mp): labels for mp, labels in self._record.items() if is_erofs_mountpoint(Path(mp))}

    def start(self, sources: Mapping[str, LayerBlob]) -> None:
        """Start (or resume, when the holder kept the connection) the blob server with the blobs of
        the layers that are still mounted."""
        try:
            holder = start_holder(self.holder_socket, log_path=self.root / "fuse-holder.log")
            log.info("fd holder keeps the blob server's FUSE connection", extra={"pid": holder})
        except (HolderError, OSError) as exc:
            log.warning(
                "no fd holder: a restart of the FUSE manager will break lazy layers",
                extra={"error": str(exc)},
            )
        with self._lock:
            self._users = {}
            for name in sources:
                self._users[name] = self._users.get(name, 0) + 1
        self.server.start(dict(sources))
        if not self.server.resumed:
            # A fresh connection: EROFS mounts of the previous one read a dead blob; drop them.
            # Those over a local blob file need no connection and stay.
            kept = {mp: labels for mp, labels in self._record.items() if labels.get(LOCAL_FLAG)}
            for mountpoint in list(self._record):
                if mountpoint not in kept and is_erofs_mountpoint(Path(mountpoint)):
                    log.warning(
                        "dropping a lazy layer whose blob connection is gone", extra={"at": mountpoint}
                    )
                    unmount_erofs(Path(mountpoint))
            self._save_record(kept)

    def stop(self, *, handover: bool) -> None:
        """Stop serving blobs: for good (the layers are unmounted), or for a successor."""
        if not handover:
            for mountpoint in list(self._record):
                if is_erofs_mountpoint(Path(mountpoint)):
                    unmount_erofs(Path(mountpoint))
            self._save_record({})
        self.server.stop(handover=handover and self.server.kept)
        if not handover:
            self._stop_holder()

    def can_hand_over(self) -> bool:
        """Whether the blob connection is served and a copy of its fd is with the holder."""
        return self.server.is_alive() and self.server.kept

    def prepare_handover(self) -> bool:
        """Before a stop for a successor: have the holder (started again if it is gone) keep the
        blob connection's fd, so that the connection outlives this process. False if it cannot."""
        if not self.server.is_alive():
            return False
        try:
            start_holder(self.holder_socket, log_path=self.root / "fuse-holder.log")
        except (HolderError, OSError) as exc:
            log.error("no fd holder to keep the blob connection", extra={"error": str(exc)})
            return False
        return self.server.keep()

    def _stop_holder(self, timeout: float = 5.0) -> None:
        client = HolderClient(self.holder_socket, timeout=2)
        try:
            pid = client.ping()
        except HolderError:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        # Gone before this manager is: a stop leaves nothing running behind it.
        deadline = time.monotonic() + timeout
        while process_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def serves(self, digest: str) -> bool:
        return self.server.is_alive() and file_stem(digest) in self._users

    # --- mounts ---------------------------------------------------------------------------------

    def image_path(self, digest: str) -> Path:
        return self.images / f"{file_stem(digest)}.erofs"

    def layout_path(self, digest: str) -> Path:
        return self.images / f"{file_stem(digest)}.layout.json"

    def blob_layout(
        self, digest: str, tree: LayerTree, plan: Callable[[], BlobLayout], *, adopting: bool = False
    ) -> BlobLayout:
        """The layout of the layer's data blob for a mount (or, ``adopting``, for a mount an earlier
        manager made). The EROFS images of mounted layers point into the layout their blob was
        mounted with, which this version may plan differently (an upgrade changed the planner):
        while the blob is served, and when taking a mount over, the stored layout is used;
        otherwise ``plan()``. LayoutError if the stored layout does not fit the layer."""
        with self._lock:
            in_use = adopting or file_stem(digest) in self._users or self.local_blob_path(digest).exists()
        if in_use:
            stored = self._load_layout(digest, tree)
            if stored is not None:
                return stored
            if adopting:  # mounted by a version that stored no layout: assume it planned as we do
                log.warning("no stored blob layout; planning it anew", extra={"layer": digest})
        return plan()

    def _load_layout(self, digest: str, tree: LayerTree) -> BlobLayout | None:
        try:
            doc = json.loads(self.layout_path(digest).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LayoutError(f"{digest}: unreadable stored blob layout: {exc}") from None
        return layout_from_record(doc, tree)

    def store_layout(self, digest: str, layout: BlobLayout) -> None:
        """Keep ``layout`` as the one the layer's blob is served with (``mount`` does, beside the image)."""
        path = self.layout_path(digest)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_text(json.dumps(layout_record(layout)))
        os.replace(tmp, path)

    def mount(
        self, digest: str, tree: LayerTree, blob: LayerBlob, mountpoint: Path, labels: Mapping[str, str]
    ) -> ErofsMount:
        """Write the layer's metadata image and mount it at ``mountpoint`` over its data blob: the
        local copy when the layer was complete once (no process in the path), else the blob
        server's file."""
        name = file_stem(digest)
        image = build_metadata(tree, blob.layout, device_tag=digest.encode()[:64])
        path = self.image_path(digest)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_bytes(image)
        os.replace(tmp, path)
        self.store_layout(digest, blob.layout)  # what a successor serves this image's blob with
        local = self.local_blob(digest, blob.layout)
        if local is not None:
            mount_erofs(path, local, mountpoint, loop=self.loop_devices)
            with self._lock:
                self._record[str(mountpoint)] = {**labels, LOCAL_FLAG: "1"}
                self._save_record(self._record)
            return ErofsMount(self, digest, mountpoint, blob, local=True)
        with self._lock:
            blob_path = self.server.add(name, blob)
            self._users[name] = self._users.get(name, 0) + 1
        try:
            mount_erofs(path, blob_path, mountpoint, loop=self.loop_devices)
        except ErofsMountError:
            self._release(name)
            raise
        with self._lock:
            self._record[str(mountpoint)] = dict(labels)
            self._save_record(self._record)
        return ErofsMount(self, digest, mountpoint, blob)

    def adopt(self, digest: str, blob: LayerBlob, mountpoint: Path, *, local: bool = False) -> ErofsMount:
        """A mount an earlier manager made, whose blob ``start`` serves again (or a local copy)."""
        return ErofsMount(self, digest, mountpoint, blob, local=local)

    def unmount(self, mount: ErofsMount) -> None:
        if is_erofs_mountpoint(mount.mountpoint):
            unmount_erofs(mount.mountpoint)
        with self._lock:
            self._record.pop(str(mount.mountpoint), None)
            self._save_record(self._record)
        if not mount.local:
            self._release(file_stem(mount.digest))

    # --- local copies of complete data blobs ----------------------------------------------------

    def local_blob_path(self, digest: str) -> Path:
        return self.images / f"{file_stem(digest)}.blob"

    def local_blob(self, digest: str, layout: BlobLayout) -> Path | None:
        """The layer's data blob as a local file, if it was assembled (with this layout)."""
        path = self.local_blob_path(digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return path if size == layout.blob_size else None

    def local_blob_bytes(self) -> int:
        """What the local data blobs take on disk (they are sparse: blocks, not sizes)."""
        total = 0
        for path in self.images.glob("*.blob"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_blocks * 512
        return total

    def remove_local_blob(self, digest: str) -> None:
        self.local_blob_path(digest).unlink(missing_ok=True)

    def assemble(self, digest: str, layout: BlobLayout, reader: LayerReader) -> bool:
        """Write the layer's data blob as a local file from the verified chunks in the cache, so
        that later mounts of the layer need no process in the path. The file appears whole or not
        at all (a chunk evicted meanwhile: False); the holes between files stay sparse. True when
        it exists afterwards."""
        if self.local_blob(digest, layout) is not None:
            return True
        path = self.local_blob_path(digest)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        try:
            with open(tmp, "wb") as fh:
                fh.truncate(layout.blob_size)
                for placed in layout.files:
                    for offset in range(0, placed.size, ASSEMBLE_PIECE_BYTES):
                        size = min(ASSEMBLE_PIECE_BYTES, placed.size - offset)
                        found = reader.read_cached([(placed.entry, offset, size)], by_reader=False)
                        if found is None or len(found[0]) != size:
                            tmp.unlink(missing_ok=True)
                            return False
                        os.pwrite(fh.fileno(), found[0], placed.blob_offset + offset)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("cannot write a local data blob", extra={"layer": digest, "error": str(exc)})
            return False
        log.info("layer complete: later mounts read a local data blob", extra={"layer": digest})
        return True

    def _release(self, name: str) -> None:
        with self._lock:
            users = self._users.get(name, 0) - 1
            if users > 0:
                self._users[name] = users
                return
            self._users.pop(name, None)
        with contextlib.suppress(FileNotFoundError, RuntimeError):  # not served, or not started
            self.server.remove(name)

    # --- the mount record -----------------------------------------------------------------------

    def _load_record(self) -> dict[str, dict[str, str]]:
        try:
            doc = json.loads(self.record_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("discarding an unreadable lazy mount record", extra={"error": str(exc)})
            return {}
        if not isinstance(doc, dict):
            return {}
        return {
            str(mp): {str(k): str(v) for k, v in labels.items()}
            for mp, labels in doc.items()
            if isinstance(labels, dict)
        }

    def _save_record(self, record: dict[str, dict[str, str]]) -> None:
        self._record = record
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.record_path)


LAYOUT_FORMAT = 1


def layout_record(layout: BlobLayout) -> dict[str, Any]:
    """``layout`` as JSON: where each file's content starts in the blob."""
    return {
        "format": LAYOUT_FORMAT,
        "block_size": layout.block_size,
        "blob_size": layout.blob_size,
        "prefetch_end": layout.prefetch_end,
        "files": [[f.entry.name, f.blob_offset] for f in layout.files],
    }


def layout_from_record(doc: Any, tree: LayerTree) -> BlobLayout:
    """The layout ``layout_record`` wrote, over ``tree``'s entries; LayoutError if it does not fit."""
    try:
        if doc["format"] != LAYOUT_FORMAT:
            raise LayoutError(f"blob layout format {doc['format']!r} is not {LAYOUT_FORMAT}")
        files = []
        for name, offset in doc["files"]:
            node = tree.by_name.get(str(name))
            if node is None or not node.is_file:
                raise LayoutError(f"the stored blob layout places {name!r}, not a file of the layer")
            files.append(PlacedFile(node.entry, int(offset), node.entry.size))
        return BlobLayout(
            files,
            blob_size=int(doc["blob_size"]),
            block_size=int(doc["block_size"]),
            prefetch_end=int(doc["prefetch_end"]),
        )
    except LayoutError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise LayoutError(f"malformed stored blob layout: {exc!r}") from None
