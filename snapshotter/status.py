"""``lazysnap status``: the daemon's lazily mounted layers as a table an operator can read."""

from __future__ import annotations

from typing import Any

from snapshotter.image.progress import human_size


def _state(layer: dict[str, Any]) -> str:
    if layer["background_done"]:
        return "complete"
    if layer.get("rest_stopped"):
        return "partial (cache full)"
    if not layer["prefetch_done"]:
        return "prefetching"
    return "fetching"


def format_status(stats: dict[str, Any]) -> str:
    """One line per mounted layer (image, layer, format, fetched/total, state), then totals."""
    rows = [("IMAGE", "LAYER", "FORMAT", "FETCHED", "SIZE", "STATE", "REFETCHED", "ERRORS")]
    layers = stats["layers"]
    for digest, layer in sorted(layers.items(), key=lambda kv: (kv[1]["reference"], kv[1]["mountpoint"])):
        fetched = sum(layer["bytes"].values())
        rows.append(
            (
                layer["reference"],
                digest.removeprefix("sha256:")[:12],
                layer["format"],
                human_size(fetched),
                human_size(layer["blob_size"]),
                _state(layer),
                str(layer.get("chunk_refetches", 0)),
                str(layer["read_errors"] + layer["verify_failures"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    cache = stats["cache"]
    lines.append("")
    lines.append(
        f"{len(layers)} lazy layers mounted; cache {human_size(cache['bytes'])}"
        f" + {human_size(cache.get('local_blob_bytes', 0))} local layer blobs "
        f"({cache['hits']} hits, {cache['misses']} misses, {cache['evictions']} evictions)"
    )
    for host, link in sorted(stats.get("links", {}).items()):
        moved = ", ".join(f"{human_size(n)} {kind}" for kind, n in link["bytes"].items() if n)
        lines.append(
            f"registry {host}: rtt {link['rtt_ms']} ms, {link['bandwidth_mbps']} Mbit/s; "
            f"fetched {moved or 'nothing yet'}"
        )
    eager = stats.get("eager")
    if eager is not None:
        lines.append(
            f"eager fallback: {eager['fills']} layers unpacked by lazysnap since start "
            f"({human_size(eager['fetched_bytes'])} fetched, {eager['active_layers']} under way)"
        )
    if stats["not_lazy"]:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(stats["not_lazy"].items()))
        lines.append(f"layers pulled normally since start: {reasons}")
    return "\n".join(lines)
