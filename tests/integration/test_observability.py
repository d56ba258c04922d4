"""Prometheus metrics and the runtime log level of a real daemon, over TCP and the admin socket."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest

from snapshotter.admin import AdminError, fetch_metrics, set_log_level
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.support.daemon import LazysnapDaemon, write_config
from tests.support.promtext import sample
from tests.support.services import free_port


def test_metrics_count_grpc_calls_and_errors(workdir: Path) -> None:
    port = free_port()
    config = write_config(workdir / "config.toml", {"metrics": {"address": f"127.0.0.1:{port}"}})
    d = LazysnapDaemon(workdir, config=config)
    d.start()
    try:
        d.stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
        d.stub.Prepare(pb.PrepareSnapshotRequest(key="b"))
        with pytest.raises(grpc.RpcError):
            d.stub.Prepare(pb.PrepareSnapshotRequest(key="a"))  # exists
        with pytest.raises(grpc.RpcError):
            d.stub.Stat(pb.StatSnapshotRequest(key="missing"))
        over_tcp = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        over_admin = fetch_metrics(d.root / "admin.sock")
        for text in (over_tcp, over_admin):
            assert sample(text, "lazysnap_grpc_request_duration_seconds_count", method="Prepare") == 3
            assert sample(text, "lazysnap_grpc_errors_total", method="Prepare", code="ALREADY_EXISTS") == 1
            assert sample(text, "lazysnap_grpc_errors_total", method="Stat", code="NOT_FOUND") == 1
            assert sample(text, "lazysnap_lazy_mounts_total") == 0
            assert sample(text, "lazysnap_mounted_layers") == 0
            assert sample(text, "lazysnap_cache_bytes") == 0
    finally:
        d.stop()


def test_log_level_changes_at_runtime(workdir: Path) -> None:
    config = write_config(workdir / "config.toml", {"log": {"level": "info"}})
    d = LazysnapDaemon(workdir, config=config, extra_args=["--log-level", "info"])
    d.start()
    try:
        d.stub.Prepare(pb.PrepareSnapshotRequest(key="before"))
        assert "key=before" not in d.log_path.read_text()  # per-call lines are debug
        set_log_level(d.root / "admin.sock", "debug")
        d.stub.Prepare(pb.PrepareSnapshotRequest(key="after"))
        assert "key=after" in d.log_path.read_text()
        with pytest.raises(AdminError, match="is not one of"):
            set_log_level(d.root / "admin.sock", "chatty")
    finally:
        d.stop()
