"""``lazysnap convert`` end to end: images it converts are pulled lazily by lazysnap in a real
containerd and must show exactly the tree containerd's overlayfs snapshotter unpacks from the
original; its eStargz TOCs equal ``ctr-remote``'s for the same layers.

The image is the standard test image (whiteouts, an opaque directory, hard and symbolic links,
modes, owners, a file over several chunks) plus a layer whose file and directory carry xattrs.
Both images are mounted on the host (a view of each one's top snapshot) and compared path by
path: type, mode, owner, size, mtime, link target, content, ``user.*`` xattrs and hard-link
groups; the converted one is also checked from inside a container. The nydus case needs the
daemon's nydus reader (``snapshotter/remote.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapshotter import cli
from snapshotter.formats import UNCOMPRESSED_SIZE_ANNOTATION
from tests.e2e.conftest import ContainerdFactory
from tests.support import oci
from tests.support.converted import (
    PRIORITIZED,
    TUNED_CHUNK_SIZE,
    ctr_bytes,
    ctr_remote_convert,
    read_image,
    read_toc,
    toc_stream_count,
    toc_without_offsets,
)
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon
from tests.support.oci import PushedImage
from tests.support.scratch import make_tmpdir, remove_tmpdir
from tests.support.services import Containerd, Registry, require_privileges, verify_container_fs

REPO = "lztest/convert"
XATTRS = {"SCHILY.xattr.user.lazysnap.origin": "converted", "SCHILY.xattr.user.note": "a b=c"}
FORMATS = ["estargz", "zstdchunked", "nydus"]

TreeEntry = tuple[Any, ...]


def _with_xattrs(raw: bytes) -> oci.EncodedLayer:
    """gzip the layer; in the xattr layer, give ``/data/xattrs`` and its file PAX xattrs."""
    if b"xattr.txt" not in raw:
        return oci.gzip_layer(raw)
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
    ):
        for info in src:
            if info.name.startswith("data/xattrs"):
                info.pax_headers = dict(XATTRS)
            dst.addfile(info, src.extractfile(info) if info.isreg() else None)
    tar = out.getvalue()
    return oci.EncodedLayer(oci.gzip_bytes(tar), diff_id=oci.sha256_digest(tar))


@dataclass(frozen=True)
class Converted:
    source: str  # the original (gzip) image, HOST/REPO:src
    refs: dict[str, str]  # format -> converted image reference
    expected: dict[str, oci.Node]
    diff_ids: list[str]  # the original's


@pytest.fixture(scope="module")
def converted(registry: Registry) -> Iterator[Converted]:
    require_privileges()
    workdir = make_tmpdir()
    try:
        spec = oci.test_image_layers()
        extra = (oci.Dir("/data"), oci.Dir("/data/xattrs"), oci.File("/data/xattrs/xattr.txt", b"tagged\n"))
        layers = (*spec.layers, extra)
        image = oci.build_layout(
            workdir / "layout", layers, tag="src", cmd=list(spec.cmd), encode=_with_xattrs
        )
        source = oci.push(image.layout_dir, "src", registry.host, REPO)
        refs = {}
        for fmt in ("estargz", "zstdchunked", "nydus"):
            refs[fmt] = f"{registry.host}/{REPO}:{fmt}"
            args = ["convert", source, refs[fmt], "--format", fmt, "--chunk-size", "256K", "-q"]
            assert cli.main(args) == 0, fmt
        yield Converted(source, refs, oci.apply_layers(layers), image.diff_ids)
    finally:
        remove_tmpdir(workdir)


def tree(root: Path) -> tuple[dict[str, TreeEntry], list[list[str]]]:
    """Every path below ``root`` with its attributes, and the groups of hard-linked files."""
    entries: dict[str, TreeEntry] = {}
    # Files of different lower filesystems may share an inode number: (st_dev, st_ino) is unique.
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = "/" + str(path.relative_to(root))
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(kind):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            else:
                content = os.readlink(path) if stat.S_ISLNK(kind) else ""
            xattrs = {
                key: os.getxattr(path, key, follow_symlinks=False)
                for key in os.listxattr(path, follow_symlinks=False)
                if key.startswith("user.")
            }
            size = st.st_size if stat.S_ISREG(kind) else 0
            mode = stat.S_IMODE(st.st_mode)
            entries[rel] = (kind, mode, st.st_uid, st.st_gid, size, int(st.st_mtime), content, xattrs)
    return entries, sorted(sorted(group) for group in inodes.values() if len(group) > 1)


def mounted_tree(
    cd: Containerd, snapshotter: str, chain_id: str, target: Path
) -> tuple[dict[str, TreeEntry], list[list[str]]]:
    """The tree of the committed snapshot ``chain_id``, through a view mounted at ``target``.

    (``ctr image mount`` would do, but containerd 1.6 re-unpacks lazily pulled images there.)
    """
    key = f"view-{target.name}"
    # The view's mounts come with its creation: nothing references the view, so containerd's GC
    # may remove it at any time (its committed parents, which the mount uses, stay).
    view = cd.ctr("snapshots", "--snapshotter", snapshotter, "view", "--mounts", key, chain_id).stdout
    (mount,) = json.loads(view)
    target.mkdir()
    options = ",".join(mount["Options"])
    subprocess.run(["mount", "-t", mount["Type"], mount["Source"], str(target), "-o", options], check=True)
    try:
        return tree(target)
    finally:
        subprocess.run(["umount", str(target)], check=True)
        cd.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, check=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_converted_image_pulls_lazily_and_matches_the_original(
    converted: Converted, lazy_stack: tuple[LazysnapDaemon, Containerd], fmt: str
) -> None:
    daemon, cd = lazy_stack
    ref = converted.refs[fmt]
    cd.rpull(ref)
    st = daemon.stats()
    assert st["lazy_mounts"] == 4, st
    assert verify_container_fs(cd, ref, converted.expected, snapshotter=SNAPSHOTTER) == []

    cd.pull(converted.source)  # the original, unpacked by containerd's overlayfs snapshotter
    workdir = make_tmpdir()
    try:
        source_top = oci.chain_ids(converted.diff_ids)[-1]
        want, want_links = mounted_tree(cd, "overlayfs", source_top, workdir / "original")
        lazy_top = oci.chain_ids(read_image(ref)[1]["rootfs"]["diff_ids"])[-1]
        got, got_links = mounted_tree(cd, SNAPSHOTTER, lazy_top, workdir / "lazy")
    finally:
        remove_tmpdir(workdir)
    assert want["/data/xattrs/xattr.txt"][-1] == {"user.lazysnap.origin": b"converted", "user.note": b"a b=c"}
    assert want["/data/hardlink.txt"][-2] == want["/data/orig.txt"][-2]  # the comparison sees content
    differences = [
        f"{path}: {got.get(path)} != {want.get(path)}"
        for path in sorted(set(want) | set(got))
        if got.get(path) != want.get(path)
    ]
    assert differences == []
    assert got_links == want_links == [["/data/hardlink.txt", "/data/orig.txt"]]
    layers = daemon.stats()["layers"]
    assert isinstance(layers, dict) and all(layer["verify_failures"] == 0 for layer in layers.values())


@pytest.mark.parametrize("tuned", [False, True], ids=["defaults", "chunked-prioritized"])
def test_estargz_toc_equals_ctr_remote(
    registry: Registry,
    base_image: PushedImage,
    containerd_factory: ContainerdFactory,
    tuned: bool,
    tmp_path: Path,
) -> None:
    require_privileges(("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo", "runc"))
    cd = containerd_factory()
    cd.pull(base_image.ref)
    theirs = ctr_remote_convert(cd, base_image.ref, "estargz", tuned, tmp_path)  # tuned: writes record.json
    ours_ref = f"{registry.host}/lztest/base:lazysnap-estargz{'-tuned' if tuned else ''}"
    args = ["convert", base_image.ref, ours_ref, "--format", "estargz", "-q"]
    if tuned:  # the same chunk size, and ctr-remote's own record file as the prefetch list
        args += ["--chunk-size", str(TUNED_CHUNK_SIZE), "--prefetch-files", str(tmp_path / "record.json")]
        assert len(PRIORITIZED) == len((tmp_path / "record.json").read_text().splitlines())
    assert cli.main(args) == 0
    ours, _, blobs = read_image(ours_ref)
    assert len(ours["layers"]) == len(theirs["layers"]) == 3
    for our_desc, their_desc in zip(ours["layers"], theirs["layers"], strict=True):
        assert our_desc["mediaType"] == their_desc["mediaType"]
        their_blob = ctr_bytes(cd, "content", "get", their_desc["digest"])
        _, their_toc = read_toc(their_blob, their_desc["annotations"])
        _, our_toc = read_toc(blobs[our_desc["digest"]], our_desc["annotations"])
        # Identical but for compressed offsets (Go's deflate is not zlib): same entries, order,
        # attributes, chunking, digests and number of streams.
        assert toc_without_offsets(our_toc) == toc_without_offsets(their_toc)
        assert toc_stream_count(our_toc) == toc_stream_count(their_toc)
        assert set(our_desc["annotations"]) == set(their_desc["annotations"])
        key = UNCOMPRESSED_SIZE_ANNOTATION
        assert our_desc["annotations"][key] == their_desc["annotations"][key]
