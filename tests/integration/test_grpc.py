"""``lazysnap serve`` as a subprocess, driven over its unix socket with the generated gRPC client."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.support.daemon import LazysnapDaemon, run_cli
from tests.support.services import require_privileges


def code_of(call, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value.code()  # type: ignore[no-any-return]


def prepare(
    d: LazysnapDaemon, key: str, parent: str = "", **labels: str
) -> list[pb.containerd_dot_types_dot_mount__pb2.Mount]:  # type: ignore[name-defined]
    return list(d.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels)).mounts)


def commit(d: LazysnapDaemon, key: str, name: str, **labels: str) -> None:
    d.stub.Commit(pb.CommitSnapshotRequest(key=key, name=name, labels=labels))


def fs_of(mount) -> Path:  # type: ignore[no-untyped-def]
    """The upper directory of a Prepare result (bind source or overlay upperdir)."""
    if mount.type == "bind":
        return Path(mount.source)
    (upper,) = [o.removeprefix("upperdir=") for o in mount.options if o.startswith("upperdir=")]
    return Path(upper)


def build_chain(d: LazysnapDaemon, n: int, prefix: str = "") -> list[str]:
    names: list[str] = []
    for i in range(n):
        (m,) = prepare(d, f"{prefix}a{i}", names[-1] if names else "")
        (fs_of(m) / f"f{i}").write_text(str(i))
        commit(d, f"{prefix}a{i}", f"{prefix}L{i}")
        names.append(f"{prefix}L{i}")
    return names


def test_socket_is_private(daemon: LazysnapDaemon) -> None:
    st = os.stat(daemon.address)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_mount_shapes_match_containerd_overlay(daemon: LazysnapDaemon) -> None:
    (m,) = prepare(daemon, "a")
    assert m.type == "bind" and list(m.options) == ["rw", "rbind"] and m.source.endswith("/fs")
    commit(daemon, "a", "A")
    (v,) = daemon.stub.View(pb.ViewSnapshotRequest(key="v", parent="A")).mounts
    assert (v.type, v.source, list(v.options)) == ("bind", m.source, ["ro", "rbind"])
    (e,) = daemon.stub.View(pb.ViewSnapshotRequest(key="empty-view")).mounts
    assert e.type == "bind" and list(e.options) == ["ro", "rbind"]
    (m2,) = prepare(daemon, "b", "A")
    commit(daemon, "b", "B")
    (active,) = prepare(daemon, "c", "B")
    assert active.type == "overlay" and active.source == "overlay"
    opts = list(active.options)
    lower = next(o for o in opts if o.startswith("lowerdir=")).removeprefix("lowerdir=").split(":")
    assert lower == [fs_of(m2).as_posix(), m.source]  # nearest parent first
    assert any(o.startswith("workdir=") for o in opts) and any(o.startswith("upperdir=") for o in opts)
    (view2,) = daemon.stub.View(pb.ViewSnapshotRequest(key="v2", parent="B")).mounts
    assert view2.type == "overlay" and not any(o.startswith("upperdir=") for o in view2.options)
    (again,) = daemon.stub.Mounts(pb.MountsRequest(key="c")).mounts
    assert again == active


def test_error_codes_are_containerds(daemon: LazysnapDaemon) -> None:
    s = daemon.stub
    prepare(daemon, "a")
    assert code_of(s.Prepare, pb.PrepareSnapshotRequest(key="a")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(s.Prepare, pb.PrepareSnapshotRequest(key="x", parent="nope")) == grpc.StatusCode.NOT_FOUND
    assert (
        code_of(s.Prepare, pb.PrepareSnapshotRequest(key="x", parent="a")) == grpc.StatusCode.INVALID_ARGUMENT
    )
    commit(daemon, "a", "A")
    assert code_of(s.Mounts, pb.MountsRequest(key="A")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(s.Mounts, pb.MountsRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    s.View(pb.ViewSnapshotRequest(key="v", parent="A"))
    assert (
        code_of(s.Commit, pb.CommitSnapshotRequest(key="v", name="V")) == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert code_of(s.Commit, pb.CommitSnapshotRequest(key="nope", name="N")) == grpc.StatusCode.NOT_FOUND
    prepare(daemon, "b", "A")
    assert code_of(s.Commit, pb.CommitSnapshotRequest(key="b", name="A")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(s.Remove, pb.RemoveSnapshotRequest(key="A")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(s.Remove, pb.RemoveSnapshotRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(s.Stat, pb.StatSnapshotRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(s.Usage, pb.UsageRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
    bad_filter = pb.ListSnapshotsRequest(filters=["name=="])
    assert code_of(lambda r: list(s.List(r)), bad_filter) == grpc.StatusCode.INVALID_ARGUMENT
    update = pb.UpdateSnapshotRequest(
        info=pb.Info(name="A"), update_mask=field_mask_pb2.FieldMask(paths=["parent"])
    )
    assert code_of(s.Update, update) == grpc.StatusCode.INVALID_ARGUMENT


def test_commit_stat_update_usage_remove(daemon: LazysnapDaemon) -> None:
    s = daemon.stub
    (m,) = prepare(daemon, "a", keep="active-label")
    (Path(m.source) / "data").write_bytes(os.urandom(100_000))
    (Path(m.source) / "dir").mkdir()
    live = s.Usage(pb.UsageRequest(key="a"))
    assert live.inodes == 3 and live.size >= 100_000
    commit(daemon, "a", "A", committed="yes")
    info = s.Stat(pb.StatSnapshotRequest(key="A")).info
    assert (info.name, info.parent, info.kind, dict(info.labels)) == (
        "A",
        "",
        pb.COMMITTED,
        {"committed": "yes"},
    )
    assert info.created_at.ToNanoseconds() > 0 and info.updated_at == info.created_at
    assert s.Usage(pb.UsageRequest(key="A")) == live  # computed once, at commit
    (Path(m.source) / "late").write_bytes(b"x" * 50_000)
    assert s.Usage(pb.UsageRequest(key="A")) == live

    mask = field_mask_pb2.FieldMask(paths=["labels.extra", "labels.committed"])
    updated = s.Update(
        pb.UpdateSnapshotRequest(info=pb.Info(name="A", labels={"extra": "1"}), update_mask=mask)
    ).info
    assert dict(updated.labels) == {"extra": "1"}
    assert updated.updated_at.ToNanoseconds() > info.updated_at.ToNanoseconds()
    replaced = s.Update(
        pb.UpdateSnapshotRequest(
            info=pb.Info(name="A", labels={"z": "2"}), update_mask=field_mask_pb2.FieldMask(paths=["labels"])
        )
    ).info
    assert dict(replaced.labels) == {"z": "2"}
    assert dict(s.Stat(pb.StatSnapshotRequest(key="A")).info.labels) == {"z": "2"}

    directory = Path(m.source).parent
    s.Remove(pb.RemoveSnapshotRequest(key="A"))
    assert not directory.exists()
    assert code_of(s.Stat, pb.StatSnapshotRequest(key="A")) == grpc.StatusCode.NOT_FOUND


def test_list_filters_and_batches(daemon: LazysnapDaemon) -> None:
    s = daemon.stub
    names = build_chain(daemon, 2)
    for i in range(230):
        s.View(pb.ViewSnapshotRequest(key=f"view{i}", parent=names[-1], labels={"i": str(i % 3)}))
    prepare(daemon, "act", names[-1], **{"containerd.io/snapshot.ref": "sha256:x"})

    def listed(*filters: str) -> tuple[list[str], int]:
        batches = list(s.List(pb.ListSnapshotsRequest(filters=list(filters))))
        return sorted(i.name for b in batches for i in b.info), len(batches)

    everything, batches = listed()
    assert len(everything) == 233 and batches == 3  # streamed in messages of 100, like containerd
    assert listed("kind==committed")[0] == sorted(names)
    assert listed("kind==active")[0] == ["act"]
    assert len(listed("labels.i==1")[0]) == 77
    assert len(listed("labels.i==1", "labels.i==2")[0]) == 153  # several filters: OR
    assert listed(f'labels."containerd.io/snapshot.ref"==sha256:x,parent=={names[-1]}')[0] == ["act"]
    assert listed('labels."containerd.io/snapshot.ref"==sha256:x,parent==other')[0] == []
    assert listed("name~=^L[01]$")[0] == names
    assert len(listed("kind!=view")[0]) == 3


def test_cleanup_removes_only_orphans(daemon: LazysnapDaemon) -> None:
    (m,) = prepare(daemon, "a")
    orphan = daemon.root / "snapshots" / "999"
    (orphan / "fs").mkdir(parents=True)
    daemon.stub.Cleanup(pb.CleanupRequest())
    assert not orphan.exists() and Path(m.source).is_dir()


def test_128_layers_mount(daemon: LazysnapDaemon, workdir: Path) -> None:
    """A container on 128 layers: compact the lowerdir option as containerd does and mount it."""
    require_privileges(binaries=())
    names = build_chain(daemon, 128)
    (m,) = prepare(daemon, "top", names[-1])
    snapshots_dir = daemon.root / "snapshots"
    options = []
    for opt in m.options:  # containerd's compactLowerdirOption: relative to the common directory
        name, _, value = opt.partition("=")
        if name in ("lowerdir", "upperdir", "workdir"):
            value = ":".join(os.path.relpath(p, snapshots_dir) for p in value.split(":"))
            opt = f"{name}={value}"
        options.append(opt)
    assert len(",".join(options)) < 4096
    target = workdir / "mnt"
    target.mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", ",".join(options), str(target)],
        cwd=snapshots_dir,
        check=True,
    )
    try:
        assert sorted(p.name for p in target.iterdir()) == sorted(f"f{i}" for i in range(128))
        assert (target / "f0").read_text() == "0" and (target / "f127").read_text() == "127"
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restart_keeps_every_snapshot(daemon: LazysnapDaemon, sig: int) -> None:
    names = build_chain(daemon, 3)
    prepare(daemon, "work", names[-1], note="x")
    before = sorted(
        (i.name, i.parent, i.kind, tuple(sorted(i.labels.items())))
        for b in daemon.stub.List(pb.ListSnapshotsRequest())
        for i in b.info
    )
    code = daemon.stop(sig)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert daemon.address.exists() == (sig == signal.SIGKILL)  # a clean stop removes its socket
    daemon.start()  # after kill -9 the stale socket is reclaimed
    after = sorted(
        (i.name, i.parent, i.kind, tuple(sorted(i.labels.items())))
        for b in daemon.stub.List(pb.ListSnapshotsRequest())
        for i in b.info
    )
    assert after == before
    (m,) = daemon.stub.Mounts(pb.MountsRequest(key="work")).mounts
    assert m.type == "overlay"
    commit(daemon, "work", "W")


def test_refuses_a_live_socket_and_a_locked_root(daemon: LazysnapDaemon, workdir: Path) -> None:
    other_root = workdir / "other"
    result = run_cli("serve", "--root", str(other_root), "--address", str(daemon.address))
    assert result.returncode == 1 and "in use by a live daemon" in result.stderr
    result = run_cli("serve", "--root", str(daemon.root), "--address", str(workdir / "b.sock"))
    assert result.returncode == 1 and f"in use by another lazysnap daemon (pid {daemon.pid})" in result.stderr
    prepare(daemon, "still-serving")


def test_refuses_unusable_root_and_bad_config(workdir: Path) -> None:
    not_a_dir = workdir / "file"
    not_a_dir.write_text("")
    result = run_cli("serve", "--root", str(not_a_dir), "--address", str(workdir / "s.sock"))
    assert result.returncode == 1 and "is unusable" in result.stderr
    occupied = workdir / "plain-file.sock"
    occupied.write_text("")
    result = run_cli("serve", "--root", str(workdir / "r"), "--address", str(occupied))
    assert result.returncode == 1 and "exists and is not a socket" in result.stderr
    bad = workdir / "bad.toml"
    bad.write_text("[log]\nlevel = 'chatty'\n")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == 2 and "log.level" in result.stderr


def test_stale_socket_is_reclaimed(workdir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(workdir / "lazysnap.sock"))
    stale.close()  # the file stays, nobody listens
    d = LazysnapDaemon(workdir)
    d.start()
    try:
        prepare(d, "a")
    finally:
        d.stop()


def test_socket_group(workdir: Path) -> None:
    require_privileges(binaries=())
    config = workdir / "config.toml"
    config.write_text('[grpc]\nsocket_group = "0"\n')
    d = LazysnapDaemon(workdir, config=config)
    d.start()
    try:
        st = os.stat(d.address)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 0
    finally:
        d.stop()


def test_stats_command(daemon: LazysnapDaemon, workdir: Path) -> None:
    result = run_cli("stats", "--root", str(daemon.root))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["lazy_mounts"] == 0 and stats["layers"] == {} and stats["not_lazy"] == {}
    assert stat.S_IMODE(os.stat(daemon.root / "admin.sock").st_mode) == 0o600
    missing = run_cli("stats", "--root", str(workdir / "nowhere"))
    assert missing.returncode == 1 and "is the daemon running?" in missing.stderr


def test_systemd_notify_protocol(workdir: Path) -> None:
    """READY=1 only once the socket serves; STOPPING=1 on SIGTERM (the unit is Type=notify)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = workdir / "notify.sock"
    listener.bind(str(notify_path))
    listener.settimeout(20)
    d = LazysnapDaemon(workdir, env={"NOTIFY_SOCKET": str(notify_path)})
    try:
        d.start()
        message = listener.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in message.splitlines())
        assert fields["READY"] == "1" and fields["MAINPID"] == str(d.pid)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(d.address))  # ready means serving
        probe.close()
        d.stop()
        assert "STOPPING=1" in listener.recv(4096).decode()
    finally:
        d.stop()
        listener.close()
