"""Disk usage of a directory tree, counted as containerd counts it (continuity fs.DiskUsage):
allocated 512-byte blocks of every distinct inode, the root included, without following links."""

from __future__ import annotations

import os
from pathlib import Path

from snapshotter.store import Usage


def disk_usage(root: Path) -> Usage:
    seen: set[tuple[int, int]] = set()
    size = 0

    def visit(path: str) -> None:
        nonlocal size
        st = os.lstat(path)
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            size += st.st_blocks * 512

    visit(str(root))
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        for name in (*dirnames, *filenames):
            visit(os.path.join(dirpath, name))
    return Usage(size=size, inodes=len(seen))


def _raise(exc: OSError) -> None:
    raise exc
