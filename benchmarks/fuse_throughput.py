"""Read throughput of a lazy layer through lazysnap's FUSE filesystem, against the same file on the
local disk, in one run. Needs root and /dev/fuse.

Three sequential reads of one large file, each after dropping the kernel page cache:
  local      the file on the local filesystem (the ceiling);
  fuse-cold  through FUSE, chunks fetched from an in-memory "registry" (decompress + verify);
  fuse-warm  through FUSE, every chunk already in lazysnap's chunk cache on disk.
Prints and writes JSON with MB/s and the ratios to local.

    sudo .venv/bin/python -m benchmarks.fuse_throughput --size-mib 256 \
        --out benchmarks/results/fuse-throughput.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.harness import drop_page_cache
from snapshotter.cache import ChunkCache
from snapshotter.formats import build_estargz, locate_toc, parse_toc
from snapshotter.fuse.layerfs import LayerFS, LayerTree, MountedLayer
from snapshotter.reader import LayerReader, ReaderConfig
from tests.support.lazy import MemoryBlob


def timed_read(path: Path, block: int = 1 << 20) -> float:
    drop_page_cache()
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.read(block):
            pass
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    size = args.size_mib << 20

    work = Path(tempfile.mkdtemp(prefix="lzbench"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    layer: MountedLayer | None = None
    try:
        payload = os.urandom(size)
        local = work / "local.bin"
        local.write_bytes(payload)
        tar_buf = io.BytesIO()
        with tarfile.open(fileobj=tar_buf, mode="w") as tar:
            info = tarfile.TarInfo("model.bin")
            info.size = size
            tar.addfile(info, io.BytesIO(payload))
        built = build_estargz(tar_buf.getvalue(), chunk_size=args.chunk_mib << 20, compression_level=1)
        location = locate_toc(built.blob[-4096:], len(built.blob), built.annotations)
        raw = built.blob[location.offset : location.offset + location.length]
        index = parse_toc(raw, location, blob_size=len(built.blob), expected_digest=built.toc_digest)
        cache = ChunkCache(work / "cache", 4 * size)
        config = ReaderConfig(background=False, prefetch=False)

        async def make_reader() -> LayerReader:
            return LayerReader(index, MemoryBlob(built.blob), cache, loop, layer="bench", config=config)

        reader = asyncio.run_coroutine_threadsafe(make_reader(), loop).result()
        mountpoint = work / "mnt"
        mountpoint.mkdir()
        layer = MountedLayer(LayerFS(LayerTree(index), reader, layer="bench"), mountpoint)
        layer.start()
        results = {
            "local": timed_read(local),
            "fuse-cold": timed_read(mountpoint / "model.bin"),
            "fuse-warm": timed_read(mountpoint / "model.bin"),
        }
        assert (mountpoint / "model.bin").read_bytes() == payload
    finally:
        if layer is not None:
            layer.unmount()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        shutil.rmtree(work, ignore_errors=True)

    mbps = {k: round(size / v / 1e6, 1) for k, v in results.items()}
    report = {
        "size_bytes": size,
        "chunk_bytes": args.chunk_mib << 20,
        "seconds": {k: round(v, 3) for k, v in results.items()},
        "MB_per_s": mbps,
        "ratio_to_local": {k: round(mbps[k] / mbps["local"], 3) for k in mbps},
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
