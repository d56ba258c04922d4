"""Summaries of benchmark runs: medians and spread per image and mode, the ratios to overlayfs and
to T_ideal, as JSON rows, a Markdown table and a PNG chart (matplotlib, if installed)."""

from __future__ import annotations

import importlib
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import RunResult, WarmResult
from benchmarks.shaping_proxy import PROFILES


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def ideal_seconds(warm_s: float, bytes_read: int, profile: str) -> float:
    """T_ideal = T_run(image local, page cache warm) + bytes read / bandwidth + 2·RTT: a
    snapshotter that fetched exactly what the workload reads, at line rate, after one exchange."""
    rtt_ms, bandwidth = PROFILES[profile]
    transfer = bytes_read * 8 / bandwidth if math.isfinite(bandwidth) else 0.0
    return warm_s + transfer + 2 * rtt_ms / 1000


def summarize(
    results: Sequence[RunResult], profile: str, warm: Mapping[str, WarmResult] | None = None
) -> list[dict[str, object]]:
    """One row per (image, mode), in the order the runs were made; ``warm`` (per image) gives
    the warm time, the bytes read and so T_ideal."""
    rows: list[dict[str, object]] = []
    for image in dict.fromkeys(r.image for r in results):
        runs = [r for r in results if r.image == image]
        local = (warm or {}).get(image)
        warm_s = _median(local.warm_s) if local and local.warm_s else None
        read_b = int(_median(local.bytes_read)) if local and local.bytes_read else None
        ideal = ideal_seconds(warm_s, read_b, profile) if warm_s is not None and read_b is not None else None
        base_runs = [r.total_s for r in runs if r.mode == "overlayfs"]
        base = _median(base_runs) if base_runs else None
        for mode in dict.fromkeys(r.mode for r in runs):
            rs = [r for r in runs if r.mode == mode]
            total = _median([r.total_s for r in rs])
            rows.append(
                {
                    "image": image,
                    "mode": mode,
                    "runs": len(rs),
                    "pull_s": _r(_median([r.pull_s for r in rs])),
                    "run_s": _r(_median([r.run_s for r in rs])),
                    "total_s": _r(total),
                    "total_min_s": _r(min(r.total_s for r in rs)),
                    "total_max_s": _r(max(r.total_s for r in rs)),
                    "total_spread_s": _r(max(r.total_s for r in rs) - min(r.total_s for r in rs)),
                    "warm_s": _r(warm_s),
                    "fetched_mb": round(_median([r.bytes_fetched for r in rs]) / 1e6, 1),
                    "fetched_ready_mb": round(_median([r.bytes_fetched_ready for r in rs]) / 1e6, 1),
                    "on_demand_mb": _on_demand_mb(rs),
                    "cpu_s": _median_or_none([r.cpu_s for r in rs if r.cpu_s is not None], 2),
                    "read_mb": round(read_b / 1e6, 1) if read_b is not None else None,
                    "read_exact": local.exact if local else None,
                    "ideal_s": _r(ideal),
                    "vs_overlayfs": _r(total / base, 2) if base else None,
                    "speedup_vs_overlayfs": _r(base / total, 2) if base else None,
                    "vs_ideal": _r(total / ideal, 2) if ideal else None,
                }
            )
    return rows


def _median_or_none(values: Sequence[float], digits: int) -> float | None:
    return _r(_median(values), digits) if values else None


def _on_demand_mb(runs: Sequence[RunResult]) -> float | None:
    """Median MB lazysnap fetched because a read waited for them (None for other snapshotters)."""
    values = []
    for r in runs:
        by_reason = r.lazy_stats.get("fetched_by_reason")
        if isinstance(by_reason, dict):
            values.append(int(by_reason.get("on_demand", 0)))
    return round(_median(values) / 1e6, 1) if values else None


def _cell(value: object, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def markdown(
    rows: Sequence[Mapping[str, object]],
    profile: str,
    reps: int,
    *,
    images: Mapping[str, Mapping[str, Any]] | None = None,
    notes: Sequence[str] = (),
) -> str:
    rtt_ms, bandwidth = PROFILES[profile]
    link = (
        "no shaping" if not math.isfinite(bandwidth) else f"{rtt_ms:g} ms RTT, {bandwidth / 1e6:.0f} Mbit/s"
    )
    out = [
        f"Profile `{profile}` ({link}), median of {reps} cold runs per image and mode.\n",
        "| image | mode | pull s | run s | total s | spread s | warm s | fetched MB | fetched before ready MB"
        " | on demand MB | read MB | snapshotter CPU s | total / overlayfs | total / T_ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['image']} | {r['mode']} | {r['pull_s']} | {r['run_s']} | {r['total_s']} "
            f"| {r['total_spread_s']} | {_cell(r['warm_s'])} | {r['fetched_mb']} | {r['fetched_ready_mb']} "
            f"| {_cell(r['on_demand_mb'])} | {_cell(r['read_mb'])} | {_cell(r['cpu_s'])} "
            f"| {_cell(r['vs_overlayfs'])} | {_cell(r['vs_ideal'])} |"
        )
    out += [
        "",
        "total = pull + run (until the workload's ready line); spread = max - min total; warm = the"
        " same workload with the image local and the page cache warm (median of 3); read = bytes of"
        " the image the workload touched (page cache after a local run from a file system without"
        " readahead); fetched = bytes from the registry during the run, before ready = until the"
        " ready line; on demand = what lazysnap fetched because a read waited for it; snapshotter"
        " CPU = CPU seconds of the snapshotter's processes during the run (lazysnap: daemon and"
        " FUSE manager); T_ideal = warm + read / bandwidth + 2·RTT; total / overlayfs below 1 is"
        " faster than a full pull.",
    ]
    if images:
        out += ["", "| image | what | " + " | ".join(_variants(images)) + " |"]
        out.append("|---|---|" + "---|" * len(_variants(images)))
        for name, info in images.items():
            sizes = info.get("sizes_mb", {})
            cells = " | ".join(_cell(sizes.get(v), " MB") for v in _variants(images))
            out.append(f"| {name} | {info.get('description', '')} | {cells} |")
    out += side_by_side(rows)
    out += [f"\n{n}" for n in notes]
    return "\n".join(out) + "\n"


def family(mode: str) -> str:
    """``overlayfs``, ``lazysnap``, ``stargz`` (the built-in peer) or ``peer`` (one from --peer)."""
    if mode == "overlayfs":
        return "overlayfs"
    if mode.startswith("lazysnap-"):
        return "lazysnap"
    return "stargz" if mode == "stargz" or mode.startswith("stargz-") else "peer"


def side_by_side(rows: Sequence[Mapping[str, object]]) -> list[str]:
    """Markdown lines: total seconds per image, overlayfs, lazysnap and stargz modes in columns,
    and lazysnap eStargz against stargz on the same image format (plain, then profiled)."""
    modes = [m for m in dict.fromkeys(str(r["mode"]) for r in rows) if family(m) != "peer"]
    if not any(family(m) == "stargz" for m in modes) and len(modes) < 2:
        return []
    total = {(str(r["image"]), str(r["mode"])): float(str(r["total_s"])) for r in rows}
    pairs = [
        (a, b)
        for a, b in (("lazysnap-estargz", "stargz"), ("lazysnap-estargz-profiled", "stargz-profiled"))
        if a in modes and b in modes
    ]
    head = ["image", *modes, *(f"{a} / {b}" for a, b in pairs)]
    out = ["", "Side by side, total seconds (median):", "", "| " + " | ".join(head) + " |"]
    out.append("|" + "---|" * len(head))
    for image in dict.fromkeys(str(r["image"]) for r in rows):
        cells = [_cell(total.get((image, m))) for m in modes]
        for a, b in pairs:
            x, y = total.get((image, a)), total.get((image, b))
            cells.append(f"{x / y:.2f}" if x is not None and y else "-")
        out.append(f"| {image} | " + " | ".join(cells) + " |")
    return out


def _variants(images: Mapping[str, Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for info in images.values():
        seen.update(dict.fromkeys(info.get("sizes_mb", {})))
    return list(seen)


def micro_markdown(micro: Mapping[str, Any]) -> str:
    out = ["FUSE micro-benchmarks (lazy layer with every chunk in lazysnap's chunk cache).", ""]
    meta = micro.get("metadata")
    if meta:
        out += [
            f"Metadata: {meta['files']} files of {meta['file_bytes']} bytes in {meta['dirs']} directories;"
            " dentry and inode caches dropped before each pass (ops/s).",
            "",
            "| filesystem | " + " | ".join(meta["ops"]) + " |",
            "|---|" + "---|" * len(meta["ops"]),
        ]
        for fs, ops in meta["ops_per_s"].items():
            out.append(f"| {fs} | " + " | ".join(str(ops[op]) for op in meta["ops"]) + " |")
        out.append("")
    thr = micro.get("throughput")
    if thr:
        out += [
            f"Sequential read of a {thr['size_bytes'] >> 20} MiB file, page cache dropped (MB/s):",
            "",
            "| source | MB/s | vs local |",
            "|---|---|---|",
        ]
        out += [f"| {k} | {v} | {thr['ratio_to_local'][k]} |" for k, v in thr["MB_per_s"].items()]
    walk = micro.get("walk")
    if walk:
        low, high = walk["file_bytes"]
        backend = f"`[fs] backend = {walk['backend']}`" if walk.get("backend") else "default backend"
        out += [
            "",
            f"Small-file walk: `{walk['command']}` over {walk['files']} files of {low}-{high} bytes in"
            f" {walk['dirs']} directories, page cache dropped, lazy layers with every chunk cached"
            f" (lazysnap: {backend}); median of {walk['reps']}; stat and open+close on the same mounts.",
            "",
            "| snapshotter | walk s | vs overlayfs | stat /s | open+close /s "
            "| sequential MB/s (page cache dropped) | sequential MB/s (page cache warm) |",
            "|---|---|---|---|---|---|---|",
        ]
        sequential = walk.get("sequential_mb_s", {})
        warm = walk.get("sequential_warm_mb_s", {})
        for name, seconds in walk["walk_s"].items():
            ops = walk["runs"][name].get("ops_per_s", {})
            out.append(
                f"| {name} | {seconds} | {walk['ratio_to_overlayfs'][name]} "
                f"| {_cell(ops.get('stat'))} | {_cell(ops.get('open+close'))} "
                f"| {_cell(sequential.get(name))} | {_cell(warm.get(name))} |"
            )
    return "\n".join(out) + "\n"


def chart(rows: Sequence[Mapping[str, Any]], profile: str, reps: int, path: Path) -> Path | None:
    """Grouped bars of the median cold-start time per image (groups) and mode (bars), the pull
    part hatched, min-max whiskers, T_ideal as a dash over each group. None without matplotlib."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        print("note: matplotlib is not installed (pip install -e '.[bench]'); no chart", flush=True)
        return None
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    images = list(dict.fromkeys(str(r["image"]) for r in rows))
    modes = list(dict.fromkeys(str(r["mode"]) for r in rows))
    by_key = {(str(r["image"]), str(r["mode"])): r for r in rows}
    width = 0.8 / max(1, len(modes))
    # One hue per family (overlayfs grey, lazysnap blues, stargz oranges, other peers greens),
    # lighter for each further mode of the family.
    palettes = {"overlayfs": "Greys", "lazysnap": "Blues", "stargz": "Oranges", "peer": "Greens"}
    members: dict[str, list[str]] = {}
    for mode in modes:
        members.setdefault(family(mode), []).append(mode)
    colors = {
        mode: plt.get_cmap(palettes[fam])(0.75 - 0.4 * i / max(1, len(group) - 1) if len(group) > 1 else 0.7)
        for fam, group in members.items()
        for i, mode in enumerate(group)
    }
    fig, ax = plt.subplots(figsize=(max(8.0, 0.4 * len(images) * max(1, len(modes)) + 2), 5.0))
    for j, mode in enumerate(modes):
        xs, pulls, runs, lo, hi = [], [], [], [], []
        for i, image in enumerate(images):
            r = by_key.get((image, mode))
            if r is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            pulls.append(float(r["pull_s"]))
            total = float(r["total_s"])
            runs.append(max(0.0, total - float(r["pull_s"])))
            lo.append(total - float(r["total_min_s"]))
            hi.append(float(r["total_max_s"]) - total)
        color = colors[mode]
        ax.bar(xs, pulls, width, color=color, alpha=0.55, hatch="//", edgecolor="white", linewidth=0)
        ax.bar(xs, runs, width, bottom=pulls, color=color, label=mode, yerr=[lo, hi], capsize=2)
    for i, image in enumerate(images):
        ideal = next((r["ideal_s"] for r in rows if r["image"] == image and r["ideal_s"]), None)
        if ideal:
            ax.hlines(float(ideal), i - 0.42, i + 0.42, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(images)), images)
    ax.set_ylabel("seconds to ready")
    rtt_ms, bandwidth = PROFILES[profile]
    link = f"{rtt_ms:g} ms, {bandwidth / 1e6:.0f} Mbit/s" if math.isfinite(bandwidth) else "unshaped"
    ax.set_title(
        f"Cold start per image and mode: {profile} ({link}), median of {reps}\n"
        "hatched: pull; whiskers: min to max; dashes: T_ideal",
        fontsize=10,
    )
    # Below the axes: over the bars it would hide the tallest ones.
    ax.legend(fontsize="small", ncols=min(4, len(modes)), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
