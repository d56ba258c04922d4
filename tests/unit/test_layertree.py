"""The presentation tree both backends share: links, whiteouts, opaque dirs, landmarks, xattrs."""

from __future__ import annotations

import stat
import sys

import pytest

from snapshotter.formats.index import Compression, Entry, EntryType, LayerIndex
from snapshotter.layertree import LayerTree, PathNotFoundError, presented_xattrs


def tree_of(*entries: Entry) -> LayerTree:
    by_name = {"": Entry("", EntryType.DIR, 0o755)}
    by_name.update({e.name: e for e in entries})
    return LayerTree(LayerIndex("estargz", Compression.GZIP, by_name))


def test_presentation_rules() -> None:
    tree = tree_of(
        Entry("etc", EntryType.DIR, 0o755, xattrs={"user.a": b"1", "trusted.overlay.redirect": b"/x"}),
        Entry("etc/conf", EntryType.REG, 0o4644, size=3, xattrs={"user.overlay.origin": b"o"}),
        Entry("etc/hard", EntryType.HARDLINK, 0, link_name="etc/conf"),
        Entry("etc/.wh.gone", EntryType.REG, 0o644),
        Entry("etc/.wh..wh..opq", EntryType.REG, 0o644),
        *(Entry(f"etc/.wh.{hidden}", EntryType.REG, 0o644) for hidden in ("", ".", "..")),
        Entry(".prefetch.landmark", EntryType.REG, 0o644, size=1),
        Entry("deep/.prefetch.landmark", EntryType.REG, 0o644, size=1),  # only the root's are hidden
    )
    assert sorted(tree.root.children) == ["deep", "etc"]
    etc = tree.lookup("/etc/")
    assert sorted(etc.children) == ["conf", "gone", "hard"]
    assert etc.opaque and presented_xattrs(etc) == {"user.a": b"1", "trusted.overlay.opaque": b"y"}
    conf = tree.lookup("etc/conf")
    assert tree.lookup("etc/hard") is conf and conf.nlink == 2
    assert conf.mode == stat.S_IFREG | 0o4644 and presented_xattrs(conf) == {}
    gone = tree.lookup("etc/gone")  # found by walking: whiteouts are only in their parent's children
    assert gone.whiteout and gone.mode == stat.S_IFCHR and gone.rdev == 0
    assert tree.lookup("deep/.prefetch.landmark").is_file
    assert tree.root.nlink == 4 and etc.nlink == 2
    with pytest.raises(PathNotFoundError):
        tree.lookup("etc/missing")


def test_a_chain_deeper_than_the_recursion_limit() -> None:
    depth = sys.getrecursionlimit() + 500
    names = ["/".join(["d"] * i) for i in range(1, depth + 1)]
    # Only the leaf is listed: every ancestor is synthesized, and links are counted, iteratively.
    tree = tree_of(Entry(names[-1] + "/f", EntryType.REG, 0o644))
    assert tree.lookup(names[-1] + "/f").is_file
    assert tree.lookup(names[0]).nlink == 3 and tree.lookup(names[-1]).nlink == 2
    explicit = tree_of(*(Entry(n, EntryType.DIR, 0o700) for n in names))
    assert sum(1 for _ in explicit.directories()) == depth + 1
    assert explicit.lookup(names[-1]).mode == stat.S_IFDIR | 0o700


def test_hardlink_to_a_directory_or_nothing_is_skipped() -> None:
    tree = tree_of(
        Entry("d", EntryType.DIR, 0o755),
        Entry("to-dir", EntryType.HARDLINK, 0, link_name="d"),
        Entry("to-none", EntryType.HARDLINK, 0, link_name="none"),
    )
    assert sorted(tree.root.children) == ["d"] and tree.lookup("d").nlink == 2
