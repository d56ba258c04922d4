"""The layer applier against containerd's semantics (archive/tar.go applyNaive, createTarFile,
OverlayConvertWhiteout, mkparent; continuity fs.RootPath). Runs as root: owners, devices and
trusted.* xattrs need it (the suite runs as root)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from snapshotter.eager.apply import OPAQUE_XATTR, LayerError, apply_layer, clean, copy_up_parents, root_path
from snapshotter.eager.tarreader import TarReader

MTIME = 1_600_000_000


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs: object
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = MTIME
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def layer(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def apply(root: Path, data: bytes, *, overlay: bool = True) -> dict[bytes, bool]:
    stream = io.BytesIO(data)
    root.mkdir(exist_ok=True)
    return apply_layer(TarReader(stream.read), os.fsencode(root), overlay=overlay).implicit_dirs


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


def test_files_directories_links_devices_and_their_attributes(root: Path) -> None:
    apply(
        root,
        layer(
            entry("dir", tarfile.DIRTYPE, mode=0o1777, uid=5, gid=6),
            entry("dir/setuid", data=b"x", mode=0o4755, uid=1000, gid=1000),
            entry("dir/sym", tarfile.SYMTYPE, linkname="setuid", uid=7, gid=7),
            entry("dir/hard", tarfile.LNKTYPE, linkname="dir/setuid", mode=0o4755, uid=1000, gid=1000),
            entry("null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
            entry("loop", tarfile.BLKTYPE, devmajor=7, devminor=9, mode=0o660),
            entry("fifo", tarfile.FIFOTYPE, mode=0o600),
        ),
    )
    d = os.lstat(root / "dir")
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid) == (0o1777, 5, 6)
    f = os.lstat(root / "dir/setuid")
    assert (stat.S_IMODE(f.st_mode), f.st_uid, (root / "dir/setuid").read_bytes()) == (0o4755, 1000, b"x")
    assert (
        f.st_mtime_ns == MTIME * 10**9 and f.st_nlink == 2 and os.lstat(root / "dir/hard").st_ino == f.st_ino
    )
    s = os.lstat(root / "dir/sym")
    assert (
        stat.S_ISLNK(s.st_mode)
        and os.readlink(root / "dir/sym") == "setuid"
        and (s.st_uid, s.st_gid) == (7, 7)
    )
    assert s.st_mtime_ns == MTIME * 10**9  # times of the link itself
    n = os.lstat(root / "null")
    assert stat.S_ISCHR(n.st_mode) and os.major(n.st_rdev) == 1 and os.minor(n.st_rdev) == 3
    assert stat.S_IMODE(n.st_mode) == 0o666
    assert stat.S_ISBLK(os.lstat(root / "loop").st_mode) and stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)
    assert d.st_mtime_ns == MTIME * 10**9  # directory times set last, after its entries were made


def test_pax_times_xattrs_and_the_later_atime(root: Path) -> None:
    info, _ = entry("f", data=b"1")
    info.pax_headers = {
        "mtime": "1600000000.123456789",
        "atime": "1700000000",
        "SCHILY.xattr.user.k": "v",
        "SCHILY.xattr.trusted.k": "ignored",  # containerd: admin attributes from archives are not set
    }
    old, _ = entry("old", data=b"2")
    old.pax_headers = {"mtime": "-5", "atime": "1"}  # before 1970: containerd sets 0
    apply(root, layer((info, b"1"), (old, b"2")))
    st = os.lstat(root / "f")
    assert st.st_mtime_ns == 1_600_000_000_123_456_789 and st.st_atime_ns == 1_700_000_000 * 10**9
    assert os.listxattr(root / "f") == ["user.k"] and os.getxattr(root / "f", "user.k") == b"v"
    st = os.lstat(root / "old")
    assert (st.st_mtime_ns, st.st_atime_ns) == (0, 10**9)


def test_overlay_whiteouts_become_devices_and_opaque_markers_xattrs(root: Path) -> None:
    apply(
        root,
        layer(
            entry("dir", tarfile.DIRTYPE),
            entry("dir/.wh.gone", uid=3, gid=4),
            entry("dir/sub/.wh..wh..opq"),
            entry("dir/sub/new", data=b"n"),
        ),
    )
    st = os.lstat(root / "dir/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
    assert (st.st_uid, st.st_gid) == (3, 4)
    assert os.getxattr(root / "dir/sub", OPAQUE_XATTR) == b"y"
    assert sorted(os.listdir(root / "dir")) == ["gone", "sub"] and os.listdir(root / "dir/sub") == ["new"]


def test_first_layer_whiteouts_remove_what_the_layer_wrote(root: Path) -> None:
    """The first layer is applied through a bind mount with plain whiteouts: a whiteout removes an
    earlier entry of the same layer, an opaque marker what the layer did not list after it."""
    apply(
        root,
        layer(
            entry("a", data=b"a"),
            entry(".wh.a"),
            entry("d", tarfile.DIRTYPE),
            entry("d/kept", data=b"k"),
            entry("d/.wh..wh..opq"),
            entry("d/after", data=b"x"),
        ),
        overlay=False,
    )
    assert sorted(os.listdir(root)) == ["d"]
    assert sorted(os.listdir(root / "d")) == ["after", "kept"]
    assert OPAQUE_XATTR not in os.listxattr(root / "d")


def test_existing_paths_are_replaced_unless_both_are_directories(root: Path) -> None:
    apply(
        root,
        layer(
            entry("x", data=b"file first"),
            entry("x", tarfile.DIRTYPE, mode=0o700),
            entry("x/inside", data=b"i"),
            entry("x", tarfile.DIRTYPE, mode=0o711),  # merged: its content stays
            entry("y", tarfile.DIRTYPE),
            entry("y/z", data=b"z"),
            entry("y", tarfile.SYMTYPE, linkname="x"),  # a directory replaced by a link
        ),
    )
    assert stat.S_IMODE(os.lstat(root / "x").st_mode) == 0o711 and os.listdir(root / "x") == ["inside"]
    assert os.readlink(root / "y") == "x"


@pytest.mark.parametrize("name", ["../../escape", "/abs/../../escape", "./../escape", "a/../../../escape"])
def test_names_climbing_out_land_inside_the_root(tmp_path: Path, root: Path, name: str) -> None:
    apply(root, layer(entry(name, data=b"contained")))
    assert (root / "escape").read_bytes() == b"contained"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_symlinks_in_parent_paths_resolve_within_the_root(tmp_path: Path, root: Path) -> None:
    apply(
        root,
        layer(
            entry("etc", tarfile.DIRTYPE),
            entry("toslash", tarfile.SYMTYPE, linkname="/"),
            entry("up", tarfile.SYMTYPE, linkname="../../../.."),
            entry("rel", tarfile.SYMTYPE, linkname="etc"),
            entry("toslash/etc/a", data=b"a"),
            entry("up/etc/b", data=b"b"),
            entry("rel/c", data=b"c"),
        ),
    )
    assert sorted(os.listdir(root / "etc")) == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_hard_links_resolve_within_the_root(root: Path) -> None:
    apply(root, layer(entry("t", data=b"t"), entry("l", tarfile.LNKTYPE, linkname="../../t")))
    assert os.lstat(root / "l").st_ino == os.lstat(root / "t").st_ino
    with pytest.raises(OSError):  # a link to nothing fails, as in containerd
        apply(root, layer(entry("l2", tarfile.LNKTYPE, linkname="missing")))
    with pytest.raises(OSError):  # ".." ends at the root itself: a directory cannot be linked
        apply(root, layer(entry("l3", tarfile.LNKTYPE, linkname="..")))


@pytest.mark.parametrize("name", [".wh..", "d/.wh.", "d/.wh.."])
def test_whiteouts_climbing_out_are_refused(root: Path, name: str) -> None:
    with pytest.raises(LayerError, match="invalid whiteout"):
        apply(root, layer(entry(name)))


def test_symlink_loops_are_refused(root: Path) -> None:
    with pytest.raises(LayerError, match="too many symlinks"):
        apply(
            root,
            layer(
                entry("a", tarfile.SYMTYPE, linkname="b"),
                entry("b", tarfile.SYMTYPE, linkname="a"),
                entry("a/x"),
            ),
        )


def test_an_ancestor_that_is_a_file_fails(root: Path) -> None:
    with pytest.raises(LayerError, match="not a directory"):
        apply(root, layer(entry("f", data=b"f"), entry("f/x", data=b"x")))


def test_unknown_types_fail_and_global_headers_are_ignored(root: Path) -> None:
    with pytest.raises(LayerError, match="unhandled tar header type"):
        apply(root, layer(entry("c", tarfile.CONTTYPE, data=b"")))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}) as tar:
        tar.addfile(*entry("f", data=b"f")[:1], io.BytesIO(b"f"))
    apply(root, buf.getvalue())
    assert os.listdir(root) == ["f"]  # the global header's name (pax_global_header) is not created


def test_unlisted_directories_get_the_lower_layers_attributes(tmp_path: Path, root: Path) -> None:
    lower, further = tmp_path / "lower", tmp_path / "further"
    (lower / "a/b").mkdir(parents=True)
    os.chown(lower / "a", 7, 8)
    os.chmod(lower / "a", 0o710)
    os.setxattr(lower / "a", "user.lower", b"1")
    os.setxattr(lower / "a", "trusted.overlay.opaque", b"y")  # never copied up
    (further / "a/b").mkdir(parents=True)
    os.chmod(further / "a/b", 0o700)  # hidden by lower's a/b
    (lower / "s").mkdir()
    os.symlink("s", lower / "link")  # resolved within the lower layer
    os.chown(lower / "s", 9, 9)
    (lower / "file").write_bytes(b"")  # not a directory: the search ends, defaults stay
    implicit = apply(
        root,
        layer(
            entry("a/b/c/new", data=b"n"),
            entry("link/x", data=b"x"),
            entry("file/y", data=b"y"),
            entry("listed/z", data=b"z"),
            entry("listed", tarfile.DIRTYPE, mode=0o701),
        ),
    )
    assert implicit == {
        b"a": False,
        b"a/b": False,
        b"a/b/c": False,
        b"link": False,
        b"file": False,
        b"listed": True,
    }
    os.mkdir(lower / "listed")
    os.setxattr(lower / "listed", "user.l", b"2")
    copy_up_parents(os.fsencode(root), implicit, [os.fsencode(lower), os.fsencode(further)])
    a = os.lstat(root / "a")
    assert (stat.S_IMODE(a.st_mode), a.st_uid, a.st_gid) == (0o710, 7, 8)
    assert os.listxattr(root / "a") == ["user.lower"]
    assert stat.S_IMODE(os.lstat(root / "a/b").st_mode) == 0o755  # lower's a/b comes first
    assert stat.S_IMODE(os.lstat(root / "a/b/c").st_mode) == 0o755  # in no lower layer
    assert os.lstat(root / "link").st_uid == 9
    assert os.lstat(root / "file").st_uid == 0 and stat.S_IMODE(os.lstat(root / "file").st_mode) == 0o755
    listed = os.lstat(root / "listed")  # listed after all: its own attributes, the lower's xattrs
    assert stat.S_IMODE(listed.st_mode) == 0o701 and os.getxattr(root / "listed", "user.l") == b"2"


def test_clean_and_root_path_follow_go_and_continuity(tmp_path: Path) -> None:
    assert [clean(p) for p in (b"", b"a//b/", b"/../x", b"../../x", b"./a/./b/..")] == [
        b".",
        b"a/b",
        b"/x",
        b"../../x",
        b"a",
    ]
    root = tmp_path
    (root / "real").mkdir()
    os.symlink("/real", root / "abs")
    os.symlink("../../real/../real", root / "rel")
    base = os.fsencode(root)
    assert root_path(base, b"abs/x") == base + b"/real/x"
    assert root_path(base, b"rel/x") == base + b"/real/x"
    assert root_path(base, b"missing/../../x") == base + b"/x"
