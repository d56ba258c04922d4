"""One cold start through lazysnap, explained: where a start waits and what the FUSE manager spends.

    python -m benchmarks.diagnose [--image python] [--variant estargz] [--profile cloud] [--reps 2]
                                  [--py-spy OUT]

For each repetition: a fresh containerd and lazysnap behind the shaping proxy, the image pulled
and its workload run as in ``benchmarks.run``; meanwhile the daemon's stats are polled for the
moment every lazy layer's rest has been fetched and stored (``background_done``). Printed per
run: pull and run seconds, when the background was done (seconds after the pull), and the CPU
seconds of the daemon and of the FUSE manager (from /proc). With ``--py-spy OUT`` the last
repetition also samples the manager with ``py-spy record --nonblocking`` (which does not pause
it: a paused manager makes the daemon's stop time out) into OUT, raw collapsed stacks.

A diagnostic, not a benchmark: one image, no interleaving with other modes, no warm runs.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks import run
from benchmarks.harness import (
    ImageSet,
    Mode,
    SnapshotterProcess,
    Workload,
    containerd_with,
    cpu_seconds,
    drop_page_cache,
    image_tag,
    lazysnap_mode,
    pull,
    registry_and_proxy,
    run_workload,
)
from benchmarks.shaping_proxy import ShapingProxy
from snapshotter.contract import manager_pidfile
from tests.support.scratch import make_tmpdir, remove_tmpdir


def watch_background(process: SnapshotterProcess, since: float, done_at: list[float]) -> None:
    """Poll the daemon's stats until every lazy layer's rest is fetched and stored; append when
    (seconds after ``since``) to ``done_at``. Gives up after two minutes. Every 0.1 s: each poll
    costs the daemon and the manager a little of the CPU this tool measures."""
    while not done_at and time.monotonic() - since < 120:
        layers = process.stats().get("layers", {})
        if layers and all(layer.get("background_done") for layer in layers.values()):
            done_at.append(time.monotonic() - since)
        time.sleep(0.1)


@contextlib.contextmanager
def sampling(pid: int, out: Path | None) -> Iterator[None]:
    """``py-spy record --nonblocking`` of process ``pid`` into ``out`` (raw stacks) while the block
    runs, for at most 4 s; nothing when ``out`` is None. py-spy is stopped however the block ends."""
    if out is None:
        yield
        return
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen(
        [binary, "record", "--nonblocking", "--format", "raw", "--rate", "100", "-d", "4",
         "-p", str(pid), "-o", str(out)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
        spy.wait(60)
    finally:
        spy.kill()
        spy.wait()


def one_start(images: ImageSet, proxy: ShapingProxy, workload: Workload, mode: Mode, spy: Path | None) -> str:
    """Pull and run ``workload`` once from nothing; what the run says about itself."""
    with containerd_with(mode, "lzb") as (cd, process):
        assert process is not None and process.proc is not None
        manager = int(manager_pidfile(process.root).read_text().strip())
        pids = {"daemon": process.proc.pid, "manager": manager}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        with sampling(manager, spy):
            ref = images.ref(proxy.host, image_tag(mode.variant, workload))
            drop_page_cache()
            started = time.monotonic()
            pull(cd, mode, ref, timeout=600)
            pulled = time.monotonic()
            done_at: list[float] = []
            poller = threading.Thread(target=watch_background, args=(process, pulled, done_at), daemon=True)
            poller.start()
            timing = run_workload(cd, ref, workload, snapshotter=mode.snapshotter, timeout=600)
            poller.join(130)
        cpu = {name: round(cpu_seconds(pid) - before[name], 2) for name, pid in pids.items()}
    background = f"{done_at[0]:.2f}s" if done_at else "not within 120 s"
    return (
        f"pull {pulled - started:.2f}s, run {timing.ready - pulled:.2f}s, "
        f"background done {background} after the pull, CPU s {cpu}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnose", description=__doc__.split("\n")[0])
    parser.add_argument("--image", default="python", help="one of benchmarks.run's images (default python)")
    parser.add_argument("--variant", default="estargz", help="image format lazysnap pulls (default estargz)")
    parser.add_argument("--profile", default="cloud", help="link profile (default cloud)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--py-spy", metavar="OUT", type=Path, help="sample the manager in the last run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [w for w in run.workloads([args.image], 64, 4, False, 2048) if w.name == args.image]
    if not chosen:
        sys.exit(f"unknown image {args.image!r}")
    workdir = make_tmpdir("lzdiag")
    try:
        with registry_and_proxy(args.profile) as (registry, proxy):
            images = ImageSet(chosen[0].source, registry, workdir / "images").build([args.variant])
            mode = lazysnap_mode(args.variant)
            for rep in range(args.reps):
                spy = args.py_spy if rep == args.reps - 1 else None
                print(f"#{rep + 1}: {one_start(images, proxy, chosen[0], mode, spy)}", flush=True)
    finally:
        remove_tmpdir(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
