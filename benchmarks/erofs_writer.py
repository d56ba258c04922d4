"""How fast lazysnap writes a layer's EROFS metadata image, and how fast a blob range is located.

A synthetic layer of N small files (default 20,000) in 200 directories, mtimes spread over a
week, one file in ten with an xattr: times the presentation tree, the blob layout, the metadata
writer (best of 3, and its peak Python memory), and ``BlobLayout.locate`` for 128 KiB reads (the
size the kernel asks a FUSE blob server for). No root needed; prints JSON.

    .venv/bin/python -m benchmarks.erofs_writer --files 20000
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc

from snapshotter.erofs.layout import plan_layout
from snapshotter.erofs.writer import build_metadata
from snapshotter.formats.index import Compression, Entry, EntryType, LayerIndex
from snapshotter.layertree import LayerTree

BASE_NS = 1_700_000_000 * 10**9
READ_SIZE = 128 << 10


def synthetic_index(files: int, directories: int = 200) -> LayerIndex:
    entries = {"": Entry("", EntryType.DIR, 0o755, mtime_ns=BASE_NS)}
    for d in range(directories):
        name = f"usr/lib/python3/dir{d:03d}"
        entries[name] = Entry(name, EntryType.DIR, 0o755, mtime_ns=BASE_NS)
    for i in range(files):
        name = f"usr/lib/python3/dir{i % directories:03d}/module_{i:06d}.py"
        xattrs = {"user.origin": b"pkg"} if i % 10 == 0 else {}
        mtime = BASE_NS + (i % 7) * 86_400 * 10**9
        entries[name] = Entry(
            name, EntryType.REG, 0o644, size=200 + (i * 37) % 4000, mtime_ns=mtime, xattrs=xattrs
        )
    return LayerIndex("estargz", Compression.GZIP, entries)


def run(files: int) -> dict[str, object]:
    index = synthetic_index(files)
    started = time.perf_counter()
    tree = LayerTree(index)
    tree_s = time.perf_counter() - started
    started = time.perf_counter()
    layout = plan_layout(tree)
    layout_s = time.perf_counter() - started
    write_s = []
    for _ in range(3):
        started = time.perf_counter()
        image = build_metadata(tree, layout)
        write_s.append(time.perf_counter() - started)
    tracemalloc.start()
    build_metadata(tree, layout)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    reads = 10_000
    started = time.perf_counter()
    pieces = 0
    for k in range(reads):
        pieces += len(layout.locate((k * 7919 * 4096) % layout.blob_size, READ_SIZE))
    locate_s = time.perf_counter() - started
    return {
        "python": platform.python_version(),
        "files": files,
        "image_bytes": len(image),
        "blob_bytes": layout.blob_size,
        "tree_seconds": round(tree_s, 4),
        "layout_seconds": round(layout_s, 4),
        "write_seconds_best_of_3": round(min(write_s), 4),
        "write_peak_python_mb": round(peak / 1e6, 1),
        "locate_128k_microseconds": round(locate_s / reads * 1e6, 1),
        "pieces_per_128k_read": round(pieces / reads, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20_000)
    print(json.dumps(run(parser.parse_args().files), indent=2))


if __name__ == "__main__":
    main()
