"""One read-only FUSE filesystem per lazily pulled layer, as overlayfs expects a lower layer.

Owns the presentation of a ``LayerIndex``: an inode table (hardlinks share an inode), directory
listings with attributes, whiteouts (``.wh.NAME`` becomes a 0/0 character device ``NAME``),
opaque directories (``.wh..wh..opq`` becomes the ``trusted.overlay.opaque=y`` xattr), and hidden
landmark files. File contents come from the chunk reader; this module knows files, not HTTP.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import mfusepy

from snapshotter.formats.index import Entry, EntryType, LayerIndex
from snapshotter.mounts import is_fuse_mountpoint, unmount

log = logging.getLogger(__name__)
T = TypeVar("T")

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
LANDMARKS = frozenset({".prefetch.landmark", ".no.prefetch.landmark"})
# Only the trusted.* name: lazysnap mounts overlay as root, without userxattr, and a user.* name
# would show through the overlay to the container as an xattr the image never had.
OPAQUE_XATTRS = ("trusted.overlay.opaque",)
# Immutable content: let the kernel cache entries, attributes and pages for a long time.
CACHE_TIMEOUT_SECONDS = 3600.0
# Concurrent FUSE requests per layer; reads waiting on the network hold a thread each.
FUSE_MAX_THREADS = 32

_TYPE_BITS = {
    EntryType.DIR: stat.S_IFDIR,
    EntryType.REG: stat.S_IFREG,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}


class ContentReader(Protocol):
    def read(self, entry: Entry, offset: int, size: int) -> bytes: ...


@dataclass
class Node:
    ino: int
    entry: Entry  # for hardlinks: the target's entry (content and attributes are shared)
    kind: EntryType
    nlink: int = 1
    children: dict[str, Node] = field(default_factory=dict)  # directories only
    whiteout: bool = False
    opaque: bool = False

    def attrs(self) -> dict[str, Any]:
        e = self.entry
        mode = (stat.S_IFCHR if self.whiteout else _TYPE_BITS[self.kind]) | (0 if self.whiteout else e.mode)
        size = (
            e.size
            if self.kind == EntryType.REG
            else len(e.link_name.encode())
            if self.kind == EntryType.SYMLINK
            else 0
        )
        rdev = 0 if self.whiteout else os.makedev(e.dev_major, e.dev_minor)
        return {
            "st_ino": self.ino,
            "st_mode": mode,
            "st_nlink": self.nlink,
            "st_uid": e.uid,
            "st_gid": e.gid,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_blksize": 4096,
            "st_rdev": rdev,
            "st_mtime": e.mtime_ns,
            "st_ctime": e.mtime_ns,
            "st_atime": e.mtime_ns,
        }


class LayerTree:
    """The inode table of one layer, built once from its index."""

    def __init__(self, index: LayerIndex) -> None:
        root_entry = index.entries.get("") or Entry(name="", type=EntryType.DIR, mode=0o755)
        self.root = Node(1, root_entry, EntryType.DIR, nlink=2)
        self.by_name: dict[str, Node] = {"": self.root}
        self._next_ino = 2
        for entry in index.entries.values():
            if entry.name:
                self._add(entry)
        self._count_dir_links(self.root)

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _dir(self, name: str) -> Node:
        node = self.by_name.get(name)
        if node is None:  # formats synthesize parents; this guards odd indexes anyway
            parent, _, base = name.rpartition("/")
            node = Node(self._new_ino(), Entry(name=name, type=EntryType.DIR, mode=0o755), EntryType.DIR)
            self._dir(parent).children[base] = node
            self.by_name[name] = node
        return node

    def _add(self, entry: Entry) -> None:
        parent_name, _, base = entry.name.rpartition("/")
        parent = self._dir(parent_name)
        if base == OPAQUE_MARKER:
            parent.opaque = True
            return
        if not parent_name and base in LANDMARKS:
            return
        if base.startswith(WHITEOUT_PREFIX):
            hidden = base.removeprefix(WHITEOUT_PREFIX)
            parent.children[hidden] = Node(self._new_ino(), entry, EntryType.CHAR, whiteout=True)
            return
        if entry.type == EntryType.HARDLINK:
            target = self.by_name.get(entry.link_name)
            if target is None:
                log.warning("hardlink to a missing entry skipped", extra={"entry": entry.name})
                return
            target.nlink += 1
            parent.children[base] = target
            self.by_name[entry.name] = target
            return
        existing = self.by_name.get(entry.name)
        if existing is not None and entry.type == EntryType.DIR and existing.kind == EntryType.DIR:
            existing.entry = entry  # a synthesized parent, now with its real attributes
            return
        node = Node(self._new_ino(), entry, entry.type)
        parent.children[base] = node
        self.by_name[entry.name] = node

    def _count_dir_links(self, node: Node) -> None:
        subdirs = [c for c in node.children.values() if c.kind == EntryType.DIR and not c.whiteout]
        node.nlink = 2 + len(subdirs)
        for child in subdirs:
            self._count_dir_links(child)

    def lookup(self, path: str) -> Node:
        node = self.by_name.get(path.strip("/"))
        if node is None:
            node = self._walk(path)
        return node

    def _walk(self, path: str) -> Node:
        node = self.root
        for part in path.strip("/").split("/"):
            child = node.children.get(part)
            if child is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            node = child
        return node


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


def _is_overlay_xattr(name: str) -> bool:
    return name.startswith(("trusted.overlay.", "user.overlay."))


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

    @_observed
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        return self.tree.lookup(path).attrs()

    @_observed
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, Any], int]]:
        node = self.tree.lookup(path)
        if node.kind != EntryType.DIR or node.whiteout:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        listing: list[tuple[str, dict[str, Any], int]] = [
            (".", node.attrs(), 0),
            ("..", {"st_mode": stat.S_IFDIR}, 0),
        ]
        listing += [(name, child.attrs(), 0) for name, child in node.children.items()]
        return listing

    @_observed
    def readlink(self, path: str) -> str:
        node = self.tree.lookup(path)
        if node.kind != EntryType.SYMLINK:
            raise mfusepy.FuseOSError(errno.EINVAL)
        return node.entry.link_name

    @_observed
    def open(self, path: str, flags: int) -> int:
        node = self.tree.lookup(path)
        if node.kind != EntryType.REG or node.whiteout:
            raise mfusepy.FuseOSError(errno.EISDIR if node.kind == EntryType.DIR else errno.EACCES)
        return node.ino

    @_observed
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        node = self.tree.lookup(path)
        if self.on_first_read is not None and node.ino not in self._read_once:
            self._read_once.add(node.ino)
            self.on_first_read(path)
        try:
            return self.reader.read(node.entry, offset, size)
        except OSError as exc:
            self.read_errors += 1
            log.error("read failed", extra={"layer": self.layer, "file": path, "error": str(exc)})
            raise mfusepy.FuseOSError(errno.EIO) from None

    def _xattrs(self, node: Node) -> dict[str, bytes]:
        # overlayfs' own xattrs (redirect, metacopy, ...) from a layer would steer the kernel's
        # overlay; only the opaque marker we derive from the layer's whiteouts is shown.
        xattrs = (
            {} if node.whiteout else {k: v for k, v in node.entry.xattrs.items() if not _is_overlay_xattr(k)}
        )
        if node.opaque:
            for name in OPAQUE_XATTRS:
                xattrs[name] = b"y"
        return xattrs

    @_observed
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        value = self._xattrs(self.tree.lookup(path)).get(name)
        if value is None:
            raise mfusepy.FuseOSError(errno.ENODATA)
        return value

    @_observed
    def listxattr(self, path: str) -> list[str]:
        return list(self._xattrs(self.tree.lookup(path)))

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
