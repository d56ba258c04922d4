"""A lazy layer built from a tar, parsed, and mounted with the real chunk reader over FUSE: every
file's bytes, mode, owner, times, xattrs and link targets must equal the source tar's."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from snapshotter.cache import ChunkCache
from snapshotter.formats import build_estargz, build_zstdchunked, locate_toc, parse_toc
from snapshotter.formats.index import Compression
from snapshotter.fuse.layerfs import LayerFS, LayerTree, MountedLayer
from snapshotter.reader import LayerReader, ReaderConfig
from tests.support.lazy import MemoryBlob

pytestmark = pytest.mark.usefixtures("privileged")
MTIME = 1_650_000_000


def source_tar() -> bytes:
    """Files of several sizes, a 2.5 MiB file over many chunks, links, a device, a fifo, xattrs,
    setuid bits and odd owners."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, data: bytes = b"", **attrs: object) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mtime = MTIME
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
        add("usr/lib", tarfile.DIRTYPE, pax_headers={"SCHILY.xattr.user.purpose": "libraries"})
        add(
            "usr/lib/data",
            tarfile.REGTYPE,
            bytes(range(256)) * 2000,
            pax_headers={"SCHILY.xattr.user.k": "v"},
        )
        add("dev", tarfile.DIRTYPE)
        add("dev/tty0", tarfile.CHRTYPE, devmajor=4, devminor=0, mode=0o620)
        add("dev/pipe", tarfile.FIFOTYPE)
    return buf.getvalue()


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD], ids=["estargz", "zstdchunked"])
def test_mounted_layer_equals_its_source_tar(
    workdir: Path, loop: asyncio.AbstractEventLoop, compression: Compression
) -> None:
    tar_bytes = source_tar()
    build = build_estargz if compression == Compression.GZIP else build_zstdchunked
    built = build(tar_bytes, chunk_size=256 << 10)
    size = len(built.blob)
    location = locate_toc(built.blob[-4096:], size, built.annotations)
    raw = built.blob[location.offset : location.offset + location.length]
    index = parse_toc(raw, location, blob_size=size, expected_digest=built.toc_digest)

    async def make_reader() -> LayerReader:
        config = ReaderConfig(background=False, prefetch=False)
        return LayerReader(index, MemoryBlob(built.blob), ChunkCache(workdir / "cache", 1 << 30), loop,
                           layer=built.digest, config=config)  # fmt: skip

    reader = asyncio.run_coroutine_threadsafe(make_reader(), loop).result(5)
    mountpoint = workdir / "mnt"
    mountpoint.mkdir()
    layer = MountedLayer(LayerFS(LayerTree(index), reader, layer=built.digest), mountpoint)
    layer.start()
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            members = tar.getmembers()
            seen = set()
            for m in members:
                path = mountpoint / m.name
                st = os.lstat(path)
                seen.add(m.name)
                if not m.islnk():  # a hardlink has its target's inode, so its target's attributes
                    assert stat.S_IMODE(st.st_mode) == m.mode, m.name
                    assert (st.st_uid, st.st_gid) == (m.uid, m.gid), m.name
                    assert st.st_mtime == MTIME, m.name
                for key, value in m.pax_headers.items():
                    if key.startswith("SCHILY.xattr."):
                        assert os.getxattr(
                            path, key.removeprefix("SCHILY.xattr."), follow_symlinks=False
                        ) == (value.encode())
                if m.isreg():
                    extracted = tar.extractfile(m)
                    assert extracted is not None
                    assert path.read_bytes() == extracted.read(), m.name
                elif m.islnk():
                    assert os.lstat(path).st_ino == os.lstat(mountpoint / m.linkname).st_ino
                    assert st.st_nlink == 2
                elif m.issym():
                    assert os.readlink(path) == m.linkname
                elif m.isdir():
                    assert stat.S_ISDIR(st.st_mode)
                elif m.ischr():
                    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == m.devmajor
                elif m.isfifo():
                    assert stat.S_ISFIFO(st.st_mode)
        walked = {
            str(Path(d, n).relative_to(mountpoint))
            for d, dirs, files in os.walk(mountpoint)
            for n in dirs + files
        }
        assert walked == seen  # nothing missing, nothing extra (landmarks hidden)
    finally:
        layer.unmount()
