"""Compare a mounted lazy layer with the tar it came from, file by file, as overlayfs must see it.

Used by the tests of both backends (FUSE and EROFS): content, modes (setuid, setgid, sticky),
owners, mtimes (whole seconds: eStargz TOCs keep no more), xattrs, symlink targets, hardlinks (one
inode, link count), devices, fifos, whiteouts (``.wh.NAME`` is a 0/0 character device ``NAME``),
opaque directories (``trusted.overlay.opaque=y``) and hidden root landmarks.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath

from snapshotter.layertree import LANDMARKS, OPAQUE_MARKER, OPAQUE_XATTRS, WHITEOUT_PREFIX, is_overlay_xattr

_XATTR_PAX = "SCHILY.xattr."


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    return {
        key.removeprefix(_XATTR_PAX): value.encode("utf-8", "surrogateescape")
        for key, value in member.pax_headers.items()
        if key.startswith(_XATTR_PAX) and not is_overlay_xattr(key.removeprefix(_XATTR_PAX))
    }


def _listed_xattrs(path: Path) -> dict[str, bytes]:
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
    }


def tar_mismatches(root: Path, tar_bytes: bytes) -> list[str]:
    """Differences between the tree mounted at ``root`` and the layer tar; empty when equal."""
    problems: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members: dict[str, tarfile.TarInfo] = {}
        whiteouts: set[str] = set()
        opaque: set[str] = set()
        for m in tar.getmembers():
            name = str(PurePosixPath("/", m.name)).lstrip("/")
            parent, base = os.path.split(name)
            if base == OPAQUE_MARKER:
                opaque.add(parent)
            elif base.startswith(WHITEOUT_PREFIX):
                whiteouts.add(os.path.join(parent, base.removeprefix(WHITEOUT_PREFIX)))
            elif not (parent == "" and base in LANDMARKS):
                members[name] = m
        links = Counter(
            str(PurePosixPath("/", m.linkname)).lstrip("/") for m in members.values() if m.islnk()
        )
        expected = set(members) | whiteouts | opaque
        for name in list(expected):  # parents the tar does not list
            expected.update(str(p) for p in PurePosixPath(name).parents if str(p) != ".")

        for name, m in members.items():
            path = root / name
            try:
                st = os.lstat(path)
            except OSError as exc:
                problems.append(f"{name}: {exc.strerror}")
                continue
            target = members.get(str(PurePosixPath("/", m.linkname)).lstrip("/")) if m.islnk() else None
            attrs = target or m  # a hardlink shows its target's inode
            if stat.S_IMODE(st.st_mode) != attrs.mode & 0o7777:
                problems.append(f"{name}: mode {stat.S_IMODE(st.st_mode):o}, tar {attrs.mode:o}")
            if (st.st_uid, st.st_gid) != (attrs.uid, attrs.gid):
                problems.append(f"{name}: owner {st.st_uid}:{st.st_gid}, tar {attrs.uid}:{attrs.gid}")
            if int(st.st_mtime) != int(attrs.mtime):
                problems.append(f"{name}: mtime {st.st_mtime}, tar {attrs.mtime}")
            if (attrs.isreg() or attrs.isdir()) and not m.issym():
                want = _xattrs(attrs)
                if name in opaque:
                    want.update(dict.fromkeys(OPAQUE_XATTRS, b"y"))
                if _listed_xattrs(path) != want:
                    problems.append(f"{name}: xattrs {_listed_xattrs(path)}, tar {want}")
            if m.islnk():
                if target is None or st.st_ino != os.lstat(root / m.linkname).st_ino:
                    problems.append(f"{name}: not a hard link of {m.linkname}")
            elif m.isreg():
                extracted = tar.extractfile(m)
                assert extracted is not None
                if not stat.S_ISREG(st.st_mode) or path.read_bytes() != extracted.read():
                    problems.append(f"{name}: content differs")
                if st.st_nlink != 1 + links[name]:
                    problems.append(f"{name}: {st.st_nlink} links, tar {1 + links[name]}")
            elif m.issym():
                if not stat.S_ISLNK(st.st_mode) or os.readlink(path) != m.linkname:
                    problems.append(f"{name}: not a symlink to {m.linkname}")
            elif m.isdir():
                if not stat.S_ISDIR(st.st_mode):
                    problems.append(f"{name}: not a directory")
            elif m.ischr() or m.isblk():
                kind = stat.S_ISCHR if m.ischr() else stat.S_ISBLK
                if not kind(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (
                    m.devmajor,
                    m.devminor,
                ):
                    problems.append(f"{name}: not device {m.devmajor}:{m.devminor}")
            elif m.isfifo() and not stat.S_ISFIFO(st.st_mode):
                problems.append(f"{name}: not a fifo")
        for name in sorted(whiteouts):
            st = os.lstat(root / name)
            if not stat.S_ISCHR(st.st_mode) or st.st_rdev != 0:
                problems.append(f"{name}: not a 0/0 whiteout device")
        for name in sorted(opaque - set(members)):
            if os.getxattr(root / name, OPAQUE_XATTRS[0]) != b"y":
                problems.append(f"{name}: not opaque")
    walked = {str(Path(d, n).relative_to(root)) for d, dirs, files in os.walk(root) for n in dirs + files}
    problems += [f"{name}: missing" for name in sorted(expected - walked)]
    problems += [f"{name}: not in the tar" for name in sorted(walked - expected)]
    return problems
