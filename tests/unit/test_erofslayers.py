"""The EROFS backend's stored blob layouts: a mounted image points into the layout its blob was
mounted with, so a successor (maybe a newer version, planning differently) must serve that one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from snapshotter.erofs.layout import BlobLayout, LayoutError, plan_layout
from snapshotter.erofslayers import ErofsLayers, layout_from_record, layout_record
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
