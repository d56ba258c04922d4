"""Throughput and request rate of the blob server (``snapshotter.fuse.blobserver``), in one run.
Needs root and /dev/fuse.

  sequential  one blob of ``--size-mib`` read start to end in 1 MiB reads: from a local file
              (ext4, its pages dropped first, then again from the page cache) and through the
              blob server with an in-memory source (pages dropped first: every byte crosses FUSE;
              then again: the page cache the server keeps with FOPEN_KEEP_CACHE).
  random      4 KiB O_DIRECT reads at random aligned offsets (every read is one request to the
              server), one thread and ``--threads`` threads, against the same reads of the local
              file (which go to the disk).

Page caches are dropped per file (POSIX_FADV_DONTNEED), not machine-wide. Prints JSON.

    sudo .venv/bin/python -m benchmarks.blob_server --size-mib 512
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapshotter.fuse.blobserver import BlobServer
from tests.support.scratch import make_tmpdir, remove_tmpdir

MiB = 1 << 20


class MemorySource:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.view = memoryview(data)

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, size: int) -> memoryview:
        return self.view[offset : offset + size]  # no copy: writev takes any buffer


class CachedMemorySource(MemorySource):
    """Answers in the thread that read the request, as a chunk reader does for cache hits."""

    def read_cached(self, offset: int, size: int) -> memoryview:
        return self.view[offset : offset + size]


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential(path: Path, size: int) -> float:
    """MB/s of reading ``path`` whole in 1 MiB reads."""
    buf = bytearray(MiB)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        total = 0
        while n := fh.readinto(buf):
            total += n
    elapsed = time.perf_counter() - start
    assert total == size
    return size / elapsed / 1e6


def random_reads(path: Path, size: int, threads: int, seconds: float) -> float:
    """4 KiB O_DIRECT reads per second at random aligned offsets, ``threads`` at once."""
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def run(i: int) -> None:
        rng = random.Random(i)
        buf = mmap.mmap(-1, 4096)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            blocks = size // 4096
            while time.perf_counter() < deadline:
                os.preadv(fd, [buf], rng.randrange(blocks) * 4096)
                counts[i] += 1
        finally:
            os.close(fd)
            buf.close()

    start = time.perf_counter()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


def best(runs: int, measure: Callable[[], float]) -> float:
    return round(max(measure() for _ in range(runs)), 1)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--readers", type=int, default=1, help="threads reading /dev/fuse")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--cached", action="store_true", help="the source answers inline (read_cached)")
    args = parser.parse_args()
    size = args.size_mib * MiB
    data = os.urandom(size)
    workdir = make_tmpdir("lzbb")
    local = workdir / "local"
    local.write_bytes(data)
    os.sync()
    name = "sha256-" + hashlib.sha256(data[:MiB]).hexdigest()
    server = BlobServer(
        workdir / "mnt", state_path=workdir / "state.json", readers=args.readers, workers=args.workers
    )
    report: dict[str, Any] = {
        "size_mib": args.size_mib,
        "readers": args.readers,
        "workers": args.workers,
        "read_cached": args.cached,
    }
    try:
        server.start({name: CachedMemorySource(data) if args.cached else MemorySource(data)})
        blob = server.path(name)

        def cold(path: Path) -> Callable[[], float]:
            def measure() -> float:
                drop(path)
                return sequential(path, size)

            return measure

        report["sequential_mb_s"] = {
            "local_cold": best(args.runs, cold(local)),
            "local_cached": best(args.runs, lambda: sequential(local, size)),
            "blob_cold": best(args.runs, cold(blob)),
            "blob_cached": best(args.runs, lambda: sequential(blob, size)),
        }
        report["random_4k_per_s"] = {
            "local_1_thread": round(random_reads(local, size, 1, args.seconds)),
            "blob_1_thread": round(random_reads(blob, size, 1, args.seconds)),
            f"local_{args.threads}_threads": round(random_reads(local, size, args.threads, args.seconds)),
            f"blob_{args.threads}_threads": round(random_reads(blob, size, args.threads, args.seconds)),
        }
        report["server"] = server.stats()
    finally:
        server.stop()
        remove_tmpdir(workdir)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
