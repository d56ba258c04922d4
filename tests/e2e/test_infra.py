"""Smoke tests of the e2e infrastructure using containerd's built-in overlayfs snapshotter."""

from __future__ import annotations

from pathlib import Path

from tests.support import mounts, oci
from tests.support.oci import PushedImage
from tests.support.services import (
    Containerd,
    Registry,
    pid_alive,
    run_args,
    run_container,
    run_in_container,
    unique_id,
    verify_container_fs,
)


def test_layout_is_deterministic(tmp_path: Path) -> None:
    """Same layers -> byte-identical layout; expected fs follows whiteout semantics."""
    spec = oci.test_image_layers()
    a = oci.build_layout(tmp_path / "a", spec.layers, tag="1")
    b = oci.build_layout(tmp_path / "b", spec.layers, tag="1")
    assert a.manifest_digest == b.manifest_digest
    assert len(a.layers) == 3
    for blob in a.layers:
        assert oci.sha256_digest(a.blob_path(blob.digest).read_bytes()) == blob.digest
    exp = spec.expected
    assert "/data/gone.txt" not in exp
    assert sorted(p for p in exp if p.startswith("/data/olddir/")) == ["/data/olddir/new.txt"]
    assert exp["/data/hardlink.txt"].hardlink_of == "/data/orig.txt"
    assert exp["/tmp"].mode == 0o1777
    assert exp["/etc/motd"].data == b"motd from layer 2\n"


def test_pull_and_run_overlayfs(registry: Registry, base_image: PushedImage, containerd: Containerd) -> None:
    """Pull with overlayfs, run containers, and check content and whiteout semantics."""
    ref = base_image.ref
    containerd.pull(ref)
    listed = containerd.ctr("image", "ls", "-q").stdout.split()
    assert ref in listed
    # containerd kept our manifest digest (skopeo --preserve-digests did not rewrite it).
    assert base_image.image.manifest_digest in containerd.ctr("image", "ls").stdout

    assert run_in_container(containerd, ref, "/bin/cat", "/data/hello.txt") == "hello from layer 2\n"

    script = (
        "/bin/test -e /data/gone.txt && echo gone-present || echo gone-absent;"
        "/bin/ls -a /data/olddir;"
        "/bin/cat /data/hardlink.txt /data/symlink.txt /etc/motd;"
        "/data/run.sh;"
        "/bin/busybox stat -c '%a %u %g' /data/run.sh /data/owned.txt /tmp /data/olddir/new.txt;"
        "/bin/busybox stat -c '%h' /data/hardlink.txt"
    )
    out = run_in_container(containerd, ref, "/bin/sh", "-c", script).splitlines()
    assert out == [
        "gone-absent",
        ".",
        "..",
        "new.txt",
        "hardlinked content",
        "hello from layer 2",
        "motd from layer 2",
        "run-ok",
        "755 0 0",
        "640 1000 1000",
        "1777 0 0",
        "644 0 0",
        "2",
    ]

    # Exit codes propagate; a failing command is reported, not swallowed.
    assert run_container(containerd, ref, "/bin/test", "-e", "/data/gone.txt").returncode == 1

    # The generic whole-tree check other e2e tests reuse with snapshotter="lazysnap".
    assert verify_container_fs(containerd, ref, base_image.expected) == []


def test_teardown_kills_tasks_and_unmounts(base_image: PushedImage, containerd: Containerd) -> None:
    """stop() must kill a still-running task and its shim (by PID) and leave no mounts."""
    containerd.pull(base_image.ref)
    cid = unique_id()
    containerd.containers.add((containerd.namespace, cid))
    containerd.ctr(
        "run",
        "-d",
        *run_args(containerd, cid),
        base_image.ref,
        cid,
        "/bin/busybox",
        "sleep",
        "600",
    )
    shims = containerd._shim_pids()
    assert shims, "no shim found for the running task"
    assert mounts.mounts_under(containerd.workdir), "expected the task's rootfs mount"
    assert containerd.stop() == []
    assert not mounts.mounts_under(containerd.workdir)
    assert not any(pid_alive(pid) for pid in shims)
    assert not Path("/sys/fs/cgroup/memory", containerd.cgroup_parent.lstrip("/")).exists()


def test_unique_container_ids() -> None:
    """Container ids never repeat."""
    assert len({unique_id() for _ in range(100)}) == 100
