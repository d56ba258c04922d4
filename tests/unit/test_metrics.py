"""Metrics: FUSE operations are observed by name and failure, daemon counters exported at scrape."""

from __future__ import annotations

import errno

import mfusepy
import pytest

from snapshotter.formats.index import Compression, Entry, EntryType, LayerIndex
from snapshotter.fuse.layerfs import LayerFS
from snapshotter.layertree import LayerTree
from snapshotter.metrics import Metrics
from tests.support.promtext import sample


class FailingReader:
    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        if entry.name == "bad":
            raise OSError(errno.EIO, "registry away")
        return b"x" * size


def stats() -> dict[str, object]:
    layer = {
        "format": "nydus",
        "blob_size": 1000,
        "bytes": {"on_demand": 10, "prefetch": 20, "background": 30},
        "requests": {"on_demand": 1, "prefetch": 1, "background": 2},
        "chunks_fetched": 4,
        "verify_failures": 0,
        "read_errors": 1,
        "prefetch_done": True,
        "background_done": False,
    }
    return {
        "lazy_mounts": 1,
        "not_lazy": {"no-toc-digest": 2},
        "cache": {"bytes": 60, "hits": 5, "misses": 4, "evictions": 0},
        "registry": {"requests": 9, "retries": 2, "failures": 1, "resumed": 1, "resumed_bytes": 4096},
        "layers": {"sha256:" + "a" * 64: layer},
    }


def test_fs_operations_and_daemon_counters() -> None:
    metrics = Metrics()
    metrics.watch(stats)
    entries = {
        "": Entry("", EntryType.DIR, 0o755),
        "ok": Entry("ok", EntryType.REG, 0o644, size=4),
        "bad": Entry("bad", EntryType.REG, 0o644, size=4),
    }
    fs = LayerFS(
        LayerTree(LayerIndex("nydus", Compression.ZSTD, entries)),
        FailingReader(),
        layer="sha256:x",
        observer=metrics.observe_fs,
    )
    assert fs.read("/ok", 4, 0, 0) == b"xxxx"
    with pytest.raises(mfusepy.FuseOSError):
        fs.read("/bad", 4, 0, 0)
    with pytest.raises(mfusepy.FuseOSError):
        fs.getattr("/absent")  # ENOENT is a normal answer, not an error
    assert [name for name, _, _ in fs.readdir("/", 0)] == [".", "..", "ok", "bad"]
    text = metrics.render().decode()
    assert sample(text, "lazysnap_fs_operation_duration_seconds_count", operation="read") == 2
    assert sample(text, "lazysnap_fs_operation_errors_total", operation="read", errno="EIO") == 1
    assert sample(text, "lazysnap_fs_operation_duration_seconds_count", operation="getattr") == 1
    with pytest.raises(KeyError):
        sample(text, "lazysnap_fs_operation_errors_total", operation="getattr", errno="ENOENT")
    layer = "sha256:" + "a" * 64
    assert sample(text, "lazysnap_layer_fetched_bytes_total", layer=layer, reason="background") == 30
    assert sample(text, "lazysnap_layer_blob_bytes", layer=layer, format="nydus") == 1000
    assert sample(text, "lazysnap_layer_prefetch_done", layer=layer) == 1
    assert sample(text, "lazysnap_not_lazy_layers_total", reason="no-toc-digest") == 2
    assert sample(text, "lazysnap_cache_hits_total") == 5
    assert sample(text, "lazysnap_registry_retries_total") == 2
    assert sample(text, "lazysnap_registry_resumed_bytes_total") == 4096
    assert sample(text, "lazysnap_lazy_mounts_total") == 1 and sample(text, "lazysnap_mounted_layers") == 1
