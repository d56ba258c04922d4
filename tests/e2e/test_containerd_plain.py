"""Real containerd with lazysnap as its proxy snapshotter, for plain (non-lazy) layers.

`ctr image pull --snapshotter lazysnap` sends no remote-snapshot labels, so containerd downloads
every layer and unpacks it into the mounts lazysnap returns; containers then run on lazysnap's
overlay mounts. What `ctr snapshots` reports must agree with the daemon's own view.
"""

from __future__ import annotations

import json
import signal

import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.e2e.conftest import LazysnapStack
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon
from tests.support.lazy import wait_until
from tests.support.oci import PushedImage
from tests.support.services import Containerd, run_in_container, verify_container_fs


@pytest.fixture
def plain_stack(lazysnap_stack: LazysnapStack) -> tuple[LazysnapDaemon, Containerd]:
    """lazysnap with its defaults, and a containerd with it as a proxy plugin."""
    return lazysnap_stack()


def ctr_snapshots(cd: Containerd, *args: str, check: bool = True) -> str:
    return cd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, *args, check=check).stdout


def backend_infos(daemon: LazysnapDaemon) -> list[pb.Info]:
    return [i for batch in daemon.stub.List(pb.ListSnapshotsRequest()) for i in batch.info]


def backend_name(daemon: LazysnapDaemon, key: str) -> pb.Info:
    """containerd's metadata layer stores KEY in the backend as NAMESPACE/ID/KEY."""
    (info,) = [i for i in backend_infos(daemon) if i.name.endswith("/" + key)]
    return info


def test_pull_and_run_on_lazysnap(
    plain_stack: tuple[LazysnapDaemon, Containerd], base_image: PushedImage
) -> None:
    lazysnap, lz_containerd = plain_stack
    ref = base_image.ref
    lz_containerd.pull(ref, snapshotter=SNAPSHOTTER)

    # One committed snapshot per layer, chained, none carrying remote-snapshot labels.
    committed = [i for i in backend_infos(lazysnap) if i.kind == pb.COMMITTED]
    assert len(committed) == len(base_image.image.layers)
    assert sum(1 for i in committed if i.parent == "") == 1
    assert not any(k.startswith("containerd.io/snapshot/remote") for i in committed for k in i.labels)

    assert run_in_container(lz_containerd, ref, "/bin/cat", "/data/hello.txt", snapshotter=SNAPSHOTTER) == (
        "hello from layer 2\n"
    )
    # The whole tree: contents, modes, owners, links, whiteouts and the opaque directory.
    assert verify_container_fs(lz_containerd, ref, base_image.expected, snapshotter=SNAPSHOTTER) == []

    # run --rm drops the containers' snapshots; containerd's garbage collector then calls Remove,
    # which deletes the directory after its transaction (as containerd does): wait for both.
    assert wait_until(lambda: not [i for i in backend_infos(lazysnap) if i.kind != pb.COMMITTED])
    assert wait_until(lambda: len(list((lazysnap.root / "snapshots").iterdir())) == len(committed))


def test_ctr_snapshots_agree_with_the_daemon(
    plain_stack: tuple[LazysnapDaemon, Containerd], base_image: PushedImage
) -> None:
    lazysnap, lz_containerd = plain_stack
    lz_containerd.pull(base_image.ref, snapshotter=SNAPSHOTTER)
    chain = base_image.image.chain_ids
    listed = ctr_snapshots(lz_containerd, "ls").splitlines()[1:]
    rows = {line.split()[0]: line.split()[1:] for line in listed}
    assert set(rows) == set(chain)
    for i, chain_id in enumerate(chain):
        parent, kind = rows[chain_id] if len(rows[chain_id]) == 2 else ("", rows[chain_id][0])
        assert kind == "Committed" and parent == (chain[i - 1] if i else "")

    top = chain[-1]
    info = json.loads(ctr_snapshots(lz_containerd, "info", top))
    ours = backend_name(lazysnap, top)
    assert info["Kind"] == "Committed" and info["Parent"] == chain[-2]
    assert ours.kind == pb.COMMITTED and ours.parent.endswith("/" + chain[-2])

    usage_rows = {
        ln.split()[0]: ln.split()[1:] for ln in ctr_snapshots(lz_containerd, "usage").splitlines()[1:]
    }
    for chain_id in chain:
        ours_usage = lazysnap.stub.Usage(pb.UsageRequest(key=backend_name(lazysnap, chain_id).name))
        assert ours_usage.inodes > 0 and int(usage_rows[chain_id][-1]) == ours_usage.inodes

    # prepare/rm through ctr reach the daemon; a parent with children cannot be removed.
    ctr_snapshots(lz_containerd, "prepare", "scratch", top)
    assert backend_name(lazysnap, "scratch").kind == pb.ACTIVE
    refused = lz_containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", top, check=False)
    assert refused.returncode != 0
    ctr_snapshots(lz_containerd, "rm", "scratch")  # containerd's GC then removes it from the backend
    assert wait_until(lambda: not [i for i in backend_infos(lazysnap) if i.name.endswith("/scratch")])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_daemon_restart_keeps_snapshots_usable(
    plain_stack: tuple[LazysnapDaemon, Containerd], base_image: PushedImage, sig: int
) -> None:
    lazysnap, lz_containerd = plain_stack
    ref = base_image.ref
    lz_containerd.pull(ref, snapshotter=SNAPSHOTTER)
    before = sorted(
        (i.name, i.parent, i.kind, dict(i.labels).items().__repr__()) for i in backend_infos(lazysnap)
    )
    ctr_before = ctr_snapshots(lz_containerd, "ls")

    lazysnap.stop(sig)
    lazysnap.start()
    # containerd keeps running. After a crash its gRPC channel saw the connection refused and
    # backs off before redialling, so the first calls may fail with UNAVAILABLE for a moment.
    assert wait_until(
        lambda: (
            lz_containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", check=False).returncode == 0
        )
    ), lazysnap.log_tail()

    after = sorted(
        (i.name, i.parent, i.kind, dict(i.labels).items().__repr__()) for i in backend_infos(lazysnap)
    )
    assert after == before
    assert ctr_snapshots(lz_containerd, "ls") == ctr_before
    assert run_in_container(lz_containerd, ref, "/bin/cat", "/etc/motd", snapshotter=SNAPSHOTTER) == (
        "motd from layer 2\n"
    )
