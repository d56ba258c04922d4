"""The eager fallback end to end: plain images (gzip, zstd and uncompressed layers nobody
converted) pulled with `ctr-remote image rpull` through real containerd into lazysnap with
``[fallback] mode = "eager"``, each layer unpacked by lazysnap and handed over through the
remote-snapshot handshake, compared layer by layer with containerd's own overlayfs unpack.

The test image exercises what containerd's applier does: whiteouts and opaque directories in
overlay layers and in the first layer, hard links, symlinks, devices, FIFOs, xattrs (``trusted.*``
from the archive ignored), setuid and sticky modes, owners, nanosecond mtimes, long names (PAX and
GNU), a name climbing out of the root, directories the tar does not list (with a lower layer's
attributes copied up), a multi-member gzip layer, a zstd layer and an uncompressed one.
"""

from __future__ import annotations

import io
import json
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.fetcher import Descriptor
from snapshotter.image import OciLayout, image_config
from tests.e2e.conftest import LazysnapStack
from tests.support import oci
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon
from tests.support.faults import FaultProxy
from tests.support.lazy import wait_until
from tests.support.scratch import tmpdir
from tests.support.services import (
    Containerd,
    CtrError,
    Registry,
    require_privileges,
    run_in_container,
)
from tests.support.treecompare import differences, listed_dirs, tree

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
MTIME = 1577836800
BIG = oci.pseudo_random(3 << 20, b"eager-big")  # several fetch pieces, incompressible
LONG_PAX = "data/" + "p" * 120 + "/leaf.txt"
LONG_GNU = "data/" + "g" * 120 + ".txt"
EAGER = {"fallback": {"mode": "eager", "unclaimed_seconds": 2.0}, "fetch": {"max_retries": 1}}


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, uid: int = 0, gid: int = 0
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    info.mtime = MTIME
    return info


class _Tar:
    """A layer tar written entry by entry in one of tarfile's formats."""

    def __init__(self, fmt: int) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=fmt)  # noqa: SIM115 - closed in bytes()

    def add(self, info: tarfile.TarInfo, data: bytes = b"", **pax: str) -> None:
        if pax:
            info.pax_headers = dict(pax)
        info.size = len(data) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        self.tar.addfile(info, io.BytesIO(data) if data else None)

    def file(self, name: str, data: bytes, **kw: int) -> None:
        self.add(_info(name, **kw), data)

    def dir(self, name: str, **kw: int) -> None:
        self.add(_info(name, tarfile.DIRTYPE, **{"mode": 0o755, **kw}))

    def link(self, name: str, target: str, kind: bytes = tarfile.SYMTYPE, **kw: int) -> None:
        info = _info(name, kind, **{"mode": 0o777, **kw})
        info.linkname = target
        self.add(info)

    def device(self, name: str, kind: bytes, major: int, minor: int, mode: int) -> None:
        info = _info(name, kind, mode=mode)
        info.devmajor, info.devminor = major, minor
        self.add(info)

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def layer_one() -> bytes:
    t = _Tar(tarfile.PAX_FORMAT)
    t.dir("bin")
    t.file("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    for applet in ("sh", "cat", "ls"):
        t.link(f"bin/{applet}", "busybox")
    t.dir("etc")
    t.file("etc/motd", b"motd from layer 1\n")
    t.file("etc/passwd", b"root:x:0:0::/:/bin/sh\n")
    t.add(_info("data", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000), **{"mtime": "1577836800.123456789"})
    t.add(
        _info("data/file.txt", uid=1000, gid=1000),
        b"hello eager\n",
        **{"SCHILY.xattr.user.test": "abc", "SCHILY.xattr.trusted.ignored": "x", "mtime": "1600000000.5"},
    )
    t.file("data/setuid", b"#!/bin/sh\n", mode=0o4755)
    t.dir("data/sticky", mode=0o1777)
    t.file("data/big.bin", BIG)
    t.file("data/hard1", b"linked\n", mode=0o600, uid=3, gid=4)
    t.link("data/hard2", "data/hard1", tarfile.LNKTYPE, mode=0o600, uid=3, gid=4)
    t.link("data/sym", "file.txt", uid=5, gid=5)
    t.file("data/gone.txt", b"removed by layer 2\n")
    t.dir("data/olddir")
    t.file("data/olddir/a", b"a\n")
    t.file("data/replaced", b"a file in layer 1, a directory in layer 2\n")
    t.file("data/tempfile", b"removed by a whiteout in the same (first) layer\n")
    t.file("data/.wh.tempfile", b"")
    t.file(LONG_PAX, b"long pax name\n")
    t.file("deep/implicit/child.txt", b"parents not listed\n")
    t.file("../escape.txt", b"confined to the root\n")
    t.dir("dev")
    t.device("dev/null", tarfile.CHRTYPE, 1, 3, 0o666)
    t.device("dev/loop9", tarfile.BLKTYPE, 7, 9, 0o660)
    t.device("dev/fifo", tarfile.FIFOTYPE, 0, 0, 0o600)
    t.add(_info("lower", tarfile.DIRTYPE, mode=0o755))
    t.add(_info("lower/keep", tarfile.DIRTYPE, mode=0o700, uid=7, gid=7), **{"SCHILY.xattr.user.lower": "1"})
    return t.bytes()


def layer_two() -> bytes:
    t = _Tar(tarfile.GNU_FORMAT)
    t.dir("data", mode=0o750, uid=1000, gid=1000)
    t.file("data/.wh.gone.txt", b"")
    t.file("data/.wh.never-existed", b"")
    t.file("data/olddir/.wh..wh..opq", b"")
    t.file("data/olddir/new", b"new in layer 2\n")
    t.dir("data/replaced", mode=0o711)
    t.file(LONG_GNU, b"long gnu name\n")
    t.file("lower/keep/sub/file", b"below two directories the tar does not list\n")
    t.file("etc/motd", b"motd from layer 2\n")
    return t.bytes()


def layer_three() -> bytes:
    t = _Tar(tarfile.USTAR_FORMAT)
    t.dir("etc")
    t.file("etc/.wh..wh..opq", b"")
    t.file("etc/motd", b"motd from layer 3\n")
    t.link("data/hard3", "data/hard1", tarfile.SYMTYPE)
    return t.bytes()


def gzip_two_members(raw: bytes) -> bytes:
    cut = len(raw) // 3
    return oci.gzip_bytes(raw[:cut]) + oci.gzip_bytes(raw[cut:])


@dataclass(frozen=True)
class EagerImage:
    repo_tag: str
    layout: Path
    layer_tars: tuple[bytes, ...]
    chain_ids: tuple[str, ...]
    layer_digests: tuple[str, ...]


def build_image(
    workdir: Path, registry: Registry, repo: str, *, wrong_diff_id: int | None = None
) -> EagerImage:
    """The three-layer test image pushed as ``repo:1`` (with the DiffID of layer
    ``wrong_diff_id`` replaced by a wrong one, if given)."""
    tars = (layer_one(), layer_two(), layer_three())
    blobs = (
        (gzip_two_members(tars[0]), oci.MEDIA_TYPE_LAYER_GZIP),
        (zstandard.ZstdCompressor().compress(tars[1]), OCI_TAR + "+zstd"),
        (tars[2], OCI_TAR),
    )
    layout = OciLayout(workdir / repo.replace("/", "_"))
    layout.create()
    descriptors = [Descriptor(media, layout.write_blob(blob), len(blob)) for blob, media in blobs]
    diff_ids = [oci.sha256_digest(raw) for raw in tars]
    if wrong_diff_id is not None:
        diff_ids[wrong_diff_id] = oci.sha256_digest(b"not this layer")
    config = image_config(diff_ids, env=["PATH=/bin"], cmd=["/bin/sh"], created_by="eager test")
    layout.write_image(config, descriptors, tag="1")
    oci.push(layout.path, "1", registry.host, repo)
    return EagerImage(
        f"{repo}:1",
        layout.path,
        tars,
        tuple(oci.chain_ids(diff_ids)),
        tuple(d.digest for d in descriptors),
    )


@pytest.fixture(scope="module")
def images(registry: Registry) -> Iterator[dict[str, EagerImage]]:
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    with tmpdir() as workdir:
        yield {
            "good": build_image(workdir, registry, "lztest/eager"),
            "bad-diff-id": build_image(workdir, registry, "lztest/eager-bad", wrong_diff_id=1),
        }


def layer_dirs(cd: Containerd, snapshotter: str, top: str) -> list[Path]:
    """The directories of ``top``'s layers, bottom first, as the snapshotter mounts them."""
    key = f"view-{top[7:19]}"
    out = cd.ctr("snapshots", "--snapshotter", snapshotter, "view", "--mounts", key, top).stdout
    cd.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, check=False)  # GC may have been first
    (mount,) = json.loads(out)
    options = mount.get("options") or mount.get("Options") or []
    lower = next((o.removeprefix("lowerdir=") for o in options if o.startswith("lowerdir=")), None)
    if lower is None:  # one layer: a bind mount of its directory
        return [Path(mount.get("source") or mount["Source"])]
    return [Path(p) for p in reversed(lower.split(":"))]


def reference_layers(containerd: Containerd, ref: str, top: str) -> list[Path]:
    """containerd's own unpack (overlayfs snapshotter) of ``ref``: each layer's directory."""
    containerd.pull(ref)
    return layer_dirs(containerd, "overlayfs", top)


def committed(daemon: LazysnapDaemon) -> list[pb.Info]:
    infos = [i for batch in daemon.stub.List(pb.ListSnapshotsRequest()) for i in batch.info]
    return [i for i in infos if i.kind == pb.COMMITTED]


def test_rpull_unpacks_every_layer_as_containerd_does(
    images: dict[str, EagerImage], registry: Registry, lazysnap_stack: LazysnapStack, containerd: Containerd
) -> None:
    image = images["good"]
    ref = f"{registry.host}/{image.repo_tag}"
    daemon, cd = lazysnap_stack(**EAGER)
    cd.rpull(ref)
    stats = daemon.stats()
    assert stats["eager"]["fills"] == 3, (stats, daemon.log_tail())
    assert stats["lazy_mounts"] == 0 and not stats["not_lazy"], stats
    infos = committed(daemon)
    assert len(infos) == 3 and not any("containerd.io/snapshot/remote" in i.labels for i in infos)

    ours = layer_dirs(cd, SNAPSHOTTER, image.chain_ids[-1])
    theirs = reference_layers(containerd, ref, image.chain_ids[-1])
    for n, (mine, other, raw) in enumerate(zip(ours, theirs, image.layer_tars, strict=True)):
        assert differences(mine, other, listed_dirs(raw)) == [], f"layer {n + 1}"
    assert not any((daemon.root / "eager").iterdir())  # nothing staged is left
    # What was compared is what the test image is about (not, say, two empty directories).
    first, second = tree(ours[0]), tree(ours[1])
    assert first["dev/null"]["rdev"] == (1, 3) and first["data/file.txt"]["xattrs"] == {"user.test": b"abc"}
    assert first["escape.txt"]["sha256"] and "data/tempfile" not in first
    assert first["data/hard2"]["links"] == ["data/hard1", "data/hard2"]
    assert stat.S_ISCHR(second["data/gone.txt"]["type"]) and second["data/gone.txt"]["rdev"] == (0, 0)
    assert second["data/olddir"]["xattrs"] == {"trusted.overlay.opaque": b"y"}
    assert second["lower/keep"]["owner"] == (7, 7) and second["lower/keep"]["mode"] == 0o700

    # A container runs on the filled layers: what it sees is the merged tree.
    out = run_in_container(cd, ref, "/bin/cat", "/etc/motd", "/data/file.txt", snapshotter=SNAPSHOTTER)
    assert out == "motd from layer 3\nhello eager\n"


def test_plain_pull_sends_no_labels_so_containerd_unpacks(
    images: dict[str, EagerImage], registry: Registry, lazysnap_stack: LazysnapStack
) -> None:
    """`ctr image pull` (containerd 1.6) unpacks without the remote-snapshot handshake (no target
    chain label, no image reference): lazysnap is never asked, containerd unpacks every layer."""
    image = images["good"]
    daemon, cd = lazysnap_stack(**EAGER)
    cd.pull(f"{registry.host}/{image.repo_tag}", snapshotter=SNAPSHOTTER)
    stats = daemon.stats()
    assert stats["eager"]["fills"] == 0 and stats["lazy_mounts"] == 0 and stats["not_lazy"] == {}, stats
    assert len(committed(daemon)) == 3


def test_registry_failing_on_one_layer_leaves_it_to_containerd(
    images: dict[str, EagerImage], registry: Registry, lazysnap_stack: LazysnapStack, containerd: Containerd
) -> None:
    """lazysnap's requests for the middle layer's blob are cut mid-body: that layer is unpacked by
    containerd itself (its own requests pass), the other two by lazysnap; the image is whole."""
    image = images["good"]
    with FaultProxy(registry.host, target_user_agent="lazysnap/") as faults:
        faults.path_contains = image.layer_digests[1]
        faults.fail_all("reset")
        ref = f"{faults.host}/{image.repo_tag}"
        daemon, cd = lazysnap_stack(**EAGER)
        cd.rpull(ref)
        stats = daemon.stats()
        assert stats["eager"]["fills"] == 2 and stats["not_lazy"] == {"eager-fetch-failed": 1}, stats
        assert "eager-fetch-failed" in daemon.log_path.read_text()
        assert faults.counts()["faults"].get("reset", 0) > 0
        ours = layer_dirs(cd, SNAPSHOTTER, image.chain_ids[-1])
        theirs = reference_layers(containerd, f"{registry.host}/{image.repo_tag}", image.chain_ids[-1])
        for n, (mine, other, raw) in enumerate(zip(ours, theirs, image.layer_tars, strict=True)):
            assert differences(mine, other, listed_dirs(raw)) == [], f"layer {n + 1}"
        assert wait_until(lambda: not any((daemon.root / "eager").iterdir()))


def test_wrong_diff_id_fails_the_layer_and_leaves_nothing(
    images: dict[str, EagerImage], registry: Registry, lazysnap_stack: LazysnapStack
) -> None:
    """Layer 2's DiffID in the config is wrong: lazysnap refuses it after unpacking
    (eager-diffid-mismatch), containerd then refuses it too and the pull fails with its reason;
    no snapshot of layer 2 or above exists and nothing staged or half-filled stays."""
    image = images["bad-diff-id"]
    ref = f"{registry.host}/{image.repo_tag}"
    daemon, cd = lazysnap_stack(**EAGER)
    with pytest.raises(CtrError, match="wrong diff id calculated on extraction"):
        cd.rpull(ref)
    stats = daemon.stats()
    assert stats["not_lazy"] == {"eager-diffid-mismatch": 1}, stats
    log = daemon.log_path.read_text()
    assert "eager-diffid-mismatch" in log and image.layer_digests[1] in log
    names = [i.name for i in committed(daemon)]  # (containerd's aborted extraction is not committed)
    assert not [n for n in names if n.endswith((image.chain_ids[1], image.chain_ids[2]))], names
    # Layer 3 was unpacked ahead and is never asked for: it goes once unclaimed. containerd's
    # garbage collection then removes what the failed pull left (its extraction snapshot, and the
    # layer below that no image holds): every directory left belongs to a snapshot.
    assert wait_until(lambda: not any((daemon.root / "eager").iterdir()), timeout=30)

    def consistent() -> bool:
        infos = list(daemon.stub.List(pb.ListSnapshotsRequest()))
        count = sum(len(b.info) for b in infos)
        return len(list((daemon.root / "snapshots").iterdir())) == count

    assert wait_until(consistent, timeout=30)
