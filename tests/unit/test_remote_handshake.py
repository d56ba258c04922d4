"""containerd's remote-snapshot handshake in the snapshotter, with a fake remote layer provider."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from snapshotter.contract import (
    REMOTE_LABEL,
    REMOTE_LABEL_VALUE,
    TARGET_REF_LABEL,
    NotLazyError,
    Served,
    layer_ref,
)
from snapshotter.errors import AlreadyExistsError, FailedPreconditionError, UnavailableError
from snapshotter.fetcher import AuthError, BlobNotFoundError, FetchError
from snapshotter.remote import fetch_failure_reason
from snapshotter.snapshots import Snapshotter
from snapshotter.store import Kind

LABELS = {
    "containerd.io/snapshot/remote/stargz.reference": "127.0.0.1:5000/app:1",
    "containerd.io/snapshot/remote/stargz.digest": "sha256:" + "1" * 64,
    "containerd.io/snapshot/stargz/toc.digest": "sha256:" + "2" * 64,
}


class FakeRemote:
    """Mounts by writing a marker file; ``refuse`` makes every layer fall back (or, with
    ``required``, fail as a Nydus-like layer does)."""

    def __init__(self, refuse: str = "", *, required: bool = False, fill: bool = False) -> None:
        self.refuse = refuse
        self.required = required
        self.fill = fill  # answer as the eager fallback: the directory filled, nothing mounted
        self.mounted: set[Path] = set()
        self.lowerdirs: list[list[Path]] = []
        self.healthy = True

    def mount(self, labels: Mapping[str, str], mountpoint: Path, lowerdirs: Sequence[Path] = ()) -> Served:
        if self.refuse:
            raise NotLazyError(self.refuse, "refused by the test", required=self.required)
        layer_ref(labels)
        self.lowerdirs.append(list(lowerdirs))
        if self.fill:
            (mountpoint / "unpacked").write_bytes(b"x" * 10000)
            return Served.FILLED
        (mountpoint / "lazy-marker").write_text(labels[TARGET_REF_LABEL])
        self.mounted.add(mountpoint)
        return Served.MOUNTED

    def check(self, mountpoint: Path) -> bool:
        return self.healthy and mountpoint in self.mounted

    def unmount(self, mountpoint: Path) -> None:
        self.mounted.discard(mountpoint)

    def forget_unused(self, digests_in_use: set[str]) -> None:
        self.in_use = digests_in_use


def snapshotter(tmp_path: Path, remote: FakeRemote) -> Snapshotter:
    return Snapshotter(tmp_path, remote=remote)  # type: ignore[arg-type]


def test_lazy_layer_is_committed_under_the_chain_id(tmp_path: Path) -> None:
    remote = FakeRemote()
    snap = snapshotter(tmp_path, remote)
    labels = {**LABELS, TARGET_REF_LABEL: "sha256:chain1"}
    with pytest.raises(AlreadyExistsError):
        snap.prepare("default/1/extract-1 sha256:chain1", "", labels)
    info = snap.stat("sha256:chain1")
    assert info.kind == Kind.COMMITTED and info.parent == ""
    assert info.labels == {**labels, REMOTE_LABEL: REMOTE_LABEL_VALUE}  # containerd matches on these
    assert [i.name for i in snap.infos()] == ["sha256:chain1"]  # the extract key is gone
    assert (snap.fs_path(info.id) / "lazy-marker").read_text() == "sha256:chain1"

    upper = {**LABELS, TARGET_REF_LABEL: "sha256:chain2"}
    with pytest.raises(AlreadyExistsError):
        snap.prepare("default/2/extract-2 sha256:chain2", "sha256:chain1", upper)
    assert snap.stat("sha256:chain2").parent == "sha256:chain1"
    with pytest.raises(AlreadyExistsError):  # the same layer again: answered from the store
        snap.prepare("default/3/extract-3 sha256:chain2", "sha256:chain1", upper)
    (mount,) = snap.prepare("container", "sha256:chain2", {})
    assert mount.type == "overlay"


def test_filled_layer_is_committed_as_a_plain_snapshot(tmp_path: Path) -> None:
    """The eager fallback filled the directory: committed under the chain ID without the remote
    label (nothing to mount again), with its usage, and containerd told it exists."""
    remote = FakeRemote(fill=True)
    snap = snapshotter(tmp_path, remote)
    first = {**LABELS, TARGET_REF_LABEL: "sha256:chain1"}
    second = {**LABELS, TARGET_REF_LABEL: "sha256:chain2"}
    with pytest.raises(AlreadyExistsError, match="unpacked by lazysnap"):
        snap.prepare("default/1/extract-1 sha256:chain1", "", first)
    with pytest.raises(AlreadyExistsError):
        snap.prepare("default/2/extract-2 sha256:chain2", "sha256:chain1", second)
    one, two = snap.stat("sha256:chain1"), snap.stat("sha256:chain2")
    assert one.kind == Kind.COMMITTED and one.labels == first and two.parent == "sha256:chain1"
    assert snap.usage("sha256:chain2").size >= 10000 and snap.usage("sha256:chain2").inodes == 2
    assert [i.name for i in snap.infos()] == ["sha256:chain1", "sha256:chain2"]
    assert remote.lowerdirs == [[], [snap.fs_path(one.id)]]  # the parent chain, nearest first
    assert snap.remote_snapshots() == 0
    (mount,) = snap.prepare("container", "sha256:chain2", {})
    assert mount.type == "overlay" and str(snap.fs_path(two.id)) in mount.options[-1]


def test_layer_that_cannot_be_lazy_is_prepared_normally(tmp_path: Path) -> None:
    snap = snapshotter(tmp_path, FakeRemote(refuse="no-toc-digest"))
    (mount,) = snap.prepare("extract", "", {**LABELS, TARGET_REF_LABEL: "sha256:chain1"})
    assert mount.type == "bind" and snap.stat("extract").kind == Kind.ACTIVE
    snap.commit("sha256:chain1", "extract", {})
    assert REMOTE_LABEL not in snap.stat("sha256:chain1").labels


def test_layer_only_lazysnap_reads_fails_prepare_with_the_reason(tmp_path: Path) -> None:
    """A Nydus-like layer cannot be unpacked by containerd: Prepare must say why it is not lazy
    instead of handing containerd a snapshot it would fail to fill with a vaguer error."""
    snap = snapshotter(tmp_path, FakeRemote("registry-unreachable", required=True))
    labels = {**LABELS, TARGET_REF_LABEL: "sha256:chain1"}
    with pytest.raises(
        FailedPreconditionError,
        match=r"sha256:1{64} is in a format only lazysnap reads.*registry-unreachable",
    ):
        snap.prepare("default/1/extract-1 sha256:chain1", "", labels)
    assert snap.infos() == []  # nothing left behind
    assert not any((tmp_path / "snapshots").iterdir())


def test_broken_lower_lazy_layer_is_unavailable(tmp_path: Path) -> None:
    remote = FakeRemote()
    snap = snapshotter(tmp_path, remote)
    with pytest.raises(AlreadyExistsError):
        snap.prepare("extract", "", {**LABELS, TARGET_REF_LABEL: "sha256:chain1"})
    remote.healthy = False
    remote.refuse = "registry-unreachable"
    with pytest.raises(UnavailableError, match="sha256:chain1"):
        snap.prepare("container", "sha256:chain1", {})
    assert [i.name for i in snap.infos()] == ["sha256:chain1"]  # the failed Prepare left nothing
    remote.refuse = ""  # registry back: mounted again on the next use
    remote.healthy = True
    assert snap.prepare("container", "sha256:chain1", {})


def test_restore_after_restart_mounts_every_lazy_layer(tmp_path: Path) -> None:
    first = snapshotter(tmp_path, FakeRemote())
    for i, parent in enumerate(["", "sha256:c0"]):
        with pytest.raises(AlreadyExistsError):
            first.prepare(f"extract{i}", parent, {**LABELS, TARGET_REF_LABEL: f"sha256:c{i}"})
    first.close()
    remote = FakeRemote()
    second = snapshotter(tmp_path, remote)
    second.restore_remote()
    assert remote.mounted == {second.fs_path(second.stat(f"sha256:c{i}").id) for i in range(2)}
    assert remote.in_use == {LABELS["containerd.io/snapshot/remote/stargz.digest"]}


def test_labels_and_reasons() -> None:
    with pytest.raises(NotLazyError) as info:
        layer_ref({TARGET_REF_LABEL: "sha256:x"})
    assert info.value.reason == "no-remote-labels"
    cri = {
        "containerd.io/snapshot/cri.image-ref": "docker.io/library/app:1",
        "containerd.io/snapshot/cri.layer-digest": "sha256:" + "3" * 64,
    }
    assert layer_ref(cri).reference == "docker.io/library/app:1"
    assert fetch_failure_reason(AuthError("401")) == "auth-failed"
    assert fetch_failure_reason(BlobNotFoundError("404")) == "not-found"
    assert fetch_failure_reason(FetchError("reset")) == "registry-unreachable"


@pytest.mark.parametrize(
    "digest",
    [
        "/etc/passwd",
        "sha256:../../../etc",
        "../x",
        "sha256:" + "A" * 64,
        "sha1:" + "a" * 40,
        "sha256:" + "a" * 65,
    ],
)
def test_a_layer_digest_label_that_is_not_a_digest_is_refused(digest: str) -> None:
    """The digest label becomes a file name under the root; nothing else may get that far."""
    with pytest.raises(NotLazyError) as info:
        layer_ref({**LABELS, "containerd.io/snapshot/remote/stargz.digest": digest})
    assert info.value.reason == "bad-labels"


def test_the_manifest_digest_containerd_pulled_is_kept() -> None:
    manifest = "sha256:" + "4" * 64
    labels = {**LABELS, "containerd.io/snapshot/cri.manifest-digest": manifest}
    assert layer_ref(labels).manifest_digest == manifest
    with pytest.raises(NotLazyError, match="bad-labels"):
        layer_ref({**LABELS, "containerd.io/snapshot/cri.manifest-digest": "sha256:nope"})
