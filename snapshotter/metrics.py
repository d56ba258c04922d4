"""Prometheus metrics, under a ``lazysnap_`` prefix, modelled on stargz-snapshotter's and nydusd's
families so that their dashboards translate.

Hot paths (FUSE operations, gRPC calls) observe into histograms as they happen; everything the
daemon already counts (bytes fetched per layer and reason, cache counters, mounts, prefetch and
background progress) is read from ``RemoteLayers.stats()`` at scrape time, so nothing is counted
twice and nothing in the read path knows about Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
# FUSE operations are served from memory or the cache in tens of µs, or wait for the registry.
_FS_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
_GRPC_BUCKETS = (1e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.fs_duration = Histogram(
            "lazysnap_fs_operation_duration_seconds",
            "FUSE operations on lazily mounted layers, by operation",
            ["operation"],
            buckets=_FS_BUCKETS,
            registry=self.registry,
        )
        self.fs_errors = Counter(
            "lazysnap_fs_operation_errors",
            "FUSE operations that failed (absent names and xattrs excluded), by operation and errno",
            ["operation", "errno"],
            registry=self.registry,
        )
        self.grpc_duration = Histogram(
            "lazysnap_grpc_request_duration_seconds",
            "containerd's Snapshots API calls, by method",
            ["method"],
            buckets=_GRPC_BUCKETS,
            registry=self.registry,
        )
        self.grpc_errors = Counter(
            "lazysnap_grpc_errors",
            "Snapshots API calls that did not succeed, by method and gRPC status",
            ["method", "code"],
            registry=self.registry,
        )

    def observe_fs(self, operation: str, seconds: float, failed: str) -> None:
        self.fs_duration.labels(operation).observe(seconds)
        if failed:
            self.fs_errors.labels(operation, failed).inc()

    def observe_grpc(self, method: str, seconds: float, code: str) -> None:
        self.grpc_duration.labels(method).observe(seconds)
        if code != "OK":
            self.grpc_errors.labels(method, code).inc()

    def watch(self, stats: Callable[[], dict[str, Any]]) -> None:
        """Export the daemon's own counters (``RemoteLayers.stats()``) at every scrape."""
        self.registry.register(_StatsCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield CounterMetricFamily(
            "lazysnap_lazy_mounts", "Layers mounted lazily since start", value=s["lazy_mounts"]
        )
        yield GaugeMetricFamily("lazysnap_mounted_layers", "Lazy layers mounted now", value=len(s["layers"]))
        not_lazy = CounterMetricFamily(
            "lazysnap_not_lazy_layers",
            "Layers left to containerd's normal pull, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(s["not_lazy"].items()):
            not_lazy.add_metric([reason], count)
        yield not_lazy
        if "eager" in s:
            yield CounterMetricFamily(
                "lazysnap_eager_layers",
                "Layers unpacked by lazysnap's eager fallback since start",
                value=s["eager"]["fills"],
            )
        cache = s["cache"]
        yield GaugeMetricFamily(
            "lazysnap_cache_bytes", "Bytes of verified chunks in the cache", value=cache["bytes"]
        )
        yield GaugeMetricFamily(
            "lazysnap_local_blob_bytes",
            "Disk taken by complete layers kept as local data blobs (counted in the cache bound)",
            value=cache.get("local_blob_bytes", 0),
        )
        for name, help_text in (
            ("hits", "Chunk reads served from the cache"),
            ("misses", "Chunk reads the cache could not serve"),
            ("evictions", "Chunks evicted to keep the cache under its bound"),
        ):
            yield CounterMetricFamily(f"lazysnap_cache_{name}", help_text, value=cache[name])
        for name, help_text in (
            ("requests", "HTTP requests sent to registries, retries included"),
            ("retries", "Requests sent again after a transient failure (5xx, reset, stall, short body)"),
            ("failures", "Requests given up on after every retry"),
            ("resumed", "Retries that asked only for the rest of a response cut mid-body"),
            ("resumed_bytes", "Bytes that resumed requests did not ask for again, having kept them"),
        ):
            yield CounterMetricFamily(f"lazysnap_registry_{name}", help_text, value=s["registry"][name])
        yield from _layer_metrics(s["layers"])


def _layer_metrics(layers: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    fetched = CounterMetricFamily(
        "lazysnap_layer_fetched_bytes",
        "Compressed bytes fetched from the registry",
        labels=["layer", "reason"],
    )
    requests = CounterMetricFamily(
        "lazysnap_layer_fetch_requests", "Range requests sent to the registry", labels=["layer", "reason"]
    )
    size = GaugeMetricFamily(
        "lazysnap_layer_blob_bytes", "Size of the layer blob", labels=["layer", "format"]
    )
    chunks = CounterMetricFamily(
        "lazysnap_layer_chunks_fetched", "Chunks fetched and verified", labels=["layer"]
    )
    refetches = CounterMetricFamily(
        "lazysnap_chunk_refetches", "Chunks fetched again after an earlier fetch", labels=["layer"]
    )
    verify = CounterMetricFamily(
        "lazysnap_layer_verify_failures", "Fetched chunks that failed their digest", labels=["layer"]
    )
    read_errors = CounterMetricFamily(
        "lazysnap_layer_read_errors", "Reads answered with EIO", labels=["layer"]
    )
    prefetch = GaugeMetricFamily(
        "lazysnap_layer_prefetch_done", "1 once prefetch has finished", labels=["layer"]
    )
    background = GaugeMetricFamily(
        "lazysnap_layer_background_done", "1 once the whole layer is fetched", labels=["layer"]
    )
    rest_stopped = GaugeMetricFamily(
        "lazysnap_layer_rest_stopped",
        "1 when the rest of the layer does not fit the cache and only reads are fetched",
        labels=["layer"],
    )
    for digest, layer in sorted(layers.items()):
        for reason, count in layer["bytes"].items():
            fetched.add_metric([digest, reason], count)
        for reason, count in layer["requests"].items():
            requests.add_metric([digest, reason], count)
        size.add_metric([digest, layer["format"]], layer["blob_size"])
        chunks.add_metric([digest], layer["chunks_fetched"])
        refetches.add_metric([digest], layer.get("chunk_refetches", 0))
        verify.add_metric([digest], layer["verify_failures"])
        read_errors.add_metric([digest], layer["read_errors"])
        prefetch.add_metric([digest], 1 if layer["prefetch_done"] else 0)
        background.add_metric([digest], 1 if layer["background_done"] else 0)
        rest_stopped.add_metric([digest], 1 if layer.get("rest_stopped") else 0)
    yield from (
        fetched,
        requests,
        size,
        chunks,
        refetches,
        verify,
        read_errors,
        prefetch,
        background,
        rest_stopped,
    )
