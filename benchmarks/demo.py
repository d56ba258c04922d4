"""`make demo`: one lazily started container next to a normal one, with timings, all on loopback.

Starts a local registry behind a shaped link (default: the "slow" profile, 40 ms RTT and
100 Mbit/s), builds a small "model" image (busybox, a config and weight shards that startup
touches only 5% of; cached under /var/tmp/lazysnap-bench), converts it to eStargz with
ctr-remote, then starts it from a cold state twice: pulled fully by containerd's overlayfs
snapshotter, and lazily by lazysnap. Prints both times and the bytes each fetched, then removes
everything it made.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.harness import (
    OVERLAYFS,
    ImageSet,
    RunResult,
    cold_run,
    lazysnap_mode,
    model_workload,
    registry_and_proxy,
)
from benchmarks.shaping_proxy import PROFILES
from tests.support.scratch import make_tmpdir, remove_tmpdir


def _mb(n: int) -> str:
    return f"{n / 1e6:8.1f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="slow", choices=sorted(PROFILES))
    parser.add_argument("--shard-mib", type=int, default=32)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()

    workload = model_workload("demo-model", args.shard_mib, args.shards, read_fraction=0.05)
    rtt, bandwidth = PROFILES[args.profile]
    print(f"network: {args.profile} profile, {rtt} ms RTT, {bandwidth / 1e6:.0f} Mbit/s (a loopback proxy)")
    workdir = make_tmpdir("lzdemo")
    try:
        with registry_and_proxy(args.profile) as (registry, proxy):
            print(f"registry on {registry.host}, shaped link on {proxy.host}")
            print("building the image and converting it to eStargz with ctr-remote ...", flush=True)
            images = ImageSet(workload.source, registry, workdir).build(formats=("estargz",))
            print(f"image: {args.shards + 2} layers, {_mb(images.sizes['gzip'])} compressed")
            results: list[RunResult] = []
            for mode, label in (
                (OVERLAYFS, "containerd overlayfs (full pull)"),
                (lazysnap_mode("estargz"), "lazysnap (lazy)"),
            ):
                print(f"cold start with {label} ...", flush=True)
                results.append(cold_run(images, workload, proxy, mode))
    finally:
        remove_tmpdir(workdir)

    print()
    print(f"{'mode':<18} {'pull':>8} {'run':>8} {'total':>8} {'fetched':>12}")
    for r in results:
        print(f"{r.mode:<18} {r.pull_s:7.2f}s {r.run_s:7.2f}s {r.total_s:7.2f}s {_mb(r.bytes_fetched)}")
    full, lazy = results
    print(
        f"\nlazysnap started the container {full.total_s / lazy.total_s:.1f}x faster and fetched "
        f"{lazy.bytes_fetched / max(1, full.bytes_fetched):.1%} of the bytes."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
