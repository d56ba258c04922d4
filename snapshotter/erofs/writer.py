"""Write a layer's EROFS metadata image: the whole tree in the kernel's format, file data elsewhere.

``build_metadata(tree, layout)`` turns a ``LayerTree`` into an image the kernel mounts with the
layer's data blob as its one extra device (``mount -t erofs -o device=BLOB META``). The image holds
the superblock, a one-slot device table, every inode, directories, symlinks and xattrs; each
regular file is chunk-based and its chunk indexes point at its content in the blob (device 1), as
``layout`` placed it. See ``snapshotter.erofs.ondisk`` for the on-disk facts this relies on.

Choices, each for a reason:

- One chunk per file where possible: the blob holds each file contiguously, so a chunk as large as
  the file (a power-of-two multiple of the block, up to ``MAX_CHUNK_SIZE``) needs a single 8-byte
  index and gives the kernel one extent to read.
- Inodes in breadth-first order, a directory's children by name: the inodes a ``readdir`` + ``stat``
  touches sit together. The root comes first, so its nid (16 bits in the superblock) is small.
- Compact 32-byte inodes when the attributes fit (16-bit ids and links, 32-bit size) and the mtime
  equals the superblock epoch, which is the most common mtime of the layer; extended otherwise.
- Directory and symlink data inline after the inode when it fits in the inode's block; otherwise
  (or when starting a new block would waste more than a data block) in blocks after the inodes.
- An xattr that two or more inodes carry (e.g. ``trusted.overlay.opaque=y``) is stored once in the
  shared area and referenced by a 4-byte id.

Deterministic: the same tree and layout give the same bytes (no uuid, no timestamps of its own).
Names, symlink targets, ids and device numbers the format cannot hold raise ``ImageError``; xattrs
it cannot name (no EROFS prefix for them) are left out with a warning.
"""

from __future__ import annotations

import logging
import operator
import os
import stat
from collections import Counter, deque

from snapshotter.erofs import ondisk
from snapshotter.erofs.layout import BlobLayout
from snapshotter.layertree import LayerTree, Node, presented_xattrs

log = logging.getLogger(__name__)

# Largest chunk: erofs-utils 1.5's fsck buffers a chunk in a 32-bit sized buffer when it extracts;
# a 1 GiB chunk stays well inside that and costs a 4 GiB file only four index entries.
MAX_CHUNK_SIZE = 1 << 30
DEVICE_ID_BLOB = 1  # the first (only) extra device
PATH_MAX = 4096  # a symlink target is at most PATH_MAX - 1 bytes
_FIRST_INODE = ondisk.SUPERBLOCK_OFFSET + ondisk.SUPERBLOCK_SIZE + ondisk.DEVICE_SLOT_SIZE  # nid 40
_DEVT_SLOTOFF = (ondisk.SUPERBLOCK_OFFSET + ondisk.SUPERBLOCK_SIZE) // ondisk.DEVICE_SLOT_SIZE
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_MAX_XATTR_IBODY = ondisk.XATTR_IBODY_HEADER_SIZE + 4 * (_U16 - 1)
_MAX_SHARED_PER_INODE = 0xFF


_pack_compact = ondisk.COMPACT_INODE.pack_into
_pack_extended = ondisk.EXTENDED_INODE.pack_into
_pack_chunk_index = ondisk.CHUNK_INDEX.pack_into
_LAYOUTS = (ondisk.DATALAYOUT_FLAT_PLAIN, ondisk.DATALAYOUT_FLAT_INLINE, ondisk.DATALAYOUT_CHUNK_BASED)
_COMPACT_FORMATS = {d: ondisk.i_format(ondisk.INODE_LAYOUT_COMPACT, d) for d in _LAYOUTS}
_EXTENDED_FORMATS = {d: ondisk.i_format(ondisk.INODE_LAYOUT_EXTENDED, d) for d in _LAYOUTS}


class ImageError(ValueError):
    """The tree cannot be written as an EROFS image; the message names the path and the reason."""


XattrKey = tuple[int, bytes, bytes]  # (name index, name suffix, value)


def _xattr_keys(inode: _Inode) -> list[XattrKey]:
    """The node's presented xattrs in EROFS terms, sorted; unnameable ones are left out."""
    keys: list[XattrKey] = []
    for name, value in presented_xattrs(inode.node).items():
        index = ondisk.XATTR_WHOLE_NAMES.get(name)
        suffix = b""
        if index is None:
            for prefix, prefix_index in ondisk.XATTR_PREFIXES:
                if name.startswith(prefix) and len(name) > len(prefix):
                    index, suffix = prefix_index, os.fsencode(name[len(prefix) :])
                    break
        if index is None or len(suffix) > ondisk.MAX_NAME_LEN or len(value) > _U16:
            log.warning("xattr left out of the EROFS image", extra={"path": inode.path, "xattr": name})
            continue
        keys.append((index, suffix, value))
    keys.sort()
    return keys


def _encode_xattr(key: XattrKey) -> bytes:
    index, suffix, value = key
    raw = ondisk.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + bytes(-len(raw) % 4)


class _Inode:
    """One inode of the image: the node's attributes as written, and where its parts go."""

    __slots__ = (
        "chunk_format", "chunks", "data", "datalayout", "dir_blocks", "extended", "file_type", "mode",
        "name", "nid", "node", "parent", "size", "startblk", "xattr_body", "xattrs",
    )  # fmt: skip

    def __init__(self, node: Node, name: bytes, parent: _Inode | None) -> None:
        self.node = node
        self.name = name  # the name it was first found under (for error messages)
        self.parent = parent if parent is not None else self  # the root is its own parent
        self.mode = node.mode
        self.file_type = stat.S_IFMT(self.mode)
        self.nid = 0
        self.extended = False
        self.datalayout = ondisk.DATALAYOUT_FLAT_PLAIN
        self.xattrs: list[XattrKey] = []
        self.xattr_body = b""
        self.size = 0
        self.data = b""  # symlink target (directories: built once nids are known)
        self.dir_blocks: list[list[tuple[bytes, _Inode]]] = []
        self.chunk_format = 0
        self.chunks: list[int] = []  # blob block of each chunk
        self.startblk = 0  # FLAT_PLAIN: first data block in the image

    @property
    def path(self) -> str:
        parts: list[bytes] = []
        inode = self
        while inode.parent is not inode:
            parts.append(inode.name)
            inode = inode.parent
        return "/" + os.fsdecode(b"/".join(reversed(parts)))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _device_fits(major: int, minor: int) -> bool:
    return 0 <= major <= ondisk.MAX_DEV_MAJOR and 0 <= minor <= ondisk.MAX_DEV_MINOR


def _check_name(name: str, parent: _Inode) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")  # os.fsencode, without its per-call lookups
    if not raw or len(raw) > ondisk.MAX_NAME_LEN or b"/" in raw or b"\0" in raw or raw in (b".", b".."):
        raise ImageError(f"{parent.path}/{name!r}: not a valid directory entry name")
    return raw


class _Writer:
    def __init__(self, tree: LayerTree, layout: BlobLayout, device_tag: bytes) -> None:
        if len(device_tag) > ondisk.DEVICE_TAG_SIZE:
            raise ImageError(f"device tag longer than {ondisk.DEVICE_TAG_SIZE} bytes")
        self.tree = tree
        self.layout = layout
        self.block_size = layout.block_size
        self.block_bits = self.block_size.bit_length() - 1
        self.device_tag = device_tag
        self.inodes: list[_Inode] = []
        self.shared_ids: dict[XattrKey, int] = {}
        self.shared_area = b""
        self.epoch = (0, 0)

    def build(self) -> bytes:
        self._collect()
        self._share_xattrs()
        self._choose_epoch()
        for inode in self.inodes:
            self._prepare(inode)
        meta_end = self._place_inodes()
        # erofs-utils 1.5's fsck reads a 12-byte xattr header after every inode, even one without
        # xattrs, and calls the image corrupt when the last inode ends the image: leave room.
        data_end = self._place_data(meta_end + ondisk.XATTR_IBODY_HEADER_SIZE)
        xattr_blkaddr = data_end // self.block_size if self.shared_area else 0
        image = bytearray(_round_up(data_end + len(self.shared_area), self.block_size))
        image[data_end : data_end + len(self.shared_area)] = self.shared_area
        for inode in self.inodes:
            self._write_inode(image, inode)
        self._write_superblock(image, xattr_blkaddr)
        return bytes(image)

    # -- the inode list ------------------------------------------------------------------------

    def _collect(self) -> None:
        """Every node once, breadth-first from the root, a directory's children in name order."""
        root = _Inode(self.tree.root, b"", None)
        inodes = self.inodes
        inodes.append(root)
        seen: dict[Node, _Inode] = {self.tree.root: root}
        pending = deque([root])
        by_name = operator.itemgetter(0)
        while pending:
            directory = pending.popleft()
            named = [(_check_name(n, directory), c) for n, c in directory.node.children.items()]
            named.sort(key=by_name)
            entries: list[tuple[bytes, _Inode]] = []
            for raw, child in named:
                inode = seen.get(child)
                if inode is None:
                    inode = _Inode(child, raw, directory)
                    seen[child] = inode
                    inodes.append(inode)
                    if inode.file_type == stat.S_IFDIR:
                        pending.append(inode)
                entries.append((raw, inode))
            directory.dir_blocks = self._dir_blocks(directory, entries)

    def _dir_blocks(
        self, directory: _Inode, entries: list[tuple[bytes, _Inode]]
    ) -> list[list[tuple[bytes, _Inode]]]:
        """Pack the sorted entries, "." and ".." included, into blocks; sets the directory size."""
        # "." and ".." sort before every name that does not start with a byte below ".".
        everything = sorted([(b".", directory), (b"..", directory.parent), *entries], key=lambda e: e[0])
        blocks: list[list[tuple[bytes, _Inode]]] = [[]]
        used = 0
        for raw, inode in everything:
            need = ondisk.DIRENT_SIZE + len(raw)
            if used + need > self.block_size:
                blocks.append([])
                used = 0
            blocks[-1].append((raw, inode))
            used += need
        directory.size = (len(blocks) - 1) * self.block_size + used
        return blocks

    def _share_xattrs(self) -> None:
        """Store an xattr once when two or more inodes carry it."""
        counts: Counter[XattrKey] = Counter()
        for inode in self.inodes:
            node = inode.node
            if node.entry.xattrs or node.opaque:
                inode.xattrs = _xattr_keys(inode)
                counts.update(inode.xattrs)
        area = bytearray()
        for key in sorted(k for k, n in counts.items() if n > 1):
            self.shared_ids[key] = len(area) // 4
            area += _encode_xattr(key)
        self.shared_area = bytes(area)

    def _choose_epoch(self) -> None:
        """The most common mtime becomes the superblock epoch: compact inodes carry no mtime."""
        counts: Counter[tuple[int, int]] = Counter()
        for inode in self.inodes:
            counts[divmod(inode.node.entry.mtime_ns, 1_000_000_000)] += 1
        candidates = [(-n, t) for t, n in counts.items() if 0 <= t[0] <= (1 << 63) - 1]
        self.epoch = min(candidates)[1] if candidates else (0, 0)

    # -- per inode: attributes, xattr body, data layout ----------------------------------------

    def _prepare(self, inode: _Inode) -> None:
        """Check what the format cannot hold; choose the inode's version and file data layout."""
        node, entry = inode.node, inode.node.entry
        uid, gid, file_type = entry.uid, entry.gid, inode.file_type
        if not (0 <= uid <= _U32 and 0 <= gid <= _U32):
            raise ImageError(f"{inode.path}: uid/gid {uid}/{gid} beyond 32 bits")
        if inode.xattrs:
            self._prepare_xattrs(inode)
        if file_type == stat.S_IFREG:
            self._prepare_file(inode)
        elif file_type == stat.S_IFLNK:
            target = entry.link_name.encode("utf-8", "surrogateescape")
            if len(target) >= PATH_MAX or b"\0" in target:
                raise ImageError(f"{inode.path}: symlink target of {len(target)} bytes or with NUL")
            inode.data, inode.size = target, len(target)
        elif file_type in (stat.S_IFCHR, stat.S_IFBLK) and not _device_fits(entry.dev_major, entry.dev_minor):
            raise ImageError(f"{inode.path}: device {entry.dev_major}:{entry.dev_minor} out of range")
        inode.extended = not (
            uid <= _U16
            and gid <= _U16
            and node.nlink <= _U16
            and inode.size <= _U32
            and divmod(entry.mtime_ns, 1_000_000_000) == self.epoch
        )

    def _prepare_xattrs(self, inode: _Inode) -> None:
        """The inline xattr body: header, ids of shared xattrs, then the inode's own entries."""
        shared = [self.shared_ids[k] for k in inode.xattrs if k in self.shared_ids][:_MAX_SHARED_PER_INODE]
        shared_set = set(shared)
        inline = b"".join(
            _encode_xattr(k) for k in inode.xattrs if self.shared_ids.get(k, -1) not in shared_set
        )
        body = ondisk.XATTR_IBODY_HEADER.pack(0, len(shared))
        body += b"".join(i.to_bytes(4, "little") for i in shared) + inline
        if len(body) > _MAX_XATTR_IBODY:
            raise ImageError(f"{inode.path}: {len(body)} bytes of xattrs, more than an inode holds")
        inode.xattr_body = body

    def _prepare_file(self, inode: _Inode) -> None:
        entry = inode.node.entry
        inode.size = entry.size
        if entry.size == 0:
            return  # FLAT_PLAIN with no blocks
        placed = self.layout.find(entry)
        if placed is None or placed.size != entry.size:
            raise ImageError(f"{inode.path}: the blob layout does not place its {entry.size} bytes")
        chunk_size = self.block_size
        while chunk_size < entry.size and chunk_size < MAX_CHUNK_SIZE:
            chunk_size <<= 1
        blocks_per_chunk = chunk_size >> self.block_bits
        first = placed.blob_offset >> self.block_bits
        count = -(-entry.size // chunk_size)
        if first + (count - 1) * blocks_per_chunk >= ondisk.NULL_ADDR:  # (reserved for holes)
            raise ImageError(f"{inode.path}: blob offset {placed.blob_offset} beyond 32-bit block addresses")
        inode.datalayout = ondisk.DATALAYOUT_CHUNK_BASED
        inode.chunk_format = ondisk.CHUNK_FORMAT_INDEXES | (blocks_per_chunk.bit_length() - 1)
        inode.chunks = [first + i * blocks_per_chunk for i in range(count)]

    # -- placement -----------------------------------------------------------------------------

    def _place_inodes(self) -> int:
        """Assign nids (meta_blkaddr is 0, so nid = byte offset / 32); returns the end offset."""
        block = self.block_size
        position = _FIRST_INODE
        for inode in self.inodes:
            head = (ondisk.EXTENDED_INODE_SIZE if inode.extended else ondisk.COMPACT_INODE_SIZE) + len(
                inode.xattr_body
            )
            if inode.datalayout == ondisk.DATALAYOUT_CHUNK_BASED:
                end = _round_up(position + head, ondisk.CHUNK_INDEX_SIZE) + ondisk.CHUNK_INDEX_SIZE * len(
                    inode.chunks
                )
            elif inode.size and inode.file_type != stat.S_IFREG:  # directory or symlink data
                tail = inode.size
                room = block - position % block
                fits = head + tail <= block
                if fits and head + tail > room and room > _round_up(tail, block) - tail:
                    fits = False  # a new block would waste more than a data block does
                elif fits and head + tail > room:
                    position = _round_up(position, block)
                if fits:
                    inode.datalayout = ondisk.DATALAYOUT_FLAT_INLINE
                    end = position + head + tail
                else:
                    end = position + head
            else:
                end = position + head
            inode.nid = position // ondisk.INODE_SLOT
            position = _round_up(end, ondisk.INODE_SLOT)
        if self.inodes[0].nid >= ondisk.NID_ROOT_LIMIT:
            raise ImageError("the root inode does not fit the superblock's 16-bit nid")
        return position

    def _place_data(self, meta_end: int) -> int:
        """Give non-inline directory and symlink data whole blocks after the inodes."""
        next_block = -(-meta_end // self.block_size)
        for inode in self.inodes:
            if (
                inode.size
                and inode.datalayout == ondisk.DATALAYOUT_FLAT_PLAIN
                and inode.file_type != stat.S_IFREG
            ):
                inode.startblk = next_block
                next_block += -(-inode.size // self.block_size)
        return next_block * self.block_size

    # -- serialization -------------------------------------------------------------------------

    def _dir_data(self, inode: _Inode) -> bytes:
        pack, file_types = ondisk.DIRENT.pack, ondisk.FILE_TYPES
        out = bytearray()
        for i, entries in enumerate(inode.dir_blocks):
            if i:
                out += bytes(_round_up(len(out), self.block_size) - len(out))
            block_start = len(out)
            nameoff = ondisk.DIRENT_SIZE * len(entries)
            names = bytearray()
            for raw, child in entries:
                out += pack(child.nid, nameoff + len(names), file_types[child.file_type])
                names += raw
            out += names
            assert len(out) - block_start <= self.block_size
        return bytes(out)

    def _write_inode(self, image: bytearray, inode: _Inode) -> None:
        node, entry = inode.node, inode.node.entry
        file_type, layout, size = inode.file_type, inode.datalayout, inode.size
        if file_type == stat.S_IFDIR:
            inode.data = self._dir_data(inode)
        if layout == ondisk.DATALAYOUT_CHUNK_BASED:
            i_u = inode.chunk_format
        elif file_type == stat.S_IFCHR or file_type == stat.S_IFBLK:
            i_u = 0 if node.whiteout else ondisk.encode_dev(entry.dev_major, entry.dev_minor)
        elif layout == ondisk.DATALAYOUT_FLAT_INLINE:
            i_u = ondisk.NULL_ADDR  # no whole blocks: everything is inline
        else:
            i_u = inode.startblk
        body = inode.xattr_body
        icount = (len(body) - ondisk.XATTR_IBODY_HEADER_SIZE) // 4 + 1 if body else 0
        position = inode.nid * ondisk.INODE_SLOT
        ino = node.ino & _U32
        if inode.extended:
            seconds, nanoseconds = divmod(entry.mtime_ns, 1_000_000_000)
            _pack_extended(
                image, position, _EXTENDED_FORMATS[layout], icount, inode.mode, 0, size, i_u, ino,
                entry.uid, entry.gid, seconds, nanoseconds, node.nlink,
            )  # fmt: skip
            position += ondisk.EXTENDED_INODE_SIZE
        else:
            _pack_compact(
                image, position, _COMPACT_FORMATS[layout], icount, inode.mode, node.nlink, size, 0, i_u,
                ino, entry.uid, entry.gid, 0,
            )  # fmt: skip
            position += ondisk.COMPACT_INODE_SIZE
        if body:
            image[position : position + len(body)] = body
            position += len(body)
        if layout == ondisk.DATALAYOUT_CHUNK_BASED:
            position = _round_up(position, ondisk.CHUNK_INDEX_SIZE)
            for block in inode.chunks:
                _pack_chunk_index(image, position, 0, DEVICE_ID_BLOB, block)
                position += ondisk.CHUNK_INDEX_SIZE
        elif layout == ondisk.DATALAYOUT_FLAT_INLINE:
            image[position : position + size] = inode.data
        elif size and file_type != stat.S_IFREG:
            start = inode.startblk * self.block_size
            image[start : start + size] = inode.data

    def _write_superblock(self, image: bytearray, xattr_blkaddr: int) -> None:
        ondisk.SUPERBLOCK.pack_into(
            image, ondisk.SUPERBLOCK_OFFSET,
            ondisk.MAGIC, 0, 0, self.block_bits, 0, self.inodes[0].nid, len(self.inodes),
            self.epoch[0], self.epoch[1], len(image) // self.block_size, 0, xattr_blkaddr,
            bytes(16), bytes(16),
            ondisk.FEATURE_INCOMPAT_CHUNKED_FILE | ondisk.FEATURE_INCOMPAT_DEVICE_TABLE,
            0, 1, _DEVT_SLOTOFF,
        )  # fmt: skip
        blob_blocks = -(-self.layout.blob_size // self.block_size)
        if blob_blocks > _U32:
            raise ImageError(f"a blob of {self.layout.blob_size} bytes needs more than 32-bit block counts")
        ondisk.DEVICE_SLOT.pack_into(
            image, _DEVT_SLOTOFF * ondisk.DEVICE_SLOT_SIZE, self.device_tag, blob_blocks, 0, 0, 0
        )


def build_metadata(tree: LayerTree, layout: BlobLayout, *, device_tag: bytes = b"") -> bytes:
    """The EROFS metadata image of ``tree`` whose regular files point into a blob laid out as
    ``layout`` (device 1; the image's block size is the layout's). ``device_tag`` (at most 64
    bytes, e.g. the blob's digest) is recorded in the device slot. Raises ``ImageError``."""
    return _Writer(tree, layout, device_tag).build()
