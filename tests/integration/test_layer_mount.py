"""A lazy layer built from a tar, parsed, and mounted by each backend with the real chunk reader:
every file's bytes, mode, owner, times, xattrs, links, devices, whiteouts and opaque directories
must equal the source tar's.

- fuse: the per-file FUSE file system reads through the chunk reader on every miss;
- erofs: the EROFS metadata image written from the index, mounted by the kernel with a data blob
  whose bytes the same chunk reader produced (a local file here; a FUSE-served one in production).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.cache import ChunkCache
from snapshotter.erofs.layout import BlobLayout, plan_layout
from snapshotter.erofs.writer import build_metadata
from snapshotter.formats import build_estargz, build_zstdchunked, locate_toc, parse_toc
from snapshotter.formats.index import Compression, LayerIndex
from snapshotter.fuse.layerfs import LayerFS, MountedLayer
from snapshotter.layertree import LayerTree
from snapshotter.reader import LayerReader, ReaderConfig
from snapshotter.scheduler import FetchScheduler, RestPolicy, SchedulerConfig
from tests.support.erofs import Image, assert_fsck_accepts, mounted, write_blob
from tests.support.layercheck import tar_mismatches
from tests.support.lazy import MemoryBlob

pytestmark = pytest.mark.usefixtures("privileged")
MTIME = 1_650_000_000
# struct vfs_cap_data, revision 2, effective, CAP_NET_BIND_SERVICE permitted (the kernel checks it)
NET_BIND_SERVICE = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0).decode("utf-8", "surrogateescape")


def source_tar() -> bytes:
    """Files of several sizes, a 2.5 MiB file over many chunks, links, devices, a fifo, xattrs,
    setuid/setgid/sticky bits, owners beyond 16 bits, a whiteout and an opaque directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, data: bytes = b"", **attrs: object) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mtime = int(attrs.pop("mtime", MTIME))  # type: ignore[call-overload]
            info.mode = int(attrs.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644))  # type: ignore[call-overload]
            for key, value in attrs.items():
                setattr(info, key, value)
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("usr", tarfile.DIRTYPE)
        add("usr/bin", tarfile.DIRTYPE, mode=0o750, uid=2, gid=3)
        add("usr/bin/tool", tarfile.REGTYPE, os.urandom(2_600_000), mode=0o4755)
        add("usr/bin/empty", tarfile.REGTYPE, b"")
        add("usr/bin/small", tarfile.REGTYPE, b"tiny\n", uid=1000, gid=1000, mode=0o600)
        add("usr/bin/hard", tarfile.LNKTYPE, linkname="usr/bin/small")
        add("usr/bin/soft", tarfile.SYMTYPE, linkname="tool", mode=0o777)
        add("usr/bin/wide", tarfile.REGTYPE, b"owned far away\n", uid=100_000, gid=70_000, mode=0o2755)
        add("usr/bin/old", tarfile.REGTYPE, b"older\n", mtime=MTIME - 86_400 * 365)
        add("usr/lib", tarfile.DIRTYPE, pax_headers={"SCHILY.xattr.user.purpose": "libraries"})
        add(
            "usr/lib/data",
            tarfile.REGTYPE,
            bytes(range(256)) * 2000,
            pax_headers={"SCHILY.xattr.user.k": "v", "SCHILY.xattr.security.capability": NET_BIND_SERVICE},
        )
        add("tmp", tarfile.DIRTYPE, mode=0o1777)
        add("dev", tarfile.DIRTYPE)
        add("dev/tty0", tarfile.CHRTYPE, devmajor=4, devminor=0, mode=0o620)
        add("dev/sda1", tarfile.BLKTYPE, devmajor=8, devminor=1, mode=0o660)
        add("dev/pipe", tarfile.FIFOTYPE)
        add("etc", tarfile.DIRTYPE)
        add("etc/.wh.removed", tarfile.REGTYPE)
        add("var", tarfile.DIRTYPE)
        add("var/.wh..wh..opq", tarfile.REGTYPE)
        add("var/fresh", tarfile.REGTYPE, b"only this\n")
    return buf.getvalue()


@contextlib.contextmanager
def _mount_fuse(index: LayerIndex, reader: LayerReader, mountpoint: Path, layer: str) -> Iterator[None]:
    fuse = MountedLayer(LayerFS(LayerTree(index), reader, layer=layer), mountpoint)
    fuse.start()
    try:
        yield
    finally:
        fuse.unmount()


@contextlib.contextmanager
def _mount_erofs(index: LayerIndex, reader: LayerReader, mountpoint: Path, workdir: Path) -> Iterator[None]:
    tree = LayerTree(index)
    layout = plan_layout(tree, index.prefetch)
    image = Image(workdir / "layer.erofs", workdir / "layer.blob", tree, layout)
    image.meta.write_bytes(build_metadata(tree, layout))
    write_blob(image.blob, layout, lambda entry: reader.read(entry, 0, entry.size))
    assert_fsck_accepts(image)
    with mounted(image, mountpoint):
        yield


@pytest.mark.parametrize("backend", ["fuse", "erofs"])
@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD], ids=["estargz", "zstdchunked"])
def test_mounted_layer_equals_its_source_tar(
    workdir: Path, loop: asyncio.AbstractEventLoop, compression: Compression, backend: str
) -> None:
    tar_bytes = source_tar()
    build = build_estargz if compression == Compression.GZIP else build_zstdchunked
    built = build(tar_bytes, chunk_size=256 << 10, prioritized_files=["usr/bin/small", "usr/lib/data"])
    size = len(built.blob)
    location = locate_toc(built.blob[-4096:], size, built.annotations)
    raw = built.blob[location.offset : location.offset + location.length]
    index = parse_toc(raw, location, blob_size=size, expected_digest=built.toc_digest)

    async def make_reader() -> LayerReader:
        config = ReaderConfig(prefetch=False)
        scheduler = FetchScheduler(loop, SchedulerConfig(rest=RestPolicy.OFF))
        return LayerReader(index, MemoryBlob(built.blob), ChunkCache(workdir / "cache", 1 << 30), loop,
                           layer=built.digest, scheduler=scheduler, config=config)  # fmt: skip

    reader = asyncio.run_coroutine_threadsafe(make_reader(), loop).result(5)
    mountpoint = workdir / "mnt"
    mountpoint.mkdir()
    if backend == "fuse":
        mounting = _mount_fuse(index, reader, mountpoint, built.digest)
    else:
        mounting = _mount_erofs(index, reader, mountpoint, workdir)
    with mounting:
        assert tar_mismatches(mountpoint, tar_bytes) == []


def test_a_plain_tar_stream_as_the_blob(workdir: Path) -> None:
    """A plain layer's blob can be its uncompressed tar stream: file data starts on 512-byte
    boundaries there, so the image uses 512-byte blocks and its chunks point into the tar."""
    tar_bytes = source_tar()
    built = build_estargz(tar_bytes)  # for its index only: what the formats parse into
    location = locate_toc(built.blob[-4096:], len(built.blob), built.annotations)
    raw = built.blob[location.offset : location.offset + location.length]
    tree = LayerTree(parse_toc(raw, location, blob_size=len(built.blob), expected_digest=built.toc_digest))
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        data_at = {m.name: m.offset_data for m in tar.getmembers() if m.isreg()}
    files = {node for node in tree.by_name.values() if node.is_file}
    layout = BlobLayout.from_offsets(
        [(node.entry, data_at[node.entry.name]) for node in files], blob_size=len(tar_bytes), block_size=512
    )
    image = Image(workdir / "layer.erofs", workdir / "layer.tar", tree, layout)
    image.meta.write_bytes(build_metadata(tree, layout))
    image.blob.write_bytes(tar_bytes)
    assert_fsck_accepts(image)
    with mounted(image, workdir / "mnt") as root:
        assert tar_mismatches(root, tar_bytes) == []
