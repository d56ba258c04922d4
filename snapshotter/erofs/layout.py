"""Where each regular file's content lies in a layer's data blob, and which files cover a blob range.

The data blob is one flat file of a layer's uncompressed file contents. The EROFS metadata image
points each regular file at its place in the blob (a chunk-based inode on device 1), and the blob
server answers a kernel READ of blob bytes ``[a, b)`` by asking ``BlobLayout.locate`` which files
(and which bytes of them) that range holds.

Two ways to lay a blob out:

- ``plan_layout``: lazysnap's own order. Prioritized files first, in access order, so a startup
  reads one contiguous prefix of the blob; then the rest in index order. Every file starts on a
  block boundary (an EROFS chunk starts on a block), a hardlinked file is stored once, and empty
  files take no space.
- ``BlobLayout.from_offsets``: offsets fixed by someone else, e.g. a plain tar layer whose blob is
  its uncompressed tar stream, where file data starts on 512-byte boundaries (the metadata image
  then uses 512-byte blocks).
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from snapshotter.formats.index import Entry
from snapshotter.layertree import LayerTree, Node

MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 4096


FileReader = Callable[
    [Entry, int, int], bytes
]  # (entry, file offset, length) -> bytes, like LayerReader.read


class LayoutError(ValueError):
    """A blob layout is inconsistent: unaligned, overlapping, or beyond the blob's end."""


@dataclass(frozen=True)
class PlacedFile:
    """A regular file's content at blob bytes ``[blob_offset, blob_offset + size)``."""

    entry: Entry
    blob_offset: int
    size: int

    @property
    def end(self) -> int:
        return self.blob_offset + self.size


class Piece(NamedTuple):  # a tuple: locate() makes one per file of every READ, cheaply
    """Part of a blob range: ``length`` bytes at ``blob_offset`` are bytes ``[file_offset, ...)`` of
    ``entry``'s content, or zeros (padding between files) when ``entry`` is None."""

    entry: Entry | None
    file_offset: int
    length: int
    blob_offset: int


def check_block_size(block_size: int) -> None:
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise LayoutError(
            f"block size {block_size} is not a power of two in {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}"
        )


class BlobLayout:
    """The placed files of one blob, sorted by offset; non-empty files only."""

    def __init__(
        self, files: Sequence[PlacedFile], *, blob_size: int, block_size: int, prefetch_end: int = 0
    ) -> None:
        check_block_size(block_size)
        self.block_size = block_size
        self.blob_size = blob_size
        # Blob bytes [0, prefetch_end) hold the prioritized files (one range request fetches them).
        self.prefetch_end = prefetch_end
        self.files = tuple(sorted(files, key=lambda f: f.blob_offset))
        self._starts = [f.blob_offset for f in self.files]
        self._by_name: dict[str, PlacedFile] = {}
        previous_end = 0
        for f in self.files:
            if f.size <= 0:
                raise LayoutError(f"{f.entry.name}: an empty file has no place in the blob")
            if f.blob_offset % block_size:
                raise LayoutError(f"{f.entry.name}: offset {f.blob_offset} is not a multiple of {block_size}")
            if f.blob_offset < previous_end:
                raise LayoutError(f"{f.entry.name}: offset {f.blob_offset} overlaps the file before it")
            if f.entry.name in self._by_name:
                raise LayoutError(f"{f.entry.name}: placed twice")
            previous_end = f.end
            self._by_name[f.entry.name] = f
        if previous_end > blob_size:
            raise LayoutError(f"files end at {previous_end}, beyond the blob's {blob_size} bytes")

    @classmethod
    def from_offsets(
        cls, offsets: Iterable[tuple[Entry, int]], *, blob_size: int, block_size: int = MIN_BLOCK_SIZE
    ) -> BlobLayout:
        """A layout whose offsets are given, e.g. file data inside an uncompressed tar stream.

        ``offsets`` pairs each regular file's entry (the one a ``LayerTree`` node holds, so the
        target of any hardlinks) with where its content starts; empty files are left out.
        """
        files = [PlacedFile(entry, offset, entry.size) for entry, offset in offsets if entry.size > 0]
        return cls(files, blob_size=blob_size, block_size=block_size)

    def find(self, entry: Entry) -> PlacedFile | None:
        """Where ``entry``'s content is (None for an empty or unplaced file)."""
        return self._by_name.get(entry.name)

    def read(self, offset: int, size: int, read_file: FileReader) -> bytes:
        """Blob bytes ``[offset, offset + size)`` (short at the blob's end), each file's part from
        ``read_file(entry, file_offset, length)``, zeros between files."""
        parts = []
        for piece in self.locate(offset, size):
            if piece.entry is None:
                parts.append(bytes(piece.length))
                continue
            data = read_file(piece.entry, piece.file_offset, piece.length)
            if len(data) != piece.length:
                raise OSError(
                    errno.EIO, f"{piece.entry.name}: {len(data)} bytes read, {piece.length} expected"
                )
            parts.append(data)
        return b"".join(parts)

    def locate(self, offset: int, size: int) -> list[Piece]:
        """The pieces covering blob bytes ``[offset, offset + size)``, clipped to the blob's end,
        in order; gaps between files come back as zero pieces. O(log n + pieces)."""
        end = min(offset + size, self.blob_size)
        pieces: list[Piece] = []
        if offset < 0 or offset >= end:
            return pieces
        files = self.files
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0 or files[i].end <= offset:
            i += 1  # offset lies in a gap before files[i]
        pos = offset
        while pos < end:
            if i < len(files) and files[i].blob_offset <= pos:
                f = files[i]
                stop = min(end, f.end)
                pieces.append(Piece(f.entry, pos - f.blob_offset, stop - pos, pos))
                i += 1
            else:
                stop = min(end, files[i].blob_offset) if i < len(files) else end
                pieces.append(Piece(None, 0, stop - pos, pos))
            pos = stop
        return pieces


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tar_layout(tree: LayerTree, offsets: Mapping[str, int], tar_size: int) -> BlobLayout:
    """A plain tar layer's blob laid out as its uncompressed tar stream: each regular file where
    its content is in the stream (``offsets``, by the name of the entry a tree node holds), in
    512-byte blocks. LayoutError when a non-empty file has no offset."""
    placed: dict[Node, int] = {}
    for node in tree.by_name.values():
        if node.is_file and node.entry.size > 0 and node not in placed:
            offset = offsets.get(node.entry.name)
            if offset is None:
                raise LayoutError(f"{node.entry.name}: no place in the tar stream")
            placed[node] = offset
    return BlobLayout.from_offsets(
        ((node.entry, offset) for node, offset in placed.items()),
        blob_size=tar_size,
        block_size=MIN_BLOCK_SIZE,
    )


def plan_layout(
    tree: LayerTree, order: Iterable[str] = (), block_size: int = 4096, *, separation: int = 0
) -> BlobLayout:
    """Lay out ``tree``'s regular files: those named in ``order`` first (access order; unknown
    names are ignored), then the rest in index order, each on a block boundary, each hardlinked
    file once. The blob's size is a whole number of blocks.

    ``separation``: a hole of at least this many bytes between the ordered files and the rest, so
    that the kernel's readahead past the last file of a startup reads zeros (free) rather than
    files nobody asked for (fetched from the registry)."""
    check_block_size(block_size)
    files: list[PlacedFile] = []
    placed: set[Node] = set()
    position = 0

    def place(node: Node | None) -> None:
        nonlocal position
        if node is None or not node.is_file or node.entry.size <= 0 or node in placed:
            return
        placed.add(node)
        files.append(PlacedFile(node.entry, position, node.entry.size))
        position = _round_up(position + node.entry.size, block_size)

    for name in order:
        place(tree.by_name.get(name.strip("/")))
    prefetch_end = position
    if position and separation:
        position = _round_up(position + separation, block_size)
    for node in tree.by_name.values():
        place(node)
    return BlobLayout(files, blob_size=position, block_size=block_size, prefetch_end=prefetch_end)
