"""The kernel facilities the blob server needs besides /dev/fuse: mounts, readahead, signals.

mount(2) and umount2(2) through ctypes (the ``mount`` command cannot pass an fd it opened),
the mount table read from /proc/self/mountinfo (a stat() of a FUSE mount point would send a request
to the server that may be the caller), the backing device's readahead in sysfs, and whether a
thread is being killed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_SIGKILL_BIT = 1 << (9 - 1)
_OCTAL = re.compile(r"\\([0-7]{3})")


def mount_readonly(source: str, target: Path, fstype: str, options: str) -> None:
    """mount(2) a read-only, nosuid, nodev, noexec file system."""
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} at {target}: {os.strerror(err)}")


def _unescape(field: str) -> str:
    """Decode the octal escapes (``\\040`` for a space, ...) of /proc mount tables."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_at(path: Path) -> tuple[str, str] | None:
    """(``major:minor``, fstype) of the topmost mount at ``path``, from /proc/self/mountinfo (no
    request reaches a FUSE server, unlike stat())."""
    found: tuple[str, str] | None = None
    target = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split()
            try:
                sep = fields.index("-")
            except ValueError:
                continue
            if len(fields) > sep + 1 and _unescape(fields[4]) == target:
                found = (fields[2], fields[sep + 1])
    return found


def unmount(path: Path) -> None:
    """Unmount ``path``: at once if idle, else lazily (EROFS may hold a blob open)."""
    if _libc.umount2(str(path).encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and _libc.umount2(str(path).encode(), MNT_DETACH) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOENT):
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def clear_dead_mounts(path: Path) -> None:
    """Detach FUSE mounts left at ``path`` by a server that died without a keeper."""
    for _ in range(16):
        mounted = mount_at(path)
        if mounted is None or not mounted[1].startswith("fuse"):
            return
        log.warning("detaching a dead FUSE mount", extra={"mountpoint": str(path), "fstype": mounted[1]})
        if _libc.umount2(str(path).encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def fatal_signal_pending(tid: int) -> bool:
    """True if thread ``tid`` has SIGKILL pending: it is being killed (the kernel turns any fatal
    signal into a pending SIGKILL for every thread of the process)."""
    if tid <= 0:
        return False
    try:
        with open(f"/proc/{tid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & _SIGKILL_BIT:
                    return True
    except (OSError, ValueError, IndexError):
        return False
    return False


def max_pages_limit() -> int:
    """The kernel's cap on pages per request (sysctl fs.fuse.max_pages_limit since Linux 6.12)."""
    try:
        return max(1, int(Path("/proc/sys/fs/fuse/max_pages_limit").read_text()))
    except (OSError, ValueError):
        return 256


def set_readahead(dev: str, readahead: int) -> None:
    """Raise the mount's readahead: the kernel caps it at the default 128 KiB whatever INIT says."""
    path = Path("/sys/class/bdi") / dev / "read_ahead_kb"
    try:
        path.write_text(str(max(readahead // 1024, 4)))
    except OSError as exc:
        log.warning("cannot set the blob mount's readahead: %s", exc, extra={"path": str(path)})
