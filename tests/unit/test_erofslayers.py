"""The EROFS backend's stored blob layouts: a mounted image points into the layout its blob was
mounted with, so a successor (maybe a newer version, planning differently) must serve that one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from snapshotter.erofs.layout import BlobLayout, LayoutError, plan_layout
from snapshotter.erofslayers import ErofsLayers, LayerBlob, layout_from_record, layout_record
from snapshotter.formats.index import Entry, EntryType
from snapshotter.layertree import LayerTree
from tests.support.erofs import index_of

DIGEST = "sha256:" + "ab" * 32


def reg(name: str, size: int) -> Entry:
    return Entry(name, EntryType.REG, 0o644, size=size)


@pytest.fixture
def tree() -> LayerTree:
    return LayerTree(
        index_of(
            [
                reg("a", 5000),
                reg("b", 10),
                reg("empty", 0),
                Entry("hard", EntryType.HARDLINK, 0, link_name="a"),
                reg("c", 4096),
            ]
        )
    )


def placed(layout: BlobLayout) -> list[tuple[str, int, int]]:
    return [(f.entry.name, f.blob_offset, f.size) for f in layout.files]


def test_a_layout_survives_its_record(tree: LayerTree) -> None:
    layout = plan_layout(tree, order=["c", "hard"], separation=8192)
    back = layout_from_record(json.loads(json.dumps(layout_record(layout))), tree)
    assert placed(back) == placed(layout) == [("c", 0, 4096), ("a", 4096, 5000), ("b", 20480, 10)]
    assert (back.blob_size, back.block_size, back.prefetch_end) == (24576, 4096, 12288)
    assert back.find(tree.lookup("hard").entry) == back.files[1]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda d: d.update(format=2), "format 2"),
        (lambda d: d["files"].append(["missing", 40960]), "not a file of the layer"),
        (lambda d: d["files"].append(["empty", 40960]), "empty file"),
        (lambda d: d["files"][1].__setitem__(1, 100), "not a multiple"),
        (lambda d: d["files"][1].__setitem__(1, 0), "overlaps"),
        (lambda d: d.update(blob_size=4096), "beyond the blob"),
        (lambda d: d.pop("prefetch_end"), "malformed"),
        (lambda d: d["files"].append("a"), "malformed"),
    ],
)
def test_a_record_that_does_not_fit_the_layer_is_refused(
    tree: LayerTree, change: Callable[[dict[str, Any]], object], error: str
) -> None:
    doc = layout_record(plan_layout(tree))
    change(doc)
    with pytest.raises(LayoutError, match=error):
        layout_from_record(doc, tree)


def test_a_taken_over_mount_is_served_with_its_stored_layout(tmp_path: Path, tree: LayerTree) -> None:
    """The stored layout wins when taking a mount over (however this version would plan); a layer
    whose blob nobody serves gets this version's plan; an unreadable record is an error, never a
    guess."""
    layers = ErofsLayers(tmp_path)
    mounted_with = plan_layout(tree, order=["c"], separation=1 << 20)  # an earlier version's plan
    ours = plan_layout(tree, order=["c"], separation=128 << 10)
    assert placed(mounted_with) != placed(ours)
    layers.store_layout(DIGEST, mounted_with)

    assert placed(layers.blob_layout(DIGEST, tree, lambda: ours, adopting=True)) == placed(mounted_with)
    assert layers.blob_layout(DIGEST, tree, lambda: ours) is ours  # not served: planned anew
    layers.layout_path(DIGEST).write_text("{")
    with pytest.raises(LayoutError, match="unreadable"):
        layers.blob_layout(DIGEST, tree, lambda: ours, adopting=True)
    layers.layout_path(DIGEST).unlink()  # mounted by a version that stored none: our plan
    assert layers.blob_layout(DIGEST, tree, lambda: ours, adopting=True) is ours


def content(entry: Entry) -> bytes:
    return (entry.name.encode() * entry.size)[: entry.size]


class CachedReads:
    """What ``assemble`` asks of a layer reader: cached bytes of file ranges, or None."""

    def __init__(self, missing: str = "") -> None:
        self.missing = missing

    def read_cached(
        self, extents: list[tuple[Entry, int, int]], *, by_reader: bool = True
    ) -> list[bytes] | None:
        assert not by_reader  # copying the layer must not look like a reader streaming a file
        if any(e.name == self.missing for e, _, _ in extents):
            return None
        return [content(e)[off : off + n] for e, off, n in extents]


def test_a_complete_layer_is_assembled_into_a_sparse_local_blob(tmp_path: Path, tree: LayerTree) -> None:
    layers = ErofsLayers(tmp_path)
    layout = plan_layout(tree, order=["c"], separation=1 << 20)
    assert layers.local_blob(DIGEST, layout) is None
    assert layers.assemble(DIGEST, layout, CachedReads())  # type: ignore[arg-type]
    path = layers.local_blob(DIGEST, layout)
    assert path == layers.local_blob_path(DIGEST)
    data = path.read_bytes()
    assert len(data) == layout.blob_size
    expected = bytearray(layout.blob_size)  # holes read as zeros
    for f in layout.files:
        expected[f.blob_offset : f.blob_offset + f.size] = content(f.entry)
    assert data == expected
    # The 1 MiB hole after the prefetched file takes no disk.
    assert layers.local_blob_bytes() == path.stat().st_blocks * 512 < layout.blob_size // 2

    blob = LayerBlob(layout, None, on_first_read=None)  # type: ignore[arg-type]
    blob.local_path = path  # reads come from the file, not the reader
    assert blob.read(layout.files[1].blob_offset, 100) == content(layout.files[1].entry)[:100]
    layers.remove_local_blob(DIGEST)
    assert layers.local_blob(DIGEST, layout) is None and layers.local_blob_bytes() == 0


def test_a_layer_with_a_chunk_gone_is_not_assembled(tmp_path: Path, tree: LayerTree) -> None:
    layers = ErofsLayers(tmp_path)
    layout = plan_layout(tree)
    assert not layers.assemble(DIGEST, layout, CachedReads(missing="c"))  # type: ignore[arg-type]
    assert list(layers.images.iterdir()) == []  # no blob, no temporary left behind
    # A blob of another layout's size (an earlier layout of the layer) is not used.
    layers.local_blob_path(DIGEST).write_bytes(b"x" * (layout.blob_size + 4096))
    assert layers.local_blob(DIGEST, layout) is None
