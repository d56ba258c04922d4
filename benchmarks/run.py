"""`make bench`: cold-start times per image, mode and network profile, as ratios to overlayfs.

For each profile (a shaped link in front of a local registry) and each image, every mode starts
the image's workload from a cold state ``--reps`` times: ``overlayfs`` (containerd's default
snapshotter, full pull) and lazysnap with the image converted to eStargz and to zstd:chunked.
Reports medians and spread of pull, run and total time and of bytes fetched, the ratios to
overlayfs, and T_ideal = T_run(overlayfs, the image local) + bytes read / bandwidth + 2·RTT.
Writes ``benchmarks/results/<date>-<profile>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

from benchmarks.harness import (
    ImageSet,
    RunResult,
    Workload,
    as_json,
    cold_run,
    make_workdir,
    model_workload,
    registry_and_proxy,
    remove_workdir,
)
from benchmarks.shaping_proxy import PROFILES

RESULTS = Path(__file__).parent / "results"
MODES = ("overlayfs", "estargz", "zstdchunked")


def workloads(shard_mib: int, shards: int) -> list[Workload]:
    return [
        model_workload("model", shard_mib, shards, read_fraction=0.05),
        model_workload("model-full", shard_mib, shards, read_fraction=1.0),
    ]


def summarize(results: list[RunResult], profile: str) -> list[dict[str, object]]:
    rtt_ms, bandwidth = PROFILES[profile]
    rows: list[dict[str, object]] = []
    for image in dict.fromkeys(r.image for r in results):
        runs = {m: [r for r in results if r.image == image and r.mode == m] for m in MODES}
        base = statistics.median(r.total_s for r in runs["overlayfs"])
        warm = statistics.median(r.run_s for r in runs["overlayfs"])
        bytes_read = runs["overlayfs"][0].bytes_read
        ideal = warm + (bytes_read * 8 / bandwidth if math.isfinite(bandwidth) else 0) + 2 * rtt_ms / 1000
        for mode, rs in runs.items():
            if not rs:
                continue
            total = statistics.median(r.total_s for r in rs)
            rows.append(
                {
                    "image": image,
                    "mode": mode,
                    "pull_s": round(statistics.median(r.pull_s for r in rs), 3),
                    "run_s": round(statistics.median(r.run_s for r in rs), 3),
                    "total_s": round(total, 3),
                    "total_spread_s": round(max(r.total_s for r in rs) - min(r.total_s for r in rs), 3),
                    "fetched_mb": round(statistics.median(r.bytes_fetched for r in rs) / 1e6, 1),
                    "read_mb": round(bytes_read / 1e6, 1),
                    "speedup_vs_overlayfs": round(base / total, 2),
                    "vs_ideal": round(total / ideal, 2),
                    "ideal_s": round(ideal, 3),
                }
            )
    return rows


def markdown(rows: list[dict[str, object]], profile: str, reps: int) -> str:
    rtt_ms, bandwidth = PROFILES[profile]
    head = (
        f"Profile `{profile}` ({rtt_ms} ms RTT, {bandwidth / 1e6:.0f} Mbit/s), median of {reps}.\n\n"
        "| image | mode | pull s | run s | total s | fetched MB | read MB | speedup vs overlayfs"
        " | total / T_ideal |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['image']} | {r['mode']} | {r['pull_s']} | {r['run_s']} | {r['total_s']} | {r['fetched_mb']} "
        f"| {r['read_mb']} | {r['speedup_vs_overlayfs']}x | {r['vs_ideal']} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profiles", default="cloud,slow,far")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--shard-mib", type=int, default=64)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    for profile in args.profiles.split(","):
        results: list[RunResult] = []
        workdir = make_workdir("lzbench")
        try:
            with registry_and_proxy(profile) as (registry, proxy):
                for workload in workloads(args.shard_mib, args.shards):
                    print(f"[{profile}] building {workload.name} ...", flush=True)
                    images = ImageSet(workload, registry, workdir / workload.name).build()
                    for rep in range(args.reps):
                        for mode in MODES:
                            result = cold_run(images, proxy, mode)
                            results.append(result)
                            print(
                                f"[{profile}] {workload.name} {mode} #{rep + 1}: {result.total_s:.2f}s, "
                                f"{result.bytes_fetched / 1e6:.1f} MB",
                                flush=True,
                            )
        finally:
            remove_workdir(workdir)
        rows = summarize(results, profile)
        stem = args.out / f"{date}-{profile}"
        stem.with_suffix(".json").write_text(
            json.dumps(
                {"profile": profile, "reps": args.reps, "summary": rows, "runs": as_json(results)}, indent=2
            )
            + "\n"
        )
        table = markdown(rows, profile, args.reps)
        stem.with_suffix(".md").write_text(table)
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
