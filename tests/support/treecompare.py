"""Compare directory trees as an unpacked layer: every entry's type, mode, owner, size, content,
symlink target, device number, xattrs (``trusted.*`` included: overlayfs' opaque marker),
mtime and which paths share an inode. Used to check that lazysnap unpacks a layer exactly as
containerd does.

Some times depend on when a tree was unpacked, not on the layer: the mtime of a directory the tar
does not list (its entries were created at unpacking time), of a whiteout device and of the tree's
root. ``unlisted`` names the directories to leave the mtime of out (see ``listed_dirs``).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any


def _xattrs(path: str) -> dict[str, bytes]:
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
    }


def tree(root: Path) -> dict[str, dict[str, Any]]:
    """Each entry below ``root`` (relative path, "." for the root) and what it is."""
    found: dict[str, dict[str, Any]] = {}
    inodes: dict[int, list[str]] = defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            path = os.path.normpath(os.path.join(dirpath, name))
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry: dict[str, Any] = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": stat.S_IMODE(st.st_mode),
                "owner": (st.st_uid, st.st_gid),
                "mtime_ns": st.st_mtime_ns,
                "xattrs": _xattrs(path),
            }
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                with open(path, "rb") as fh:
                    entry["sha256"] = hashlib.file_digest(fh, "sha256").hexdigest()
                if st.st_nlink > 1:
                    inodes[st.st_ino].append(rel)
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            found[rel] = entry
    for paths in inodes.values():
        for rel in paths:
            found[rel]["links"] = sorted(paths)
    return found


def listed_dirs(tar_bytes: bytes) -> set[str]:
    """The directories a layer tar lists itself (normalized relative paths)."""
    import io

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {
            os.path.normpath(str(PurePosixPath("/", m.name)).lstrip("/") or ".") for m in tar if m.isdir()
        }


def differences(ours: Path, theirs: Path, listed: set[str] | None = None) -> list[str]:
    """Where the tree at ``ours`` differs from the one at ``theirs`` (empty: equal). The mtime
    of directories not in ``listed`` (when given), of whiteout devices and of the root is not
    compared (see the module docstring)."""
    a, b = tree(ours), tree(theirs)
    problems = [f"{p}: only in ours" for p in sorted(a.keys() - b.keys())]
    problems += [f"{p}: missing" for p in sorted(b.keys() - a.keys())]
    for path in sorted(a.keys() & b.keys()):
        mine, other = dict(a[path]), dict(b[path])
        whiteout = stat.S_ISCHR(other["type"]) and other.get("rdev") == (0, 0)
        unlisted_dir = stat.S_ISDIR(other["type"]) and listed is not None and path not in listed
        if path == "." or whiteout or unlisted_dir:
            mine.pop("mtime_ns")
            other.pop("mtime_ns")
        for key in sorted(mine.keys() | other.keys()):
            if mine.get(key) != other.get(key):
                problems.append(f"{path}: {key} {mine.get(key)!r} != {other.get(key)!r}")
    return problems
