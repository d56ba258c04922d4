"""The FUSE manager's life beside the daemon: started once, found again, never left behind by a
daemon that failed to start, and reported (not crashed on) when it is gone."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.fuse import kernel
from snapshotter.fuse.holder import HolderClient, HolderError
from tests.support.daemon import LazysnapDaemon, run_cli, write_config
from tests.support.lazy import wait_until
from tests.support.mounts import mounts_under
from tests.support.services import pid_alive


def test_a_restarted_daemon_finds_its_manager(workdir: Path) -> None:
    d = LazysnapDaemon(workdir)
    d.start()
    try:
        manager = d.manager_pid()
        assert manager is not None and manager != d.pid
        assert os.getsid(manager) == manager  # a session of its own: the daemon's signals stay away
        d.kill()  # a crash: the manager waits (manager_idle_exit_seconds) for the next daemon
        assert pid_alive(manager)
        d.start()
        assert d.manager_pid() == manager
        # A clean stop with nothing mounted (Ctrl-C in a terminal, systemctl stop) leaves nothing.
        d.stop(signal.SIGINT, keep_manager=True)
        assert not pid_alive(manager)
        assert not (d.root / "fuse.sock").exists()
    finally:
        d.stop()


def test_a_manager_nobody_needs_exits(workdir: Path) -> None:
    """No daemon and nothing mounted for manager_idle_exit_seconds, or its root deleted: before,
    every `lazysnap serve` left a manager behind (73 after three conformance runs)."""
    config = write_config(workdir / "config.toml", {"remote": {"manager_idle_exit_seconds": 1.0}})
    d = LazysnapDaemon(workdir, config=config)
    d.start()
    try:
        manager = d.manager_pid()
        assert manager is not None
        d.kill()
        assert wait_until(lambda: not pid_alive(manager), timeout=30)
        assert "no lazy layer mounted and no daemon running" in (workdir / "lazysnap.log").read_text()
    finally:
        d.stop()
    d = LazysnapDaemon(workdir)  # idle exit after 60 s: only the deleted root can end it sooner
    d.start()
    try:
        manager = d.manager_pid()
        assert manager is not None
        holder = holder_pid(d.root) or 0  # (0: the FUSE backend has none)
        d.kill()
        # (rm cannot remove the blob server's mount point ROOT/blobs, so it fails and the root
        # directory stays; everything else in it is gone)
        subprocess.run(["rm", "-rf", str(d.root)], check=False, capture_output=True)
        assert wait_until(lambda: not pid_alive(manager), timeout=30)
        # nor its fd holder, whose socket went with the root (the manager could not reach it)
        assert not holder or wait_until(lambda: not pid_alive(holder), timeout=30)
    finally:
        d.stop()


def holder_pid(root: Path) -> int | None:
    """The pid of the root's fd holder (EROFS backend), or None."""
    try:
        return HolderClient(root / "fuse-holder.sock", timeout=5).ping()
    except HolderError:
        return None


def test_a_daemon_that_fails_to_start_stops_the_manager_it_started(workdir: Path) -> None:
    config = write_config(workdir / "config.toml", {"grpc": {"socket_group": "no-such-group-lz"}})
    d = LazysnapDaemon(workdir, config=config)
    with pytest.raises(RuntimeError, match="no-such-group-lz"):
        d.start()
    pidfile = d.root / "fuse.pid"
    assert not pidfile.exists() or not pid_alive(int(pidfile.read_text()))
    assert not (d.root / "admin.sock").exists()


def test_a_dead_manager_is_reported_and_the_daemon_serves_on(workdir: Path) -> None:
    d = LazysnapDaemon(workdir)
    d.start()
    try:
        manager = d.manager_pid()
        assert manager is not None
        os.kill(manager, signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(manager), timeout=10)
        stats = run_cli("stats", "--root", str(d.root))
        assert stats.returncode == 1 and "FUSE manager is unreachable" in stats.stderr, stats.stderr
        d.stub.Prepare(pb.PrepareSnapshotRequest(key="plain"))  # non-lazy work goes on
        metrics = run_cli("metrics", "--root", str(d.root))
        assert (
            metrics.returncode == 0
            and 'lazysnap_grpc_request_duration_seconds_count{method="Prepare"} 1.0' in metrics.stdout
        )
        d.stop()
        # What the killed manager left (its fd holder, keeping the blob mount alive) is cleared by
        # the stopping daemon (through a manager it starts for that): no mount, no holder stays.
        assert mounts_under(d.root) == []
        assert not (d.root / "fuse-holder.sock").exists()
        assert d.manager_pid() is None
    finally:
        d.stop()


def test_a_daemon_with_other_settings_says_the_manager_runs_the_old_ones(workdir: Path) -> None:
    first = write_config(workdir / "first.toml", {"read": {"timeout_seconds": 30.0}})
    d = LazysnapDaemon(workdir, config=first)
    d.start()
    try:
        d.kill()  # the manager outlives a crashed daemon (and one stopped while layers are mounted)
        d.config = write_config(workdir / "second.toml", {"read": {"timeout_seconds": 5.0}})
        d.start()
        assert "uses other settings than this config" in d.log_tail(50)
        d.kill()
        d.config = first  # the manager's own settings: nothing to say
        log_size = len(d.log_path.read_text())
        d.start()
        assert "uses other settings" not in d.log_path.read_text()[log_size:]
    finally:
        d.stop()


def test_a_successor_serves_a_blob_mount_nobody_has_used_yet(workdir: Path) -> None:
    """A manager killed before anything used its blob mount: whatever touches ROOT/blobs waits
    (the kernel has nothing cached, the holder keeps the connection), and so did the successor
    in its own start (mkdir of the directory stats it). Now the successor serves, and the waiting
    stat gets its answer."""
    d = LazysnapDaemon(workdir)
    d.start()
    stat: subprocess.Popen[str] | None = None
    try:
        manager = d.manager_pid()
        assert manager is not None
        if kernel.mount_at(d.root / "blobs") is None:
            pytest.skip("the FUSE backend has no blob mount")
        d.kill()
        os.kill(manager, signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(manager), timeout=10)
        stat = subprocess.Popen(["stat", "-c", "%F", d.root / "blobs"], stdout=subprocess.PIPE, text=True)
        d.start()  # its manager resumes the blob connection
        out, _ = stat.communicate(timeout=60)
        assert out.strip() == "directory"
        assert d.manager_pid() not in (None, manager)
        assert "blob server resumed" in d.log_path.read_text()
    finally:
        if stat is not None and stat.poll() is None:
            stat.kill()  # its request was never read by a server: SIGKILL ends it
            stat.wait()
        d.stop()
