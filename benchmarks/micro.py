"""Micro-benchmarks of a lazy layer. Needs root.

* metadata: ``stat``, ``open``+``close`` and small reads of many small files (default 10,000)
  in a lazily mounted eStargz layer whose chunks are all in lazysnap's chunk cache, against the
  same tree on the local disk and on a read-only overlayfs over it; the kernel's dentry and
  inode caches (and page cache) are dropped before each pass, so every lookup reaches the
  filesystem; one more ``stat`` pass with them warm. Reported in operations per second.
* throughput: sequential reads of one large file, each after dropping the page cache: local
  file; through FUSE with chunks fetched from an in-memory "registry" (decompress + verify);
  through FUSE with every chunk in the chunk cache. MB/s and the ratios to local.
* walk (``benchmarks.walk``): ``find | sort | xargs cat`` over 5,000 files of 0.2-4 KiB, page
  cache dropped, through containerd's overlayfs, a lazysnap daemon with every chunk cached (its
  ``[fs] backend`` set with ``--fs-backend``) and the stargz peer (``--stargz``); seconds and
  the ratio to overlayfs, plus stat and open+close per second on the same mounts.

The first two run in-process on lazysnap's FUSE file system classes (no containerd, no
registry, no daemon: no backend choice); the walk drives containerd, a registry and daemons.

    sudo .venv/bin/python -m benchmarks.micro --out /tmp/micro.json [--fs-backend erofs] [--stargz]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks import stargz_peer, walk
from benchmarks.harness import Mode, drop_page_cache
from benchmarks.images import pseudo_random_blocks
from snapshotter.cache import ChunkCache
from snapshotter.formats import build_estargz, locate_toc, parse_toc
from snapshotter.fuse.layerfs import LayerFS, MountedLayer
from snapshotter.layertree import LayerTree
from snapshotter.reader import LayerReader, ReaderConfig
from snapshotter.scheduler import FetchScheduler, RestPolicy, SchedulerConfig
from tests.support.lazy import MemoryBlob, running_loop
from tests.support.scratch import make_tmpdir, remove_tmpdir

METADATA_OPS = ("stat", "stat (warm dcache)", "open+close", "open+read+close")


@contextlib.contextmanager
def lazy_mount(tar: bytes, workdir: Path, chunk_size: int) -> Iterator[Path]:
    """Mount the eStargz conversion of ``tar`` through lazysnap's FUSE filesystem, served from
    memory (no prefetch, no background fetch); yields the mountpoint."""
    built = build_estargz(tar, chunk_size=chunk_size, compression_level=1)
    location = locate_toc(built.blob[-4096:], len(built.blob), built.annotations)
    raw = built.blob[location.offset : location.offset + location.length]
    index = parse_toc(raw, location, blob_size=len(built.blob), expected_digest=built.toc_digest)
    cache = ChunkCache(workdir / "cache", 4 * len(built.blob) + (64 << 20))
    config = ReaderConfig(prefetch=False)
    with running_loop() as loop:

        async def make_reader() -> LayerReader:
            scheduler = FetchScheduler(loop, SchedulerConfig(rest=RestPolicy.OFF))
            return LayerReader(
                index, MemoryBlob(built.blob), cache, loop, layer="bench", scheduler=scheduler, config=config
            )

        reader = asyncio.run_coroutine_threadsafe(make_reader(), loop).result()
        mountpoint = workdir / "fuse"
        mountpoint.mkdir()
        layer = MountedLayer(LayerFS(LayerTree(index), reader, layer="bench"), mountpoint)
        layer.start()
        try:
            yield mountpoint
        finally:
            layer.unmount()


def _timed(fn: Callable[[], None], drop: bool = True) -> float:
    if drop:
        drop_page_cache()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def timed_read(path: Path, block: int = 1 << 20) -> float:
    def read() -> None:
        with open(path, "rb", buffering=0) as fh:
            while fh.read(block):
                pass

    return _timed(read)


def throughput(size_mib: int = 256, chunk_mib: int = 4) -> dict[str, Any]:
    size = size_mib << 20
    work = make_tmpdir("lzmt")
    try:
        payload = b"".join(pseudo_random_blocks(size, b"fuse-throughput"))
        local = work / "local.bin"
        local.write_bytes(payload)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("model.bin")
            info.size = size
            tar.addfile(info, io.BytesIO(payload))
        with lazy_mount(buf.getvalue(), work, chunk_mib << 20) as mnt:
            seconds = {
                "local": timed_read(local),
                "fuse-cold": timed_read(mnt / "model.bin"),
                "fuse-warm": timed_read(mnt / "model.bin"),
            }
            if (mnt / "model.bin").read_bytes() != payload:
                raise RuntimeError("FUSE read returned different bytes")
    finally:
        remove_tmpdir(work)
    mbps = {k: round(size / v / 1e6, 1) for k, v in seconds.items()}
    return {
        "size_bytes": size,
        "chunk_bytes": chunk_mib << 20,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "MB_per_s": mbps,
        "ratio_to_local": {k: round(mbps[k] / mbps["local"], 3) for k in mbps},
    }


def _small_tree(files: int, dirs: int, file_bytes: int) -> tuple[bytes, list[str]]:
    buf = io.BytesIO()
    names: list[str] = []
    data = next(pseudo_random_blocks(file_bytes, b"small"))
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        per_dir = -(-files // dirs)
        for d in range(dirs):
            info = tarfile.TarInfo(f"d{d:04d}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
            for f in range(min(per_dir, files - d * per_dir)):
                name = f"d{d:04d}/f{f:05d}"
                info = tarfile.TarInfo(name)
                info.size = file_bytes
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
                names.append(name)
    return buf.getvalue(), names


def _passes(root: Path, names: list[str]) -> dict[str, float]:
    paths = [str(root / n) for n in names]

    def stat_all() -> None:
        for p in paths:
            os.stat(p)

    def open_all() -> None:
        for p in paths:
            os.close(os.open(p, os.O_RDONLY))

    def read_all() -> None:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            os.read(fd, 65536)
            os.close(fd)

    seconds = {"stat": _timed(stat_all)}
    seconds["stat (warm dcache)"] = _timed(stat_all, drop=False)
    seconds["open+close"] = _timed(open_all)
    seconds["open+read+close"] = _timed(read_all)
    return {op: round(len(paths) / s) for op, s in seconds.items()}


def metadata(files: int = 10_000, dirs: int = 100, file_bytes: int = 512) -> dict[str, Any]:
    work = make_tmpdir("lzmm")
    overlay: Path | None = None
    try:
        tar, names = _small_tree(files, dirs, file_bytes)
        native = work / "native"
        native.mkdir()
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            tf.extractall(native, filter="fully_trusted")
        empty = work / "empty"
        empty.mkdir()
        overlay = work / "ovl"
        overlay.mkdir()
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={native}:{empty}", str(overlay)],
            check=True,
            capture_output=True,
        )
        results = {"native": _passes(native, names), "overlayfs": _passes(overlay, names)}
        with lazy_mount(tar, work, 4 << 20) as mnt:
            for n in names:  # every chunk into the chunk cache
                (mnt / n).read_bytes()
            results["lazysnap FUSE"] = _passes(mnt, names)
    finally:
        if overlay is not None:
            subprocess.run(["umount", str(overlay)], check=False, capture_output=True)
        remove_tmpdir(work)
    return {
        "files": len(names),
        "dirs": dirs,
        "file_bytes": file_bytes,
        "ops": list(METADATA_OPS),
        "ops_per_s": results,
        "ratio_to_native": {
            fs: {op: round(v / results["native"][op], 3) for op, v in ops.items()}
            for fs, ops in results.items()
        },
    }


def machine() -> dict[str, object]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


def run_all(
    files: int = 10_000,
    size_mib: int = 256,
    *,
    walk_files: int = 5_000,
    backend: str | None = None,
    stargz: Mode | None = None,
) -> dict[str, Any]:
    """Every micro-benchmark; the walk with ``walk_files`` files (0: none) through lazysnap with
    ``[fs] backend = backend`` (unset if None) and, if given, the ``stargz`` peer mode."""
    data: dict[str, Any] = {"metadata": metadata(files), "throughput": throughput(size_mib)}
    if walk_files:
        data["walk"] = walk.run(walk_files, backend=backend, stargz=stargz, passes=_walk_passes)
    return {**data, "machine": machine()}


def _walk_passes(root: Path, names: list[str]) -> dict[str, float]:
    ops = _passes(root, names)
    return {op: ops[op] for op in ("stat", "open+close")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=10_000, help="small files for the metadata test")
    parser.add_argument("--size-mib", type=int, default=256, help="file size for the throughput test")
    parser.add_argument("--walk-files", type=int, default=5_000, help="files in the walk (0: skip it)")
    parser.add_argument("--fs-backend", metavar="NAME", help="lazysnap's [fs] backend in the walk")
    parser.add_argument("--stargz", action="store_true", help="build the stargz peer, walk through it too")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    peer = stargz_peer.mode(stargz_peer.build()) if args.stargz else None
    report = run_all(
        args.files, args.size_mib, walk_files=args.walk_files, backend=args.fs_backend, stargz=peer
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
