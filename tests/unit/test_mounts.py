"""Removing snapshot directories: no recursion limit, no PATH_MAX, never through a mount; and a
snapshotter whose Remove and start-up cleanup survive what a container left behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from snapshotter.mounts import mount_type, remove_tree, unmount
from snapshotter.snapshots import Snapshotter
from tests.support.services import require_privileges

DEPTH = 3000  # far beyond Python's recursion limit (1000) and, with these names, PATH_MAX (4096)


def deep_chain(top: Path, depth: int = DEPTH) -> None:
    """A directory chain ``depth`` levels deep, built with relative paths as a container could."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            name = f"level-{i:05d}-" + "x" * 40
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            if i % 500 == 0:
                with open(os.open("file", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=child), "w") as fh:
                    fh.write("content")
                os.symlink("/etc/passwd", "link", dir_fd=child)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def test_a_chain_deeper_than_any_limit_is_removed(tmp_path: Path) -> None:
    top = tmp_path / "victim"
    top.mkdir()
    deep_chain(top)
    assert remove_tree(top) == []
    assert not top.exists()
    assert remove_tree(top) == []  # gone already: fine


def test_symlinks_are_removed_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    top = tmp_path / "victim"
    top.mkdir()
    (top / "dirlink").symlink_to(outside)
    assert remove_tree(top) == []
    assert (outside / "keep").read_text() == "keep"


def test_a_mount_inside_is_neither_entered_nor_removed(tmp_path: Path) -> None:
    require_privileges(binaries=())
    top = tmp_path / "victim"
    inner = top / "a" / "mnt"
    inner.mkdir(parents=True)
    (top / "a" / "file").write_text("x")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    try:
        (inner / "precious").write_text("still here")
        assert remove_tree(top) == ["mnt"]
        assert (inner / "precious").read_text() == "still here"
        assert not (top / "a" / "file").exists()
    finally:
        while mount_type(inner) is not None:
            unmount(inner)
    assert remove_tree(top) == []
    assert not top.exists()


def test_remove_of_a_snapshot_holding_a_deep_chain(tmp_path: Path) -> None:
    """A container that nests directories thousands deep in its writable layer must not make
    Remove (or the cleanup at every start) fail — that was a crash loop."""
    snap = Snapshotter(tmp_path)
    snap.prepare("active", "", {})
    sid = snap.stat("active").id
    deep_chain(snap.fs_path(sid))
    snap.remove("active")
    assert list((tmp_path / "snapshots").iterdir()) == []
    snap.close()


def test_cleanup_at_start_survives_a_directory_it_cannot_remove(tmp_path: Path) -> None:
    require_privileges(binaries=())
    snap = Snapshotter(tmp_path)
    stuck = tmp_path / "snapshots" / "rm-7" / "fs" / "sub"
    stuck.mkdir(parents=True)
    deep = tmp_path / "snapshots" / "rm-8"
    deep.mkdir()
    deep_chain(deep, 1500)
    # Something mounted deep inside that lazysnap did not mount: never deleted through.
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(stuck)], check=True)
    try:
        (stuck / "precious").write_text("x")
        removed = snap.cleanup()  # logs, does not raise
        assert removed == [deep]
        assert (stuck / "precious").exists()
    finally:
        while mount_type(stuck) is not None:
            unmount(stuck)
    assert snap.cleanup() == [tmp_path / "snapshots" / "rm-7"]
    snap.close()


@pytest.mark.parametrize("depth", [1, 2])
def test_remove_tree_of_small_trees(tmp_path: Path, depth: int) -> None:
    top = tmp_path / "t"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "f").write_text("x")
    deep_chain(top / "a" / "b", depth)
    assert remove_tree(top) == []
    assert not top.exists()
