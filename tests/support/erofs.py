"""Helpers for EROFS tests: write a layer's blob and metadata image, check them with fsck.erofs
(erofs-utils, the format's reference tools), and mount them so that they are always unmounted."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import strategies as st

from snapshotter.erofs.layout import BlobLayout, plan_layout
from snapshotter.erofs.mount import is_erofs_mountpoint, kernel_support, mount_erofs, unmount
from snapshotter.erofs.writer import build_metadata
from snapshotter.formats.index import Compression, Entry, EntryType, LayerIndex
from snapshotter.layertree import LayerTree, Node, presented_xattrs

# A newer fsck.erofs may be named here (e.g. one built from erofs-utils 1.6+, which also checks
# images with blocks smaller than 4 KiB); Debian 12's erofs-utils 1.5 handles 4 KiB blocks only.
FSCK = os.environ.get("LAZYSNAP_FSCK_EROFS", "fsck.erofs")

Contents = Callable[[Entry], bytes]
MTIME_NS = 1_700_000_000_000_000_000


def contents_of(entry: Entry) -> bytes:
    """Content derived from the name, so that any misplaced byte shows."""
    seed = entry.name.encode("utf-8", "surrogateescape")
    return (seed * (entry.size // max(len(seed), 1) + 1))[: entry.size]


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def require_kernel_erofs(*, loop: bool = False) -> None:
    """Skip (or, with ``CI=true``, fail) unless this kernel mounts EROFS with an extra device."""
    ok, why = kernel_support(loop=loop)
    if not ok:
        _skip_or_fail(why)


def require_fsck() -> None:
    """Skip (or, with ``CI=true``, fail) without fsck.erofs (Debian: erofs-utils)."""
    if shutil.which(FSCK) is None:
        _skip_or_fail(f"{FSCK} not found on PATH (install erofs-utils)")


def write_blob(path: Path, layout: BlobLayout, contents: Contents) -> None:
    """The data blob: each placed file's bytes at its offset, holes (sparse) elsewhere."""
    with open(path, "wb") as blob:
        blob.truncate(layout.blob_size)
        for placed in layout.files:
            data = contents(placed.entry)
            assert len(data) == placed.size, placed.entry.name
            blob.seek(placed.blob_offset)
            blob.write(data)


@dataclass(frozen=True)
class Image:
    meta: Path
    blob: Path
    tree: LayerTree
    layout: BlobLayout


def index_of(entries: Iterable[Entry], root: Entry | None = None) -> LayerIndex:
    by_name = {"": root or Entry("", EntryType.DIR, 0o755)}
    by_name.update({e.name: e for e in entries})
    return LayerIndex("estargz", Compression.GZIP, by_name)


def write_image(
    directory: Path,
    index: LayerIndex,
    contents: Contents,
    *,
    block_size: int = 4096,
    order: Iterable[str] = (),
    name: str = "layer",
) -> Image:
    """Write ``index``'s metadata image and blob into ``directory``."""
    tree = LayerTree(index)
    layout = plan_layout(tree, order, block_size)
    meta, blob = directory / f"{name}.erofs", directory / f"{name}.blob"
    meta.write_bytes(build_metadata(tree, layout))
    write_blob(blob, layout, contents)
    return Image(meta, blob, tree, layout)


@functools.cache
def fsck_supports(block_size: int) -> bool:
    """Whether this fsck.erofs checks images of ``block_size`` (1.5 knows 4 KiB blocks only)."""
    entries = [Entry("f", EntryType.REG, 0o644, size=1)]
    with tempfile.TemporaryDirectory() as directory:
        image = write_image(Path(directory), index_of(entries), lambda e: b"x", block_size=block_size)
        return fsck(image).returncode == 0


def fsck(image: Image) -> subprocess.CompletedProcess[str]:
    """fsck.erofs on the image with its blob as the extra device (silent and 0 when good)."""
    require_fsck()
    return subprocess.run(
        [FSCK, f"--device={image.blob}", str(image.meta)],
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=_raise_stack_limit,
    )


def _raise_stack_limit() -> None:
    # fsck.erofs walks directories recursively: a chain 3,000 deep overflows the default 8 MiB stack.
    _, hard = resource.getrlimit(resource.RLIMIT_STACK)
    resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))


def assert_fsck_accepts(image: Image) -> None:
    """fsck.erofs must accept the image, if it can check its block size at all."""
    if image.layout.block_size != 4096 and not fsck_supports(image.layout.block_size):
        return  # the kernel mount in the same test is the check; see FSCK above
    result = fsck(image)
    if "unable to fsck since the path is too long" in result.stderr:
        return  # newer fsck.erofs stops at PATH_MAX; 1.5 walks any depth (given the stack)
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def mounted(image: Image, target: Path, *, loop: bool = False) -> Iterator[Path]:
    """The image mounted on ``target`` for the ``with`` body, unmounted after it whatever happens."""
    target.mkdir(exist_ok=True)
    mount_erofs(image.meta, image.blob, target, loop=loop)
    try:
        yield target
    finally:
        unmount(target, lazy=False)
        assert not is_erofs_mountpoint(target)


def tree_mismatches(root: Path, tree: LayerTree, contents: Contents = contents_of) -> list[str]:
    """Differences between the EROFS mount at ``root`` and the tree it was written from: names,
    types, modes, owners, link counts, mtimes (ns), sizes, devices, symlink targets, hardlinks,
    xattrs of files and directories, file contents. Walks by directory descriptors, level by level,
    so that chains deeper than PATH_MAX and the recursion limit work."""
    problems: list[str] = []
    inodes: dict[Node, int] = {}
    level = [(os.open(root, os.O_RDONLY | os.O_DIRECTORY), "", tree.root)]
    while level:
        deeper: list[tuple[int, str, Node]] = []
        for fd, path, directory in level:
            try:
                listed = sorted(os.listdir(fd))
                if listed != sorted(directory.children):
                    problems.append(f"{path}/: lists {listed}, tree {sorted(directory.children)}")
                for name, node in directory.children.items():
                    problems += _node_mismatches(fd, f"{path}/{name}", name, node, inodes, contents, deeper)
            finally:
                os.close(fd)
        level = deeper
    return problems


def _node_mismatches(
    parent: int,
    path: str,
    name: str,
    node: Node,
    inodes: dict[Node, int],
    contents: Contents,
    deeper: list[tuple[int, str, Node]],
) -> list[str]:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError as exc:
        return [f"{path}: {exc.strerror}"]
    entry = node.entry
    got = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, st.st_rdev)
    want = (node.mode, entry.uid, entry.gid, node.nlink, entry.mtime_ns, node.rdev)
    problems = [] if got == want else [f"{path}: mode/uid/gid/nlink/mtime/rdev {got}, tree {want}"]
    if inodes.setdefault(node, st.st_ino) != st.st_ino:
        problems.append(f"{path}: inode {st.st_ino}, its hard link has {inodes[node]}")
    if node.kind == EntryType.SYMLINK and os.readlink(name, dir_fd=parent) != entry.link_name:
        problems.append(f"{path}: symlink to {os.readlink(name, dir_fd=parent)!r}, tree {entry.link_name!r}")
    if node.is_file or node.is_dir:
        fd = os.open(name, os.O_RDONLY | (os.O_DIRECTORY if node.is_dir else 0), dir_fd=parent)
        xattrs = {n: os.getxattr(fd, n) for n in os.listxattr(fd)}
        if xattrs != presented_xattrs(node):
            problems.append(f"{path}: xattrs {sorted(xattrs)}, tree {sorted(presented_xattrs(node))}")
        if node.is_dir:
            deeper.append((fd, path, node))
            return problems
        try:
            if st.st_size != entry.size or os.read(fd, entry.size + 1) != contents(entry):
                problems.append(f"{path}: content differs")
        finally:
            os.close(fd)
    return problems


_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=40
).filter(lambda n: n not in (".", "..") and not n.startswith(".wh.") and len(n.encode()) <= 255)
_xattrs = st.dictionaries(
    st.sampled_from(["user.a", "user.bb", "trusted.t", "security.s", "user." + "k" * 200]),
    st.binary(max_size=300),
    max_size=4,
)
_times = st.integers(-(10**18), 4 * 10**18)


@st.composite
def layer_indexes(draw: st.DrawFn) -> LayerIndex:
    """Trees of directories, files, symlinks, hardlinks, devices, fifos, whiteouts, opaque dirs."""
    dirs = [""]
    files: list[str] = []
    entries: list[Entry] = []
    taken: set[str] = {""}
    for _ in range(draw(st.integers(0, 40))):
        parent = draw(st.sampled_from(dirs))
        name = f"{parent}/{draw(_names)}".lstrip("/")
        if name in taken:
            continue
        taken.add(name)
        kind = draw(
            st.sampled_from(
                ["dir", "reg", "reg", "symlink", "hardlink", "char", "fifo", "whiteout", "opaque"]
            )
        )
        attrs = {
            "uid": draw(st.sampled_from([0, 1000, 65535, 65536, 4_000_000_000])),  # 2**32-1 is "no uid"
            "gid": draw(st.sampled_from([0, 1000, 70000])),
            "mtime_ns": draw(st.sampled_from([MTIME_NS, 0]) | _times),
            "xattrs": draw(_xattrs),
        }
        if kind == "dir":
            entries.append(Entry(name, EntryType.DIR, draw(st.integers(0, 0o7777)), **attrs))  # type: ignore[arg-type]
            dirs.append(name)
        elif kind == "reg":
            entries.append(Entry(name, EntryType.REG, 0o644, size=draw(st.integers(0, 20_000)), **attrs))  # type: ignore[arg-type]
            files.append(name)
        elif kind == "symlink":
            target = draw(st.text(min_size=1, max_size=600).filter(lambda t: "\0" not in t))
            entries.append(Entry(name, EntryType.SYMLINK, 0o777, link_name=target, **attrs))  # type: ignore[arg-type]
        elif kind == "hardlink" and files:
            entries.append(Entry(name, EntryType.HARDLINK, 0, link_name=draw(st.sampled_from(files))))
        elif kind == "char":
            major, minor = draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1))
            entries.append(Entry(name, EntryType.CHAR, 0o600, dev_major=major, dev_minor=minor, **attrs))  # type: ignore[arg-type]
        elif kind == "fifo":
            entries.append(Entry(name, EntryType.FIFO, 0o600, **attrs))  # type: ignore[arg-type]
        elif kind == "whiteout":
            entries.append(Entry(f"{parent}/.wh.{draw(_names)}".lstrip("/"), EntryType.REG, 0o644))
        elif kind == "opaque" and parent:
            entries.append(Entry(f"{parent}/.wh..wh..opq", EntryType.REG, 0o644))
    return index_of(entries, Entry("", EntryType.DIR, 0o755, mtime_ns=draw(_times)))
