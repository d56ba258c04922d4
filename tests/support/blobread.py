"""A reader in a process of its own, for restart tests: ``python -m tests.support.blobread``.

Reads ``PATH`` (``pattern(LABEL)`` of ``SIZE`` bytes) over and over with O_DIRECT, so that every
read reaches the server, checking every byte. After each read it stores the number of bytes
checked so far in ``--progress`` (8 bytes, little-endian, rewritten in place). Exits 0 on SIGTERM,
1 at the first error or wrong byte (reported on stderr).
"""

from __future__ import annotations

import argparse
import mmap
import os
import signal
import sys

from tests.support.blobs import pattern


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("label")
    parser.add_argument("size", type=int)
    parser.add_argument("--progress", required=True)
    parser.add_argument("--chunk", type=int, default=256 * 1024)
    args = parser.parse_args()
    stopping = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    progress = os.open(args.progress, os.O_WRONLY | os.O_CREAT, 0o600)
    buf = mmap.mmap(-1, args.chunk)  # page-aligned, as O_DIRECT needs
    fd = os.open(args.path, os.O_RDONLY | os.O_DIRECT)
    checked = 0
    offset = 0
    while not stopping:
        try:
            n = os.preadv(fd, [buf], offset)
        except InterruptedError:
            continue
        except OSError as exc:
            print(f"read at {offset} failed: {exc}", file=sys.stderr, flush=True)
            return 1
        want = min(args.chunk, args.size - offset)
        if n != want or buf[:n] != pattern(args.label.encode(), offset, n):
            print(f"wrong bytes at {offset}: got {n}, expected {want}", file=sys.stderr, flush=True)
            return 1
        checked += n
        os.pwrite(progress, checked.to_bytes(8, "little"), 0)
        offset = 0 if offset + n >= args.size else offset + n
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
