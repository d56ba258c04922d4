"""Blob layout: which file lies where in a layer's data blob, and which files cover a blob range."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.erofs.layout import BlobLayout, LayoutError, plan_layout
from snapshotter.formats.index import Entry, EntryType
from snapshotter.layertree import LayerTree
from tests.support.erofs import index_of


def reg(name: str, size: int) -> Entry:
    return Entry(name, EntryType.REG, 0o644, size=size)


def tree_of(*entries: Entry) -> LayerTree:
    return LayerTree(index_of(entries))


def test_prioritized_files_first_then_index_order_block_aligned() -> None:
    tree = tree_of(
        reg("a", 5000),
        reg("b", 10),
        reg("empty", 0),
        Entry("hard", EntryType.HARDLINK, 0, link_name="a"),
        reg("c", 4096),
        reg(".wh.gone", 0),
    )
    layout = plan_layout(tree, order=["/c", "hard", "missing", "c"], block_size=4096)
    assert [(f.entry.name, f.blob_offset, f.size) for f in layout.files] == [
        ("c", 0, 4096),
        ("a", 4096, 5000),  # "hard" names a's content: placed once, at its first mention
        ("b", 12288, 10),
    ]
    assert layout.prefetch_end == 12288
    assert layout.blob_size == 16384  # whole blocks
    assert layout.find(tree.lookup("hard").entry) == layout.files[1]
    assert layout.find(tree.lookup("empty").entry) is None


def test_small_blocks() -> None:
    layout = plan_layout(tree_of(reg("a", 1), reg("b", 513)), block_size=512)
    assert [f.blob_offset for f in layout.files] == [0, 512]
    assert layout.blob_size == 1536


def test_locate_pieces_and_gaps() -> None:
    tree = tree_of(reg("a", 100), reg("b", 4096), reg("c", 10))
    layout = plan_layout(tree, block_size=4096)
    a, b, c = (tree.lookup(n).entry for n in "abc")
    assert [tuple(p) for p in layout.locate(50, 8192)] == [
        (a, 50, 50, 50),
        (None, 0, 3996, 100),
        (b, 0, 4096, 4096),
        (c, 0, 10, 8192),
        (None, 0, 40, 8202),
    ]
    assert [tuple(p) for p in layout.locate(8195, 1 << 20)] == [(c, 3, 7, 8195), (None, 0, 4086, 8202)]
    assert layout.locate(layout.blob_size, 10) == []
    assert layout.locate(-1, 10) == []


def test_read_assembles_files_and_zeros() -> None:
    tree = tree_of(reg("a", 3), reg("b", 2))
    layout = plan_layout(tree, block_size=512)
    contents = {"a": b"AAA", "b": b"BB"}

    def read_file(entry: Entry, offset: int, size: int) -> bytes:
        return contents[entry.name][offset : offset + size]

    assert layout.read(1, 515, read_file) == b"AA" + bytes(509) + b"BB" + bytes(2)
    assert layout.read(1020, 100, read_file) == bytes(4)  # short at the blob's end
    with pytest.raises(OSError, match="1 bytes read, 2 expected"):
        layout.read(512, 2, lambda entry, offset, size: b"B")


def test_explicit_offsets_like_a_tar_stream() -> None:
    a, b, empty = reg("a", 700), reg("b", 1), reg("e", 0)
    layout = BlobLayout.from_offsets([(a, 512), (b, 2048), (empty, 1536)], blob_size=10240, block_size=512)
    assert [(f.entry.name, f.blob_offset) for f in layout.files] == [("a", 512), ("b", 2048)]
    assert [p.entry for p in layout.locate(0, 10240)] == [None, a, None, b, None]


@pytest.mark.parametrize(
    ("offsets", "blob_size", "block_size"),
    [
        ([(reg("a", 10), 100)], 1024, 512),  # unaligned
        ([(reg("a", 1000), 0), (reg("b", 10), 512)], 2048, 512),  # overlapping
        ([(reg("a", 1000), 512)], 1024, 512),  # beyond the blob
        ([(reg("a", 10), 0), (reg("a", 10), 512)], 1024, 512),  # the same file twice
        ([(reg("a", 10), 0)], 1024, 768),  # not a power of two
        ([(reg("a", 10), 0)], 1 << 20, 8192),  # bigger than a page
    ],
)
def test_inconsistent_offsets_are_refused(
    offsets: list[tuple[Entry, int]], blob_size: int, block_size: int
) -> None:
    with pytest.raises(LayoutError):
        BlobLayout.from_offsets(offsets, blob_size=blob_size, block_size=block_size)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=12),
    block_bits=st.integers(9, 12),
    ranges=st.lists(st.tuples(st.integers(-10, 120_000), st.integers(0, 70_000)), max_size=10),
)
def test_locate_agrees_with_a_byte_map(
    sizes: list[int], block_bits: int, ranges: list[tuple[int, int]]
) -> None:
    """Every blob byte maps to exactly the file byte the layout put there, or to a gap."""
    tree = tree_of(*(reg(f"f{i}", size) for i, size in enumerate(sizes)))
    layout = plan_layout(tree, order=[f"f{len(sizes) - 1}"], block_size=1 << block_bits)
    owner: list[tuple[str, int] | None] = [None] * layout.blob_size
    for placed in layout.files:
        assert placed.blob_offset % layout.block_size == 0
        for i in range(placed.size):
            owner[placed.blob_offset + i] = (placed.entry.name, i)
    for offset, size in ranges:
        seen: list[tuple[str, int] | None] = []
        position = max(offset, 0)
        for piece in layout.locate(offset, size):
            assert piece.blob_offset == position and piece.length > 0
            position += piece.length
            seen += [
                None if piece.entry is None else (piece.entry.name, piece.file_offset + i)
                for i in range(piece.length)
            ]
        start, end = max(offset, 0), min(offset + size, layout.blob_size)
        assert seen == (owner[start:end] if offset >= 0 else [])
