"""How a layer is presented as a lower layer for overlayfs: the inode tree built from a ``LayerIndex``.

Both backends present a layer from this one tree, so they agree file by file: the per-file FUSE
file system (``snapshotter.fuse.layerfs``) answers kernel requests from it, and the EROFS writer
(``snapshotter.erofs``) turns it into a metadata image. The rules:

- hardlinks share one node (one inode, ``nlink`` counts the names);
- a whiteout ``.wh.NAME`` becomes a 0/0 character device ``NAME``, as overlayfs expects;
- an opaque marker ``.wh..wh..opq`` becomes the ``trusted.overlay.opaque=y`` xattr of its
  directory;
- the landmarks ``.prefetch.landmark``/``.no.prefetch.landmark`` at the root are hidden;
- the layer's own ``trusted.overlay.*``/``user.overlay.*`` xattrs are not shown: they would steer
  the kernel's overlay (redirects, metacopy) from inside an image.

Pure: no FUSE, no I/O. A lookup of a missing path raises ``PathNotFoundError``.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from snapshotter.formats.index import Entry, EntryType, LayerIndex

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
LANDMARKS = frozenset({".prefetch.landmark", ".no.prefetch.landmark"})
# Only the trusted.* name: lazysnap mounts overlay as root, without userxattr, and a user.* name
# would show through the overlay to the container as an xattr the image never had.
OPAQUE_XATTRS = ("trusted.overlay.opaque",)
PERMISSION_BITS = 0o7777  # rwx for all plus setuid, setgid, sticky

TYPE_BITS = {
    EntryType.DIR: stat.S_IFDIR,
    EntryType.REG: stat.S_IFREG,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}


class PathNotFoundError(LookupError):
    """The layer has no such path (the FUSE backend answers ENOENT)."""


@dataclass(eq=False)  # identity matters: hardlinked names share one Node
class Node:
    ino: int
    entry: Entry  # for hardlinks: the target's entry (content and attributes are shared)
    kind: EntryType
    nlink: int = 1
    children: dict[str, Node] = field(default_factory=dict)  # directories only
    whiteout: bool = False
    opaque: bool = False

    @property
    def mode(self) -> int:
        """File type and permission bits as presented (a whiteout is a bare character device)."""
        if self.whiteout:
            return stat.S_IFCHR
        return TYPE_BITS[self.kind] | (self.entry.mode & PERMISSION_BITS)

    @property
    def size(self) -> int:
        if self.kind == EntryType.REG and not self.whiteout:
            return self.entry.size
        if self.kind == EntryType.SYMLINK:
            return len(os.fsencode(self.entry.link_name))
        return 0

    @property
    def rdev(self) -> int:
        if self.whiteout or self.kind not in (EntryType.CHAR, EntryType.BLOCK):
            return 0
        return os.makedev(self.entry.dev_major, self.entry.dev_minor)

    @property
    def is_file(self) -> bool:
        """A regular file with content (whiteouts are presented as devices)."""
        return self.kind == EntryType.REG and not self.whiteout

    @property
    def is_dir(self) -> bool:
        return self.kind == EntryType.DIR and not self.whiteout

    def attrs(self) -> dict[str, Any]:
        """The node as a ``stat`` result dict (FUSE getattr; times in nanoseconds)."""
        e = self.entry
        size = self.size
        return {
            "st_ino": self.ino,
            "st_mode": self.mode,
            "st_nlink": self.nlink,
            "st_uid": e.uid,
            "st_gid": e.gid,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_blksize": 4096,
            "st_rdev": self.rdev,
            "st_mtime": e.mtime_ns,
            "st_ctime": e.mtime_ns,
            "st_atime": e.mtime_ns,
        }


def is_overlay_xattr(name: str) -> bool:
    return name.startswith(("trusted.overlay.", "user.overlay."))


def presented_xattrs(node: Node) -> dict[str, bytes]:
    """The xattrs a node shows: the layer's own minus overlayfs' names, plus the opaque marker."""
    xattrs = {} if node.whiteout else {k: v for k, v in node.entry.xattrs.items() if not is_overlay_xattr(k)}
    if node.opaque:
        for name in OPAQUE_XATTRS:
            xattrs[name] = b"y"
    return xattrs


class LayerTree:
    """The inode table of one layer, built once from its index.

    ``by_name`` maps every presented path (hardlinks included, whiteouts under the name they hide
    excluded) to its node, in index order; inode numbers count from 1 (the root) in that order.
    """

    def __init__(self, index: LayerIndex) -> None:
        root_entry = index.entries.get("") or Entry(name="", type=EntryType.DIR, mode=0o755)
        self.root = Node(1, root_entry, EntryType.DIR, nlink=2)
        self.by_name: dict[str, Node] = {"": self.root}
        self._next_ino = 2
        for entry in index.entries.values():
            if entry.name:
                self._add(entry)
        self._count_dir_links()

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _dir(self, name: str) -> Node:
        """The directory node ``name``, synthesizing it and any missing ancestors."""
        node = self.by_name.get(name)
        if node is not None:
            return node
        # Formats synthesize parents; this guards odd indexes anyway. Iterative: a chain of
        # missing ancestors may be deeper than Python's recursion limit.
        missing = [name]
        parent_name = name.rpartition("/")[0]
        while parent_name not in self.by_name:
            missing.append(parent_name)
            parent_name = parent_name.rpartition("/")[0]
        parent = self.by_name[parent_name]
        for path in reversed(missing):
            node = Node(self._new_ino(), Entry(name=path, type=EntryType.DIR, mode=0o755), EntryType.DIR)
            parent.children[path.rpartition("/")[2]] = node
            self.by_name[path] = node
            parent = node
        return parent

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
            if hidden in ("", ".", ".."):  # would hide nothing, or shadow "." and ".."
                log.warning("meaningless whiteout skipped", extra={"entry": entry.name})
                return
            parent.children[hidden] = Node(self._new_ino(), entry, EntryType.CHAR, whiteout=True)
            return
        if entry.type == EntryType.HARDLINK:
            target = self.by_name.get(entry.link_name)
            if target is None or target.kind == EntryType.DIR:
                # A directory has one parent; a hard link to one would make a cycle.
                log.warning("hardlink to a missing entry or a directory skipped", extra={"entry": entry.name})
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

    def _count_dir_links(self) -> None:
        """A directory's nlink is 2 plus its subdirectories (each one's ".." links back)."""
        for node in self.directories():
            node.nlink = 2 + sum(1 for c in node.children.values() if c.is_dir)

    def directories(self) -> Iterator[Node]:
        """Every directory reachable from the root, parents before children (iterative)."""
        pending = [self.root]
        while pending:
            node = pending.pop()
            yield node
            pending.extend(c for c in node.children.values() if c.is_dir)

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
                raise PathNotFoundError(path)
            node = child
        return node
