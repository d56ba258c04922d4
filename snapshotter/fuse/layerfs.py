"""One read-only FUSE filesystem per lazily pulled layer, as overlayfs expects a lower layer.

Serves a ``LayerTree`` (``snapshotter.layertree`` owns the presentation: inodes, hardlinks,
whiteouts, opaque directories, hidden landmarks, filtered xattrs) to the kernel through libfuse:
attributes, directory listings, xattrs, and file contents from the chunk reader. This module knows
files, not HTTP. It is the fallback backend; the EROFS backend presents the same tree.
"""

from __future__ import annotations

import errno
import functools
import logging
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import mfusepy

from snapshotter.formats.index import Entry, EntryType
from snapshotter.layertree import LayerTree, Node, PathNotFoundError, presented_xattrs
from snapshotter.mounts import is_fuse_mountpoint, unmount

__all__ = ["FsObserver", "LayerFS", "LayerTree", "MountedLayer", "is_fuse_mountpoint", "unmount"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Immutable content: let the kernel cache entries, attributes and pages for a long time.
CACHE_TIMEOUT_SECONDS = 3600.0
# Concurrent FUSE requests per layer; reads waiting on the network hold a thread each.
FUSE_MAX_THREADS = 32


class ContentReader(Protocol):
    def read(self, entry: Entry, offset: int, size: int) -> bytes: ...


# Told, after every FUSE operation, its name, duration in seconds and the errno name it failed
# with ("" on success). Metrics hang off this; the file system knows nothing about them.
FsObserver = Callable[[str, float, str], None]
_EXPECTED_ERRNOS = frozenset({errno.ENOENT, errno.ENODATA})  # lookups of absent names and xattrs


def _observed(method: Callable[..., T]) -> Callable[..., T]:
    op = method.__name__

    @functools.wraps(method)
    def wrapper(self: LayerFS, *args: Any) -> T:
        observer = self.observer
        if observer is None:
            return method(self, *args)
        started = time.perf_counter()
        failed = ""
        try:
            return method(self, *args)
        except mfusepy.FuseOSError as exc:
            if exc.errno not in _EXPECTED_ERRNOS:
                failed = errno.errorcode.get(exc.errno, str(exc.errno))
            raise
        finally:
            observer(op, time.perf_counter() - started, failed)

    return wrapper


class LayerFS(mfusepy.Operations):  # type: ignore[misc]
    """mfusepy operations over a LayerTree. Read-only; write calls get EROFS from the base class."""

    use_ns = True

    def __init__(
        self,
        tree: LayerTree,
        reader: ContentReader,
        *,
        layer: str,
        on_first_read: Callable[[str], None] | None = None,
        observer: FsObserver | None = None,
    ) -> None:
        self.tree = tree
        self.reader = reader
        self.layer = layer
        self.read_errors = 0
        # Startup profile recording: told the path of each file at its first read.
        self.on_first_read = on_first_read
        self._read_once: set[int] = set()
        self.observer = observer
        inodes = {n.ino: n for n in tree.by_name.values()}  # hardlinks counted once
        total = sum(n.entry.size for n in inodes.values() if n.kind == EntryType.REG)
        self._statfs = {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": (total + 4095) // 4096,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": len(inodes),
            "f_ffree": 0,
            "f_namemax": 255,
        }

    def _lookup(self, path: str) -> Node:
        try:
            return self.tree.lookup(path)
        except PathNotFoundError:
            raise mfusepy.FuseOSError(errno.ENOENT) from None

    @_observed
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        return self._lookup(path).attrs()

    @_observed
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, Any], int]]:
        node = self._lookup(path)
        if not node.is_dir:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        listing: list[tuple[str, dict[str, Any], int]] = [
            (".", node.attrs(), 0),
            ("..", {"st_mode": stat.S_IFDIR}, 0),
        ]
        listing += [(name, child.attrs(), 0) for name, child in node.children.items()]
        return listing

    @_observed
    def readlink(self, path: str) -> str:
        node = self._lookup(path)
        if node.kind != EntryType.SYMLINK:
            raise mfusepy.FuseOSError(errno.EINVAL)
        return node.entry.link_name

    @_observed
    def open(self, path: str, flags: int) -> int:
        node = self._lookup(path)
        if not node.is_file:
            raise mfusepy.FuseOSError(errno.EISDIR if node.kind == EntryType.DIR else errno.EACCES)
        return node.ino

    @_observed
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        node = self._lookup(path)
        if self.on_first_read is not None and node.ino not in self._read_once:
            self._read_once.add(node.ino)
            self.on_first_read(path)
        try:
            return self.reader.read(node.entry, offset, size)
        except OSError as exc:
            self.read_errors += 1
            log.error("read failed", extra={"layer": self.layer, "file": path, "error": str(exc)})
            raise mfusepy.FuseOSError(errno.EIO) from None

    @_observed
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        value = presented_xattrs(self._lookup(path)).get(name)
        if value is None:
            raise mfusepy.FuseOSError(errno.ENODATA)
        return value

    @_observed
    def listxattr(self, path: str) -> list[str]:
        return list(presented_xattrs(self._lookup(path)))

    def statfs(self, path: str) -> dict[str, int]:
        return self._statfs


class MountedLayer:
    """A LayerFS served on ``mountpoint`` by libfuse's multi-threaded loop in a daemon thread."""

    def __init__(self, fs: LayerFS, mountpoint: Path) -> None:
        self.fs = fs
        self.mountpoint = mountpoint
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"fuse:{mountpoint}", daemon=True)

    def _serve(self) -> None:
        try:
            mfusepy.FUSE(
                self.fs,
                str(self.mountpoint),
                foreground=True,
                ro=True,
                allow_other=True,  # containers run as any uid; default_permissions checks modes
                default_permissions=True,
                fsname=f"lazysnap:{self.fs.layer[:19]}",
                subtype="lazysnap",
                use_ino=True,
                max_threads=FUSE_MAX_THREADS,
                kernel_cache=True,
                entry_timeout=CACHE_TIMEOUT_SECONDS,
                attr_timeout=CACHE_TIMEOUT_SECONDS,
                negative_timeout=CACHE_TIMEOUT_SECONDS,
            )
        except BaseException as exc:  # reported by start() or is_alive()
            self.error = exc

    def start(self, timeout: float = 10.0) -> None:
        """Mount and return once the kernel serves the mountpoint."""
        self._thread.start()
        waiter = threading.Event()
        deadline = time.monotonic() + timeout
        pause = 0.001  # a mount usually appears within milliseconds; containerd waits on each
        while time.monotonic() < deadline:
            if self.error is not None or not self._thread.is_alive():
                raise OSError(f"FUSE mount of {self.mountpoint} failed: {self.error}")
            if is_fuse_mountpoint(self.mountpoint):
                return
            waiter.wait(pause)
            pause = min(pause * 2, 0.05)
        self.unmount(timeout=1.0)  # in case it appears after all
        raise OSError(f"FUSE mount of {self.mountpoint} did not appear within {timeout}s")

    def is_alive(self) -> bool:
        return self._thread.is_alive() and is_fuse_mountpoint(self.mountpoint)

    def unmount(self, timeout: float = 10.0) -> None:
        if is_fuse_mountpoint(self.mountpoint):
            unmount(self.mountpoint)
        self._thread.join(timeout)
