"""A blob server in a process of its own, for restart tests: ``python -m tests.support.blobserve``.

Serves pattern blobs (``--blob LABEL:SIZE``, content ``pattern(LABEL)``) at ``--mountpoint``, the
fd kept by the holder at ``--holder`` or, with ``--fdstore``, by systemd's fd store protocol.
Writes ``--ready FILE`` (``pid mounted|resumed``) once serving. SIGTERM: stop with handover (the
mount stays for a successor); SIGUSR1: stop and unmount. Either way ``--stats FILE`` gets the
server's counters as JSON. ``--stall-at OFFSET`` makes the read covering that offset of the first
blob hang after writing ``--stalled FILE`` (to kill the process while the kernel waits for an
answer); ``--delay`` slows every read down. ``--stop-timeout`` bounds how long a stop waits for
reads under way; with ``--fail-stalled-after-stop`` the stalled read fails once the stop has given
up on it (as a closing chunk reader makes it fail), and the process exits after that failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from snapshotter.fuse.blobserver import BlobServer
from snapshotter.fuse.fdstore import SystemdFdStore
from snapshotter.fuse.holder import HolderClient
from tests.support.blobs import PatternSource, blob_name


class _Slow(PatternSource):
    def __init__(self, salt: bytes, size: int, delay: float) -> None:
        super().__init__(salt, size)
        self.delay = delay

    def read(self, offset: int, size: int) -> bytes:
        if self.delay:
            time.sleep(self.delay)
        return super().read(offset, size)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mountpoint", required=True, type=Path)
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--holder", type=Path)
    parser.add_argument("--fdstore", action="store_true")
    parser.add_argument("--blob", action="append", default=[], help="LABEL:SIZE")
    parser.add_argument("--ready", required=True, type=Path)
    parser.add_argument("--stats", required=True, type=Path)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--stall-at", type=int, default=-1)
    parser.add_argument("--stalled", type=Path)
    parser.add_argument("--stop-timeout", type=float, default=30.0)
    parser.add_argument("--fail-stalled-after-stop", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="blobserve %(process)d %(levelname)s %(message)s")

    sources: dict[str, PatternSource] = {}
    for i, spec in enumerate(args.blob):
        label, size = spec.rsplit(":", 1)
        source = _Slow(label.encode(), int(size), args.delay)
        if i == 0 and args.stall_at >= 0:
            source.stall = lambda offset, size, at=args.stall_at: offset <= at < offset + size
            source.gate.clear()  # never opened: the process is killed while it waits
        sources[blob_name(label)] = source

    keeper = SystemdFdStore() if args.fdstore else HolderClient(args.holder)
    server = BlobServer(args.mountpoint, state_path=args.state, keeper=keeper)
    stop = threading.Event()
    handover = True

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal handover
        handover = signum == signal.SIGTERM
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)
    server.start(sources)
    if args.stall_at >= 0 and args.stalled is not None:
        first = next(iter(sources.values()))
        threading.Thread(
            target=lambda: first.entered.wait() and args.stalled.write_text("stalled"), daemon=True
        ).start()
    tmp = args.ready.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()} {'resumed' if server.resumed else 'mounted'}")
    tmp.rename(args.ready)
    stop.wait()
    server.stop(handover=handover, timeout=args.stop_timeout)
    if args.fail_stalled_after_stop:
        first = next(iter(sources.values()))
        first.fail = lambda offset, size: True
        first.gate.set()
        deadline = time.monotonic() + 30
        while server.stats()["read_errors"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    args.stats.write_text(json.dumps(server.stats()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
