"""The EROFS metadata writer against erofs-utils: fsck.erofs must accept every image, and dump.erofs
shows the inode forms and layouts the writer chose. No kernel mounts here (see test_mount.py)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.erofs.layout import BlobLayout, plan_layout
from snapshotter.erofs.writer import ImageError, build_metadata
from snapshotter.formats.index import Entry, EntryType, LayerIndex
from snapshotter.layertree import LayerTree
from tests.support.erofs import (
    MTIME_NS,
    Image,
    assert_fsck_accepts,
    contents_of,
    fsck_supports,
    index_of,
    layer_indexes,
    require_fsck,
    write_image,
)

GiB = 1 << 30


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    require_fsck()
    yield tmp_path


def dump(image: Image, path: str, *options: str) -> str:
    result = subprocess.run(
        ["dump.erofs", f"--device={image.blob}", *options, f"--path={path}", str(image.meta)],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def inode_form(image: Image, path: str) -> tuple[int, int, int]:
    """(inode size, data layout, xattr body size) as dump.erofs reads them."""
    out = dump(image, path)
    layout = re.search(r"Layout: (\d+)", out)
    sizes = re.search(r"Inode size: (\d+)\s+Extent size: \d+\s+Xattr size: (\d+)", out)
    assert layout and sizes, out
    return int(sizes[1]), int(layout[1]), int(sizes[2])


def varied_entries() -> list[Entry]:
    def reg(name: str, size: int, **kw: object) -> Entry:
        return Entry(
            name,
            EntryType.REG,
            int(kw.pop("mode", 0o644)),
            size=size,
            mtime_ns=int(kw.pop("mtime_ns", MTIME_NS)),
            **kw,
        )  # type: ignore[arg-type, call-overload]

    return [
        Entry("bin", EntryType.DIR, 0o755, mtime_ns=MTIME_NS),
        reg("bin/tool", 300_000, mode=0o4755),
        reg("bin/plain", 10),
        reg("bin/later", 10, mtime_ns=MTIME_NS + 1),
        reg("bin/wide", 10, uid=100_000, gid=70_000),
        reg("bin/empty", 0),
        Entry("bin/hard", EntryType.HARDLINK, 0, link_name="bin/tool"),
        Entry("bin/short", EntryType.SYMLINK, 0o777, link_name="tool", mtime_ns=MTIME_NS),
        Entry("bin/long", EntryType.SYMLINK, 0o777, link_name="x/" * 2000, mtime_ns=MTIME_NS),
        Entry("dev", EntryType.DIR, 0o755, mtime_ns=MTIME_NS),
        Entry("dev/null", EntryType.CHAR, 0o666, dev_major=1, dev_minor=3, mtime_ns=MTIME_NS),
        Entry("dev/big", EntryType.BLOCK, 0o660, dev_major=259, dev_minor=70_000, mtime_ns=MTIME_NS),
        Entry("dev/fifo", EntryType.FIFO, 0o600, mtime_ns=MTIME_NS),
        reg("dev/.wh.gone", 0),
        *(Entry(f"o{i}", EntryType.DIR, 0o755, mtime_ns=MTIME_NS) for i in range(3)),
        *(reg(f"o{i}/.wh..wh..opq", 0) for i in range(3)),
        reg("x/attrs", 5, xattrs={"user.a": b"1", "trusted.big": b"v" * 3000, "security.selinux": b"s0\0"}),
        *(reg(f"many/{i:05d}-" + "é" * 60, i % 50) for i in range(800)),
    ]


@pytest.mark.parametrize("block_size", [512, 1024, 2048, 4096])
def test_varied_tree_passes_fsck_and_is_deterministic(workdir: Path, block_size: int) -> None:
    index = index_of(varied_entries(), Entry("", EntryType.DIR, 0o755, mtime_ns=MTIME_NS))
    image = write_image(workdir, index, contents_of, block_size=block_size)
    assert_fsck_accepts(image)  # with fsck.erofs 1.5, 4 KiB blocks only; test_mount.py mounts all
    tree = LayerTree(index)
    assert build_metadata(tree, plan_layout(tree, block_size=block_size)) == image.meta.read_bytes()


def test_inode_forms_and_layouts(workdir: Path) -> None:
    index = index_of(varied_entries(), Entry("", EntryType.DIR, 0o755, mtime_ns=MTIME_NS))
    image = write_image(workdir, index, contents_of)
    compact, extended = 32, 64
    flat_plain, flat_inline, chunk_based = 0, 2, 4
    assert inode_form(image, "/bin/plain") == (compact, chunk_based, 0)  # mtime is the epoch
    assert inode_form(image, "/bin/later")[0] == extended  # its own mtime
    assert inode_form(image, "/bin/wide")[0] == extended  # ids beyond 16 bits
    assert inode_form(image, "/bin/hard") == inode_form(image, "/bin/tool")
    assert inode_form(image, "/bin/empty") == (compact, flat_plain, 0)
    assert inode_form(image, "/bin/short")[1] == flat_inline
    assert inode_form(image, "/bin/long")[1] == flat_plain  # 4000 bytes do not fit beside an inode
    assert inode_form(image, "/bin")[1] == flat_inline
    assert inode_form(image, "/many")[1] == flat_plain  # many blocks of entries
    # The opaque marker three directories carry is shared: a 12-byte header plus one 4-byte id.
    assert inode_form(image, "/o1") == (compact, flat_inline, 16)
    assert "1 extents found" in dump(image, "/bin/tool", "-e")  # one chunk for the whole file


def test_sparse_file_beyond_4gib_takes_an_extended_inode_and_1gib_chunks(workdir: Path) -> None:
    size = 5 * GiB + 123
    index = index_of(
        [Entry("huge", EntryType.REG, 0o644, size=size), Entry("after", EntryType.REG, 0o644, size=3)]
    )
    tree = LayerTree(index)
    layout = plan_layout(tree)
    image = Image(workdir / "m", workdir / "b", tree, layout)
    image.meta.write_bytes(build_metadata(tree, layout))
    with open(image.blob, "wb") as blob:
        blob.truncate(layout.blob_size)  # sparse: fsck without --extract reads no file data
    assert_fsck_accepts(image)
    assert inode_form(image, "/huge")[0] == 64
    assert "6 extents found" in dump(image, "/huge", "-e")
    assert layout.find(tree.lookup("after").entry).blob_offset == 5 * GiB + 4096  # type: ignore[union-attr]


def _write(entries: list[Entry]) -> bytes:
    tree = LayerTree(index_of(entries))
    return build_metadata(tree, plan_layout(tree))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (Entry("n" * 256, EntryType.REG, 0o644), "not a valid directory entry name"),
        (Entry("nul\0name", EntryType.REG, 0o644), "not a valid directory entry name"),
        (Entry("l", EntryType.SYMLINK, 0o777, link_name="x" * 4096), "symlink target"),
        (Entry("u", EntryType.REG, 0o644, uid=1 << 32), "beyond 32 bits"),
        (Entry("d", EntryType.CHAR, 0o644, dev_major=4096), "out of range"),
    ],
)
def test_what_the_format_cannot_hold_is_an_image_error(entry: Entry, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        _write([entry])


def test_a_layout_that_misses_a_file_is_an_image_error() -> None:
    tree = LayerTree(index_of([Entry("f", EntryType.REG, 0o644, size=10)]))
    with pytest.raises(ImageError, match="does not place"):
        build_metadata(tree, BlobLayout([], blob_size=0, block_size=4096))


def test_unnameable_xattrs_are_left_out(workdir: Path) -> None:
    entry = Entry("f", EntryType.REG, 0o644, xattrs={"system.nfs4_acl": b"x", "user.": b"x", "user.ok": b"1"})
    image = write_image(workdir, index_of([entry]), contents_of)
    assert_fsck_accepts(image)
    assert inode_form(image, "/f")[2] == 12 + 8  # the header and one entry: 4 + "ok" + "1", padded


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=layer_indexes(), block_bits=st.sampled_from([12, 12, 9, 10, 11]))
def test_generated_trees_pass_fsck(workdir: Path, index: LayerIndex, block_bits: int) -> None:
    block_size = 1 << block_bits
    if block_size != 4096 and not fsck_supports(block_size):
        block_size = 4096
    image = write_image(workdir, index, contents_of, block_size=block_size)
    assert_fsck_accepts(image)
