"""Apply a layer's tar stream to a directory exactly as containerd 1.6's applier does for lazysnap's
mounts (``archive/tar.go`` ``applyNaive`` and ``createTarFile``, ``diff/apply/apply_linux.go``).

containerd applies a layer to the mounts Prepare returned: the first layer of a chain (a bind
mount) with plain whiteout handling, every other layer (an overlay mount) straight into the
upper directory with overlayfs whiteouts. ``apply_layer(..., overlay=...)`` does the same into an
empty directory, entry by entry, as the tar stream arrives:

- **Names are confined to the root**, never refused: a name is cleaned, ``..`` cannot climb above
  the root, and symlinks in its parent path are followed *within* the root, as if the root were
  ``/`` (continuity's ``fs.RootPath``; at most 255 links). So ``../../etc/passwd``,
  ``/etc/passwd`` and ``link-to-slash/etc/passwd`` all land in ROOT/etc/passwd. A hard link's
  target is resolved the same way; one to a directory or to nothing fails. A whiteout name that
  would climb out of its directory (``.wh..``) is refused.
- **Overlay layers**: ``.wh.NAME`` becomes a 0/0 character device NAME (mode 0, the whiteout's
  owner), ``.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on its directory; neither is written
  itself. **The first layer**: ``.wh.NAME`` removes NAME, ``.wh..wh..opq`` removes what the layer
  did not itself put in that directory.
- An existing path is removed and replaced, unless both are directories (then merged).
  Directories the tar does not list are created 0755; in overlay layers containerd then copies
  owner, mode, atime and xattrs from the same directory in the lower layers: that needs the lower
  layers, so it is done by ``copy_up_parents`` once they are committed (the snapshotter commits
  layers in order).
- Every entry gets its owner, then its ``SCHILY.xattr.*`` (``trusted.*`` ignored; ``user.*`` on
  what cannot have them ignored), then its mode (not on symlinks), then its times
  (atime = the later of atime and mtime; times before 1970 become 0). Directory times are set
  last, once nothing more is created in them. Hard links apply all of that to the shared inode.
- Regular files, directories, symlinks, hard links, character and block devices, FIFOs; PAX
  global headers are ignored after their name was resolved (as containerd does). Any other type
  fails the layer, as it fails containerd's.

Paths are bytes throughout: names are whatever bytes the tar holds.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.eager.tarreader import TarHeader, TarReader
from snapshotter.mounts import remove_tree

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
MAX_SYMLINKS = 255
MAX_ENTRIES = 1_000_000  # a layer with more entries is left to containerd (bounded memory here)
COPY_BYTES = 1 << 20
_MAX_TIME_NS = (1 << 63) - 1


class LayerError(Exception):
    """The layer cannot be applied; containerd would refuse it too (or, for a few documented
    cases, the eager fallback leaves it to containerd)."""


def clean(path: bytes) -> bytes:
    """Go's ``filepath.Clean`` on a slash-separated path."""
    rooted = path.startswith(b"/")
    parts: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if parts and parts[-1] != b"..":
                parts.pop()
            elif not rooted:
                parts.append(b"..")
            continue
        parts.append(part)
    joined = b"/".join(parts)
    if rooted:
        return b"/" + joined
    return joined or b"."


def root_path(root: bytes, path: bytes) -> bytes:
    """``path`` inside ``root`` with every symlink on the way resolved within ``root`` (continuity
    ``fs.RootPath``): absolute targets restart at ``root``, ``..`` stops at it, components that do
    not exist are taken as they are."""
    parts = [p for p in clean(b"/" + path).split(b"/") if p]
    resolved: list[bytes] = []
    links = 0
    i = 0
    while i < len(parts):
        candidate = root + b"/" + b"/".join([*resolved, parts[i]])
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise LayerError(f"too many symlinks resolving {path[:200]!r}")
            target = os.readlink(candidate)
            base = b"" if target.startswith(b"/") else b"/".join(resolved)
            parts = [p for p in clean(b"/" + base + b"/" + target).split(b"/") if p] + parts[i + 1 :]
            resolved, i = [], 0
            continue
        resolved.append(parts[i])
        i += 1
    return root + b"".join(b"/" + p for p in resolved)


def _split(name: bytes) -> tuple[bytes, bytes]:
    """Go's ``filepath.Split``: everything up to and including the last slash, and the rest."""
    cut = name.rfind(b"/") + 1
    return name[:cut], name[cut:]


def _dirname(path: bytes) -> bytes:
    parent = path.rsplit(b"/", 1)[0]
    return parent or b"/"


def _basename(path: bytes) -> bytes:
    return path.rsplit(b"/", 1)[-1]


def _bound_ns(ns: int) -> int:
    return ns if 0 <= ns <= _MAX_TIME_NS else 0


def _times(header: TarHeader) -> tuple[int, int]:
    """(atime, mtime) as containerd sets them: atime is the later of the two."""
    atime = header.mtime_ns if header.atime_ns is None else max(header.atime_ns, header.mtime_ns)
    return _bound_ns(atime), _bound_ns(header.mtime_ns)


@dataclass
class Applied:
    """What applying a layer left for later: directories containerd would have created with a
    lower layer's attributes (relative path -> whether the tar also listed it afterwards, in which
    case only the lower layer's xattrs are still to be copied), and counts."""

    implicit_dirs: dict[bytes, bool] = field(default_factory=dict)
    entries: int = 0
    bytes_written: int = 0


class _Applier:
    def __init__(self, root: bytes, overlay: bool, on_written: Callable[[int], None]) -> None:
        self.root = root
        self.overlay = overlay
        self.on_written = on_written
        self.result = Applied()
        self.dirs: list[tuple[bytes, int, int]] = []  # directories listed: (name, atime, mtime)
        # Plain (non-overlay) whiteouts of an opaque directory keep what this layer wrote.
        self.unpacked: set[bytes] = set()
        # Parent paths known to resolve to an existing directory: their resolution. Anything that
        # removes or replaces a path may change resolutions, and clears it.
        self.resolved_dirs: dict[bytes, bytes] = {}

    def rel(self, path: bytes) -> bytes:
        return path[len(self.root) + 1 :]

    # --- one entry ------------------------------------------------------------------------------

    def entry(self, header: TarHeader, tar: TarReader) -> None:
        self.result.entries += 1
        if self.result.entries > MAX_ENTRIES:
            raise LayerError(f"more than {MAX_ENTRIES} entries")
        name = clean(header.name)
        parent_name, base = _split(name)
        parent = self.resolved_dirs.get(parent_name)
        if parent is None:
            parent = root_path(self.root, parent_name)
        leaf = clean(b"/" + base)
        path = parent if leaf == b"/" else parent + leaf
        if path == self.root:
            return  # containerd: "resolved to root", ignored
        if parent != self.root:
            self.mkparent(parent)
            self.resolved_dirs[parent_name] = parent  # an existing directory now
        self.validate_whiteout(path)
        if not self.convert_whiteout(header, path):
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not (stat.S_ISDIR(st.st_mode) and header.typeflag == b"5"):
            self.remove_all(path)
        self.create(path, header, tar)
        if header.typeflag == b"5":
            self.dirs.append((name, *_times(header)))
            implicit = self.result.implicit_dirs
            if self.rel(path) in implicit:
                implicit[self.rel(path)] = True
        if not self.overlay:
            self.unpacked.add(path)

    def mkparent(self, path: bytes) -> None:
        """Create ``path`` and its missing ancestors (0755), as containerd's mkparent does; an
        ancestor that exists as something else than a directory fails the layer."""
        missing: list[bytes] = []
        probe = path
        while len(probe) > len(self.root):
            try:
                st = os.lstat(probe)
            except FileNotFoundError:
                missing.append(probe)
                probe = _dirname(probe)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise LayerError(f"{self.rel(probe)!r} is not a directory (ENOTDIR)")
            break
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o755)
            if self.overlay:  # lower layers lend it their attributes (copy_up_parents)
                self.result.implicit_dirs[self.rel(directory)] = False

    def validate_whiteout(self, path: bytes) -> None:
        base = _basename(path)
        if base == OPAQUE_MARKER or not base.startswith(WHITEOUT_PREFIX):
            return
        if base[len(WHITEOUT_PREFIX) :] in (b"", b".", b".."):
            raise LayerError(f"invalid whiteout name {base[:200]!r}")

    def convert_whiteout(self, header: TarHeader, path: bytes) -> bool:
        """Handle a whiteout or opaque marker; True when ``path`` is an ordinary entry to create."""
        base, directory = _basename(path), _dirname(path)
        if base == OPAQUE_MARKER:
            if self.overlay:
                os.setxattr(directory, OPAQUE_XATTR, b"y")
            else:
                self.remove_not_unpacked(directory)
            return False
        if base.startswith(WHITEOUT_PREFIX):
            hidden = directory + b"/" + base[len(WHITEOUT_PREFIX) :]
            if self.overlay:
                os.mknod(hidden, stat.S_IFCHR, 0)
                os.chown(hidden, header.uid, header.gid)
            else:
                self.remove_all(hidden)
            return False
        return True

    def remove_not_unpacked(self, directory: bytes) -> None:
        """Remove everything below ``directory`` that this layer did not put there itself."""
        os.lstat(directory)  # containerd fails when the directory is missing
        stack = [directory]
        while stack:
            current = stack.pop()
            try:
                names = sorted(os.listdir(current))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                child = current + b"/" + name
                if child not in self.unpacked:
                    self.remove_all(child)
                elif stat.S_ISDIR(os.lstat(child).st_mode):
                    stack.append(child)

    def remove_all(self, path: bytes) -> None:
        """Go's ``os.RemoveAll``: the path and what is below it; a symlink itself, not its target."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        self.resolved_dirs.clear()
        rel = self.rel(path)
        for known in [d for d in self.result.implicit_dirs if d == rel or d.startswith(rel + b"/")]:
            del self.result.implicit_dirs[known]
        if stat.S_ISDIR(st.st_mode):
            left = remove_tree(Path(os.fsdecode(path)))
            if left:
                raise LayerError(f"{rel[:200]!r} holds mounts")
        else:
            os.unlink(path)

    def create(self, path: bytes, header: TarHeader, tar: TarReader) -> None:
        kind = header.typeflag
        mode = header.mode & 0o7777
        fd = -1
        if kind == b"5":
            try:
                is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
            except FileNotFoundError:
                is_dir = False
            if not is_dir:
                os.mkdir(path, mode)
                os.chmod(path, mode)
        elif kind == b"0":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        elif kind in (b"3", b"4", b"6"):
            file_type = {b"3": stat.S_IFCHR, b"4": stat.S_IFBLK, b"6": stat.S_IFIFO}[kind]
            os.mknod(path, mode | file_type, os.makedev(header.devmajor, header.devminor))
        elif kind == b"1":
            os.link(self.hardlink_target(header.linkname), path, follow_symlinks=False)
        elif kind == b"2":
            os.symlink(header.linkname, path)
        elif kind == b"g":
            return  # a PAX global header: nothing to create (containerd logs and ignores it)
        else:
            raise LayerError(f"unhandled tar header type {kind[0] if kind else 0}")
        try:
            if fd >= 0:
                os.fchmod(fd, mode)
                self.copy_data(fd, header, tar)
            self.set_attributes(path, fd, header, mode)
        finally:
            if fd >= 0:
                os.close(fd)

    def copy_data(self, fd: int, header: TarHeader, tar: TarReader) -> None:
        while data := tar.read(COPY_BYTES):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self.result.bytes_written += len(data)
            self.on_written(len(data))

    def set_attributes(self, path: bytes, fd: int, header: TarHeader, mode: int) -> None:
        """Owner, xattrs, mode, times: in containerd's order (chown may clear setuid bits and
        file capabilities, so it comes first)."""
        target: bytes | int = fd if fd >= 0 else path
        follow = fd >= 0
        os.chown(target, header.uid, header.gid, follow_symlinks=follow)
        xattrs = header.xattrs()
        if xattrs:
            self.set_xattrs(path, target, follow, xattrs)
        is_symlink = header.typeflag == b"2" or (
            header.typeflag == b"1" and stat.S_ISLNK(os.lstat(path).st_mode)
        )
        if not is_symlink:
            os.chmod(target, mode)
        os.utime(target, ns=_times(header), follow_symlinks=follow)

    def set_xattrs(self, path: bytes, target: bytes | int, follow: bool, xattrs: dict[bytes, bytes]) -> None:
        for key, value in xattrs.items():
            name = os.fsdecode(key)
            if key.startswith(b"trusted."):
                continue  # containerd: "admin attributes from archive not supported" (ignored)
            try:
                os.setxattr(target, name, value, follow_symlinks=follow)
            except OSError as exc:
                if exc.errno == errno.ENOTSUP:
                    continue
                if exc.errno == errno.EPERM and key.startswith(b"user."):
                    st = os.lstat(path)
                    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                        continue
                raise

    def hardlink_target(self, linkname: bytes) -> bytes:
        parent_name, base = _split(linkname)
        parent = root_path(self.root, parent_name)
        target = clean(parent + b"/" + base) if base else parent
        if not target.startswith(self.root):  # containerd's (string) prefix check
            target = self.root
        return target

    # --- the end --------------------------------------------------------------------------------

    def finish(self) -> None:
        """Directory times, now that nothing more is created in them."""
        for name, atime, mtime in self.dirs:
            os.utime(root_path(self.root, name), ns=(atime, mtime), follow_symlinks=False)


def apply_layer(
    tar: TarReader, root: bytes, *, overlay: bool, on_written: Callable[[int], None] = lambda n: None
) -> Applied:
    """Apply every entry ``tar`` yields to the empty directory ``root`` (an absolute path), as
    containerd applies a layer to an overlay upper directory (``overlay``) or to the first layer
    of a chain. ``on_written`` hears of every file data write (a disk-space check). OSError and
    LayerError fail the layer; the directory is then the caller's to remove."""
    applier = _Applier(root.rstrip(b"/"), overlay, on_written)
    while (header := tar.next()) is not None:
        applier.entry(header, tar)
    applier.finish()
    return applier.result


def copy_up_parents(root: bytes, implicit_dirs: dict[bytes, bool], lowerdirs: Sequence[bytes]) -> None:
    """Give the directories ``apply_layer`` created unlisted what containerd's mkparent gives them
    from the lower layers (nearest first): the first lower layer where the path resolves to a
    directory lends its owner, mode and atime (not mtime: in containerd creating the entries below
    moved that to the time of unpacking anyway) and its xattrs except ``trusted.*`` (only those
    not set already); a lower layer where it is something else ends the search. For directories
    the tar listed after creating them implicitly, only the xattrs."""
    for rel in sorted(implicit_dirs, key=lambda p: p.count(b"/")):
        path = root + b"/" + rel
        listed_later = implicit_dirs[rel]
        for lower in lowerdirs:
            try:
                source = root_path(lower, rel)
                st = os.lstat(source)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                break
            if not listed_later:
                os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
                os.chmod(path, stat.S_IMODE(st.st_mode))
                os.utime(path, ns=(st.st_atime_ns, os.lstat(path).st_mtime_ns), follow_symlinks=False)
            _copy_xattrs(source, path)
            break


def _copy_xattrs(source: bytes, target: bytes) -> None:
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return
        raise
    for name in names:
        if name.startswith("trusted."):
            continue
        try:
            value = os.getxattr(source, name, follow_symlinks=False)
            os.setxattr(target, name, value, os.XATTR_CREATE, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.ENODATA, errno.EEXIST):
                raise
