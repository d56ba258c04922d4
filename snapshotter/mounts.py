"""The kernel's mount table as lazysnap needs it, and removing directories that may hold mounts.

Snapshot directories are removed while containerd and lazy layers use the node: removal must never
descend into a mount (a lazy layer's file system, or anything a container left mounted) and must
not depend on Python's recursion limit or PATH_MAX, since a container can build a directory chain
thousands of levels deep in its writable layer. ``remove_tree`` walks with directory file
descriptors and an explicit stack, and leaves alone whatever lies on another device.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_MNT_DETACH = 2


def _unescape(field: str) -> str:
    """/proc/self/mounts escapes space, tab, newline and backslash as octal."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_type(path: Path) -> str | None:
    """The file system type of the topmost mount at ``path`` ("fuse.lazysnap", "erofs", …), or None."""
    target = str(path)
    found = None
    with open("/proc/self/mounts") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 2 and _unescape(fields[1]) == target:
                found = fields[2]  # later lines are mounted on top of earlier ones
    return found


def is_fuse_mountpoint(path: Path) -> bool:
    """Whether any FUSE file system is mounted at ``path`` (stacked mounts included)."""
    target = str(path)
    with open("/proc/self/mounts") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 2 and _unescape(fields[1]) == target and fields[2].startswith("fuse"):
                return True
    return False


def unmount(path: Path) -> None:
    """Detach the topmost mount at ``path`` (lazily, so busy mounts do not block shutdown)."""
    if _libc.umount2(str(path).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def remove_tree(path: Path) -> list[str]:
    """Remove the directory ``path`` and everything below it that lies on its file system.

    Iterative, through directory file descriptors (no recursion limit, no PATH_MAX). Entries on
    another device (mount points) are neither entered nor removed; their names are returned, and
    their parent directories stay. A missing ``path`` is not an error; others raise OSError."""
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    device = os.fstat(top).st_dev
    skipped: list[str] = []
    # Each frame: (fd of a directory, its entry names not yet handled, its name in its parent).
    # Names only, never whole paths: a path thousands of levels deep would cost memory per level.
    stack: list[tuple[int, list[str], str]] = [(top, os.listdir(top), "")]
    try:
        while stack:
            fd, names, own_name = stack[-1]
            if not names:
                stack.pop()
                os.close(fd)
                if stack:  # remove the now empty directory from its parent
                    try:
                        os.rmdir(own_name, dir_fd=stack[-1][0])
                    except OSError as exc:
                        if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY):
                            raise
                continue
            name = names.pop()
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=fd)
                continue
            if st.st_dev != device:
                skipped.append(name)
                continue
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                continue
            if os.fstat(child).st_dev != device:  # mounted on between stat and open
                os.close(child)
                skipped.append(name)
                continue
            stack.append((child, os.listdir(child), name))
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    if not skipped:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(path)
    return skipped
