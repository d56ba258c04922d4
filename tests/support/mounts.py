"""Find and remove mounts below a directory (teardown of tests and benchmarks)."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """Decode the octal escapes (``\\040`` etc.) used in /proc/mounts."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    """One line of /proc/mounts."""

    source: str
    target: str
    fstype: str
    options: str


def list_mounts() -> list[Mount]:
    """All current mounts, in mount order."""
    out: list[Mount] = []
    with open("/proc/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4:
                out.append(Mount(_unescape(parts[0]), _unescape(parts[1]), parts[2], parts[3]))
    return out


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def mounts_under(root: str | os.PathLike[str]) -> list[Mount]:
    """Mounts whose mount point is ``root`` or below it."""
    r = os.path.realpath(root)
    return [m for m in list_mounts() if _is_under(m.target, r)]


def lazy_layer_mounts(root: str | os.PathLike[str]) -> list[str]:
    """Mount points of the lazy layers a lazysnap daemon with this ``root`` serves: its snapshot
    directories with a FUSE (per-file backend) or EROFS (kernel backend) file system mounted; the
    blob server's own mount (``ROOT/blobs``) is not a layer."""
    snapshots = os.path.join(os.path.realpath(root), "snapshots")
    return [m.target for m in mounts_under(snapshots) if m.fstype == "erofs" or m.fstype.startswith("fuse")]


def unmount_all(root: str | os.PathLike[str], *, attempts: int = 5) -> list[Mount]:
    """Unmount everything at or below ``root``, deepest first.

    Each mount is tried with ``umount`` and then ``umount -l`` (lazy). Repeats
    while progress is made (for stacked mounts). Returns mounts still present.
    """
    remaining = mounts_under(root)
    for _ in range(attempts):
        if not remaining:
            break
        # Deepest first; for stacked mounts on one target the latest comes first.
        order = sorted(
            enumerate(remaining),
            key=lambda im: (len(Path(im[1].target).parts), im[0]),
            reverse=True,
        )
        for _, m in order:
            for cmd in (["umount", m.target], ["umount", "-l", m.target]):
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
                if proc.returncode == 0:
                    break
        now = mounts_under(root)
        if len(now) >= len(remaining) and now == remaining:
            remaining = now
            break
        remaining = now
    return remaining
