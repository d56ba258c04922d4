"""``lazysnap status`` output."""

from __future__ import annotations

from snapshotter.image.progress import human_size
from snapshotter.status import format_status


def test_status_table_lists_layers_with_progress() -> None:
    layer = {
        "reference": "127.0.0.1:5000/app:v1",
        "mountpoint": "/var/lib/lazysnap/snapshots/3/fs",
        "format": "estargz",
        "blob_size": 10 << 20,
        "bytes": {"on_demand": 1 << 20, "prefetch": 1 << 20, "background": 0},
        "prefetch_done": True,
        "background_done": False,
        "read_errors": 0,
        "verify_failures": 0,
        "chunk_refetches": 4,
    }
    stats = {
        "layers": {"sha256:" + "ab" * 32: layer},
        "cache": {"bytes": 2 << 20, "local_blob_bytes": 3 << 20, "hits": 7, "misses": 3, "evictions": 0},
        "not_lazy": {"no-toc-digest": 2},
        "lazy_mounts": 1,
        "links": {
            "127.0.0.1:5000": {
                "rtt_ms": 10.5,
                "bandwidth_mbps": 940.0,
                "bytes": {"on_demand": 1 << 20, "prefetch": 1 << 20, "readahead": 0, "background": 0},
            }
        },
    }
    text = format_status(stats)
    header, row, *_ = text.splitlines()
    assert header.split() == ["IMAGE", "LAYER", "FORMAT", "FETCHED", "SIZE", "STATE", "REFETCHED", "ERRORS"]
    assert row.split() == [
        "127.0.0.1:5000/app:v1",
        "abababababab",
        "estargz",
        "2.0",
        "MiB",
        "10.0",
        "MiB",
        "fetching",
        "4",
        "0",
    ]
    assert (
        "1 lazy layers mounted; cache 2.0 MiB + 3.0 MiB local layer blobs (7 hits, 3 misses, 0 evictions)"
        in text
    )
    assert "no-toc-digest: 2" in text
    link = "registry 127.0.0.1:5000: rtt 10.5 ms, 940.0 Mbit/s; fetched 1.0 MiB on_demand, 1.0 MiB prefetch"
    assert link in text
    layer["rest_stopped"] = True
    assert "partial (cache full)" in format_status(stats)


def test_human_size() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 5 << 30, 3 << 40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 GiB",
        "3072.0 GiB",
    ]
