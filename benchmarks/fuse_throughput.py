"""Read throughput of a lazy layer through lazysnap's FUSE filesystem, against the same file on the
local disk, in one run. Needs root and /dev/fuse.

Three sequential reads of one large file, each after dropping the kernel page cache:
  local      the file on the local filesystem (the ceiling);
  fuse-cold  through FUSE, chunks fetched from an in-memory "registry" (decompress + verify);
  fuse-warm  through FUSE, every chunk already in lazysnap's chunk cache on disk.
Prints and writes JSON with MB/s and the ratios to local. ``make bench`` runs this (and the
metadata micro-benchmark) through ``benchmarks.micro``.

    sudo .venv/bin/python -m benchmarks.fuse_throughput --size-mib 256 --out /tmp/fuse-throughput.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.micro import machine, throughput


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {**throughput(args.size_mib, args.chunk_mib), "machine": machine()}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
