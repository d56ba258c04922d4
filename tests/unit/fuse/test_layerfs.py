"""The FUSE layer filesystem on the real kernel: attributes, links, whiteouts, overlay stacking."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from snapshotter.formats.index import Compression, Entry, EntryType, LayerIndex
from snapshotter.fuse.layerfs import LayerFS, MountedLayer, is_fuse_mountpoint
from snapshotter.layertree import LayerTree

pytestmark = pytest.mark.usefixtures("privileged")  # every test mounts
MTIME_NS = 1_600_000_000_123_456_789


class DictReader:
    """Contents by entry name; a name in ``broken`` fails like a chunk that failed verification."""

    def __init__(self, contents: dict[str, bytes], broken: frozenset[str] = frozenset()) -> None:
        self.contents = contents
        self.broken = broken
        self.calls = 0

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        self.calls += 1
        if entry.name in self.broken:
            raise OSError(errno.EIO, "chunk digest mismatch")
        return self.contents[entry.name][offset : offset + size]


def index_of(*entries: Entry) -> LayerIndex:
    by_name = {"": Entry("", EntryType.DIR, 0o755, mtime_ns=MTIME_NS)}
    by_name.update({e.name: e for e in entries})
    return LayerIndex("estargz", Compression.GZIP, by_name)


def reg(name: str, data: bytes, mode: int = 0o644, **kw: object) -> tuple[Entry, bytes]:
    return Entry(name, EntryType.REG, mode, size=len(data), mtime_ns=MTIME_NS, **kw), data  # type: ignore[arg-type]


def mount(workdir: Path, name: str, index: LayerIndex, reader: DictReader) -> MountedLayer:
    mp = workdir / name
    mp.mkdir()
    layer = MountedLayer(LayerFS(LayerTree(index), reader, layer=f"sha256:{name}"), mp)
    layer.start()
    return layer


def test_tree_attributes_and_contents(workdir: Path) -> None:
    big, big_data = reg("usr/big", os.urandom(300_000), 0o755, uid=1000, gid=1001)
    small, small_data = reg("etc/conf", b"key=value\n", 0o600)
    entries = [
        Entry("usr", EntryType.DIR, 0o755, mtime_ns=MTIME_NS),
        big,
        Entry("etc", EntryType.DIR, 0o750, uid=3, mtime_ns=MTIME_NS, xattrs={"user.note": b"hello"}),
        small,
        Entry("etc/hard", EntryType.HARDLINK, 0o600, link_name="etc/conf"),
        Entry("etc/link", EntryType.SYMLINK, 0o777, link_name="../usr/big", mtime_ns=MTIME_NS),
        Entry("dev", EntryType.DIR, 0o755),
        Entry("dev/null", EntryType.CHAR, 0o666, dev_major=1, dev_minor=3),
        Entry("dev/fifo", EntryType.FIFO, 0o644),
        reg(".prefetch.landmark", b"\x0f")[0],
    ]
    reader = DictReader({"usr/big": big_data, "etc/conf": small_data, ".prefetch.landmark": b"\x0f"})
    layer = mount(workdir, "l", index_of(*entries), reader)
    mp = layer.mountpoint
    try:
        assert sorted(os.listdir(mp)) == ["dev", "etc", "usr"]  # the landmark is hidden
        assert (mp / "usr/big").read_bytes() == big_data
        st = os.stat(mp / "usr/big")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o755, 1000, 1001, 300_000)
        assert st.st_mtime_ns == MTIME_NS
        assert os.stat(mp / "etc").st_uid == 3 and stat.S_IMODE(os.stat(mp / "etc").st_mode) == 0o750
        assert os.getxattr(mp / "etc", "user.note") == b"hello"
        conf, hard = os.stat(mp / "etc/conf"), os.stat(mp / "etc/hard")
        assert conf.st_ino == hard.st_ino and conf.st_nlink == 2
        assert (mp / "etc/hard").read_bytes() == small_data
        assert os.readlink(mp / "etc/link") == "../usr/big"
        null = os.lstat(mp / "dev/null")
        assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
        assert stat.S_ISFIFO(os.lstat(mp / "dev/fifo").st_mode)
        assert os.stat(mp).st_nlink == 5  # ".", "..", and three subdirectories
        with pytest.raises(OSError) as info:
            (mp / "etc/new").write_text("x")
        assert info.value.errno == errno.EROFS
        calls = reader.calls
        assert (mp / "usr/big").read_bytes() == big_data
        assert reader.calls == calls  # kernel page cache: a re-read never reaches Python
    finally:
        layer.unmount()
    assert not is_fuse_mountpoint(mp)


def test_failed_read_is_eio_and_the_fs_keeps_serving(workdir: Path) -> None:
    bad, _ = reg("bad", b"x" * 10)
    good, good_data = reg("good", b"fine")
    layer = mount(workdir, "l", index_of(bad, good), DictReader({"good": good_data}, frozenset({"bad"})))
    try:
        with pytest.raises(OSError) as info:
            (layer.mountpoint / "bad").read_bytes()
        assert info.value.errno == errno.EIO
        assert (layer.mountpoint / "good").read_bytes() == b"fine"
        assert layer.fs.read_errors >= 1  # the kernel may retry a failed read once
    finally:
        layer.unmount()


def test_overlayfs_sees_whiteouts_and_opaque_dirs(workdir: Path) -> None:
    """Two FUSE layers stacked by the kernel's overlayfs, as a container's rootfs is."""
    lower_files = {name: f"lower {name}\n".encode() for name in ("keep", "gone", "opq/old1", "opq/old2")}
    lower = [
        Entry("opq", EntryType.DIR, 0o755),
        *(reg(name, data)[0] for name, data in lower_files.items()),
    ]
    upper_new = b"upper new\n"
    upper = [
        reg(".wh.gone", b"")[0],
        Entry("opq", EntryType.DIR, 0o755),
        reg("opq/.wh..wh..opq", b"")[0],
        reg("opq/new", upper_new)[0],
    ]
    low = mount(workdir, "low", index_of(*lower), DictReader(lower_files))
    up = mount(workdir, "up", index_of(*upper), DictReader({"opq/new": upper_new}))
    merged = workdir / "merged"
    merged.mkdir()
    gone = os.lstat(up.mountpoint / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(up.mountpoint / "opq", "trusted.overlay.opaque") == b"y"
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={up.mountpoint}:{low.mountpoint}", merged],
        check=True,
    )
    try:
        assert sorted(os.listdir(merged)) == ["keep", "opq"]
        assert sorted(os.listdir(merged / "opq")) == ["new"]
        assert (merged / "keep").read_bytes() == b"lower keep\n"
        assert (merged / "opq/new").read_bytes() == upper_new
    finally:
        subprocess.run(["umount", str(merged)], check=True)
        up.unmount()
        low.unmount()
