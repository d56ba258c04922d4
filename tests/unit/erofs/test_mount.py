"""EROFS images written by lazysnap, mounted by the kernel: the mounted tree equals the tree it was
written from, in edge cases and generated trees, file-backed and over loop devices, alone and as
overlayfs lowers. Every test unmounts what it mounted, also when it fails."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.erofs.layout import plan_layout
from snapshotter.erofs.mount import ErofsMountError, is_erofs_mountpoint, kernel_support, mount_erofs, unmount
from snapshotter.erofs.writer import build_metadata
from snapshotter.formats.index import Entry, EntryType, LayerIndex
from snapshotter.layertree import LayerTree
from tests.support.erofs import (
    MTIME_NS,
    Image,
    assert_fsck_accepts,
    contents_of,
    index_of,
    layer_indexes,
    mounted,
    require_kernel_erofs,
    tree_mismatches,
    write_image,
)
from tests.support.lazy import wait_until
from tests.support.mounts import mounts_under, unmount_all
from tests.support.services import require_privileges

GiB = 1 << 30


@pytest.fixture
def workdir() -> Iterator[Path]:
    require_privileges(binaries=())
    require_kernel_erofs()
    path = Path(tempfile.mkdtemp(prefix="lzerofs"))
    yield path
    assert unmount_all(path) == []
    subprocess.run(["rm", "-rf", str(path)], check=True)


def reg(name: str, size: int, **kw: object) -> Entry:
    mode = int(kw.pop("mode", 0o644))  # type: ignore[call-overload]
    return Entry(name, EntryType.REG, mode, size=size, mtime_ns=int(kw.pop("mtime_ns", MTIME_NS)), **kw)  # type: ignore[arg-type, call-overload]


def check_mounted(workdir: Path, index: LayerIndex, *, block_size: int = 4096, loop: bool = False) -> Image:
    image = write_image(workdir, index, contents_of, block_size=block_size)
    assert_fsck_accepts(image)
    with mounted(image, workdir / "mnt", loop=loop) as root:
        assert tree_mismatches(root, image.tree) == []
    return image


def varied(block_size: int) -> LayerIndex:
    return index_of(
        [
            Entry("bin", EntryType.DIR, 0o755, mtime_ns=MTIME_NS, xattrs={"user.dir": b"d"}),
            reg("bin/suid", 300_000, mode=0o4755),
            reg("bin/sgid", 7, mode=0o2711, uid=100_000, gid=70_000),
            reg("bin/later", 10, mtime_ns=MTIME_NS + 123_456_789),
            reg("bin/ancient", 10, mtime_ns=-86_400 * 10**9),
            reg("bin/empty", 0),
            Entry("bin/hard", EntryType.HARDLINK, 0, link_name="bin/suid"),
            Entry("bin/short", EntryType.SYMLINK, 0o777, link_name="suid", mtime_ns=MTIME_NS),
            Entry("bin/long", EntryType.SYMLINK, 0o777, link_name="y/" * 2000, mtime_ns=MTIME_NS),
            Entry("tmp", EntryType.DIR, 0o1777, mtime_ns=MTIME_NS),
            Entry("empty-dir", EntryType.DIR, 0o700, mtime_ns=MTIME_NS),
            Entry("dev", EntryType.DIR, 0o755, mtime_ns=MTIME_NS),
            Entry("dev/null", EntryType.CHAR, 0o666, dev_major=1, dev_minor=3, mtime_ns=MTIME_NS),
            Entry("dev/nvme", EntryType.BLOCK, 0o660, dev_major=259, dev_minor=70_000, mtime_ns=MTIME_NS),
            Entry("dev/fifo", EntryType.FIFO, 0o600, mtime_ns=MTIME_NS),
            reg("dev/.wh.gone", 0),
            Entry("opq", EntryType.DIR, 0o755, mtime_ns=MTIME_NS),
            reg("opq/.wh..wh..opq", 0),
            reg("opq/new", 3),
            reg(".prefetch.landmark", 1),
            reg("x/" + "n" * 255, 17),
            reg("x/ünïcødé-名前-😀", 33),
            reg(
                "x/attrs",
                5,
                xattrs={
                    **{f"user.k{i:03d}": os.urandom(i * 7) for i in range(100)},
                    "trusted.big": b"v" * 4000,
                    "security.selinux": b"system_u:object_r:bin_t:s0\0",
                    "trusted.overlay.redirect": b"/elsewhere",  # the layer's own: never shown
                },
            ),
            *(reg(f"shared/{i}", 1, xattrs={"user.common": b"same value"}) for i in range(50)),
        ],
        Entry("", EntryType.DIR, 0o755, mtime_ns=MTIME_NS),
    )


@pytest.mark.parametrize("block_size", [512, 1024, 2048, 4096])
def test_varied_tree(workdir: Path, block_size: int) -> None:
    image = check_mounted(workdir, varied(block_size), block_size=block_size)
    assert sorted(image.tree.root.children) == ["bin", "dev", "empty-dir", "opq", "shared", "tmp", "x"]


@pytest.mark.parametrize("block_size", [512, 4096])
def test_a_directory_of_5000_long_names(workdir: Path, block_size: int) -> None:
    names = [f"{i:05d}-" + "ĳ" * 100 + "x" * (i % 49) for i in range(5000)]  # up to 254 bytes each
    check_mounted(
        workdir, index_of([reg(f"big/{n}", i % 300) for i, n in enumerate(names)]), block_size=block_size
    )


def test_a_chain_3000_directories_deep(workdir: Path) -> None:
    chain = "/".join(["d"] * 3000)
    check_mounted(workdir, index_of([reg(f"{chain}/leaf", 5), Entry("top-empty", EntryType.DIR, 0o755)]))


def test_a_sparse_file_beyond_4gib(workdir: Path) -> None:
    size = 4 * GiB + 5000
    index = index_of([reg("huge", size), reg("after", 3)])
    tree = LayerTree(index)
    layout = plan_layout(tree)
    image = Image(workdir / "m", workdir / "b", tree, layout)
    image.meta.write_bytes(build_metadata(tree, layout))
    marks = {0: b"first", GiB - 2: b"across 1 GiB", 4 * GiB - 1: b"across 4 GiB", size - 4: b"last"}
    with open(image.blob, "wb") as blob:
        blob.truncate(layout.blob_size)  # sparse: a few marks, holes elsewhere
        for offset, data in marks.items():
            blob.seek(offset)
            blob.write(data)
        placed_after = layout.find(tree.lookup("after").entry)
        assert placed_after is not None
        blob.seek(placed_after.blob_offset)
        blob.write(b"end")
    assert_fsck_accepts(image)
    with mounted(image, workdir / "mnt") as root:
        assert os.stat(root / "huge").st_size == size
        with open(root / "huge", "rb") as huge:
            for offset, data in marks.items():
                assert os.pread(huge.fileno(), len(data), offset) == data
            assert os.pread(huge.fileno(), 10, size - 2) == b"st"  # short at the end
            assert os.pread(huge.fileno(), 4, 2 * GiB) == bytes(4)
        assert (root / "after").read_bytes() == b"end"


def test_over_loop_devices_which_detach_on_unmount(workdir: Path) -> None:
    require_kernel_erofs(loop=True)
    image = write_image(workdir, varied(4096), contents_of)
    target = workdir / "mnt"
    with mounted(image, target, loop=True) as root:
        assert mounts_under(root)[0].source.startswith("/dev/loop")
        assert attached_loops(image) == {image.meta, image.blob}
        assert tree_mismatches(root, image.tree) == []
    assert wait_until(lambda: not attached_loops(image), timeout=10)  # autoclear


def attached_loops(image: Image) -> set[Path]:
    """Which of the image's two files back a loop device now."""
    backing = set()
    for path in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(FileNotFoundError):  # detached meanwhile
            backing.add(Path(path.read_text().strip()))
    return backing & {image.meta, image.blob}


def test_overlayfs_over_two_erofs_lowers_honours_whiteouts_and_opaque_dirs(workdir: Path) -> None:
    low = write_image(
        workdir,
        index_of([reg("keep", 5), reg("gone", 5), reg("opq/old", 5), reg("dir/gone-too/f", 5)]),
        contents_of,
        name="low",
    )
    up = write_image(
        workdir,
        index_of(
            [reg(".wh.gone", 0), reg("dir/.wh.gone-too", 0), reg("opq/.wh..wh..opq", 0), reg("opq/new", 4)]
        ),
        contents_of,
        name="up",
    )
    merged = workdir / "merged"
    merged.mkdir()
    with mounted(low, workdir / "low") as low_root, mounted(up, workdir / "up") as up_root:
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={up_root}:{low_root}", str(merged)],
            check=True,
        )
        try:
            assert sorted(os.listdir(merged)) == ["dir", "keep", "opq"]
            assert os.listdir(merged / "dir") == []
            assert os.listdir(merged / "opq") == ["new"]
            assert (merged / "keep").read_bytes() == contents_of(low.tree.lookup("keep").entry)
        finally:
            subprocess.run(["umount", str(merged)], check=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=layer_indexes(), block_bits=st.integers(9, 12))
def test_generated_trees_mount_as_written(workdir: Path, index: LayerIndex, block_bits: int) -> None:
    check_mounted(workdir, index, block_size=1 << block_bits)


def test_a_broken_image_does_not_mount(workdir: Path) -> None:
    image = write_image(workdir, index_of([reg("f", 3)]), contents_of)
    broken = bytearray(image.meta.read_bytes())
    broken[1024:1028] = b"\0\0\0\0"  # the superblock magic
    image.meta.write_bytes(broken)
    target = workdir / "mnt"
    target.mkdir()
    with pytest.raises(ErofsMountError) as info:
        mount_erofs(image.meta, image.blob, target)
    assert info.value.errno == errno.EINVAL and str(image.meta) in str(info.value)
    assert not is_erofs_mountpoint(target)
    unmount(target)  # not mounted: nothing to do, no error


def test_kernel_support_is_probed_once(workdir: Path) -> None:
    ok, why = kernel_support()
    assert ok and "file-backed" in why
    assert kernel_support() is kernel_support()
    assert not [m for m in mounts_under(tempfile.gettempdir()) if "lazysnap-erofs-probe" in m.target]


def test_whiteouts_are_0_0_character_devices(workdir: Path) -> None:
    image = write_image(workdir, varied(4096), contents_of)
    with mounted(image, workdir / "mnt") as root:
        gone = os.lstat(root / "dev/gone")
        assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
        assert os.getxattr(root / "opq", "trusted.overlay.opaque") == b"y"
        assert "trusted.overlay.redirect" not in os.listxattr(root / "x/attrs")
