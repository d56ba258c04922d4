"""EROFS on-disk structures, as lazysnap writes them: constants, struct layouts, and the format facts.

Sources: the kernel's ``fs/erofs/erofs_fs.h`` (authoritative), erofs-utils ``include/erofs_fs.h``
and ``lib/`` (how mkfs.erofs writes an image), and ``erofs/docs`` ``src/core_ondisk.md``. All
integers are little-endian. Only the uncompressed subset is here: flat and chunk-based inodes, an
extra-device table, inline and shared xattrs with the short name-prefix indexes.

Image layout (byte offsets; B = block size, a power of two, 512..4096 here):

- ``[1024, 1152)`` the superblock (``SUPERBLOCK``, 128 bytes with ``sb_extslots = 0``). It is
  always at byte 1024, whatever B is; with B = 512 it sits in block 2.
- ``devt_slotoff * 128`` the device table: one 128-byte ``DEVICE_SLOT`` per extra device. Device
  *k* (k >= 1) in a chunk index means slot *k - 1*; the kernel masks ``device_id`` with
  ``roundup_pow_of_two(extra_devices + 1) - 1``.
- inodes: inode *nid* lives at byte ``meta_blkaddr * B + nid * 32`` (inodes are 32-byte aligned).
  ``meta_blkaddr`` may be 0 (mkfs.erofs does that), so nids count from the image start and the
  first inode after the superblock and one device slot has nid 40. The superblock's root nid field
  is 16 bits (without the 48-bit feature), so the root inode must lie in the first 2 MiB.
- shared xattrs: shared xattr *id* lives at byte ``xattr_blkaddr * B + id * 4``.
- directory and symlink data that is not inline: whole blocks addressed by the inode's
  ``startblk``.

Inodes. ``i_format`` bit 0 = version (0: compact 32 bytes, 1: extended 64 bytes), bits 1-3 = data
layout. A compact inode has 16-bit uid/gid/nlink and a 32-bit size, and its mtime is the
superblock's ``epoch``/``fixed_nsec`` (recent kernels, 6.18 here, add the compact ``i_mtime``
field as seconds after ``epoch``; older kernels read the superblock time alone and erofs-utils 1.5
calls the field reserved, so lazysnap writes 0 there and uses a compact inode only when the file's
mtime equals the epoch exactly). Everything
else takes an extended inode (32-bit uid/gid/nlink, 64-bit size, own mtime in seconds and ns).

After the inode come, in order: the inline xattr body (``i_xattr_icount`` counts 4-byte units
after a 12-byte header; 0 means none, and a header alone is rejected by the kernel), then
- data layout ``FLAT_INLINE``: the tail of the data (here: all of it), which must not cross a
  block boundary (the kernel refuses "inline data cross block boundary");
- data layout ``CHUNK_BASED``: an array of 8-byte chunk indexes starting at the next 8-byte
  boundary. ``i_u`` holds the chunk format: bit 5 = indexes (needed to name a device), bits 0-4 =
  chunk size as ``log2(chunk_size / B)``. Chunk *n* covers file bytes ``[n << chunkbits, ...)``
  and starts at block ``startblk`` of device ``device_id``.

Directories are a sequence of blocks (the last one may be short: ``i_size`` ends where its data
ends). Each block holds ``DIRENT`` records (12 bytes: nid, name offset in the block, file type)
followed by the names, without terminators; the count is ``nameoff[0] / 12``, and the last name
runs to the end of the block's data (zero padding ends it). Entries, "." and ".." included, are
sorted by name as unsigned bytes across the whole directory (the kernel binary-searches blocks,
then names within a block), and an entry never straddles two blocks.

Xattrs. An entry is ``(name_len u8, name_index u8, value_size u16)`` then the name suffix and the
value, padded to 4 bytes. ``name_index`` stands for a prefix (``XATTR_PREFIXES``); POSIX ACLs use
their index with an empty suffix. A name with no known prefix cannot be stored. The inline body is
``(name_filter u32, shared_count u8, 7 reserved)``, then ``shared_count`` shared-xattr ids (u32),
then the inline entries.
"""

from __future__ import annotations

import stat
import struct

SUPERBLOCK_OFFSET = 1024
MAGIC = 0xE0F5E1E2
INODE_SLOT = 32  # nid unit: inode offset / 32
NID_ROOT_LIMIT = 1 << 16  # the superblock's root nid field is 16 bits
MIN_BLOCK_BITS = 9  # 512-byte blocks; the kernel accepts 512 .. PAGE_SIZE
MAX_BLOCK_BITS = 12
NULL_ADDR = 0xFFFFFFFF  # "no blocks" in a 32-bit block address (mkfs.erofs writes it for inline-only data)
MAX_NAME_LEN = 255

# feature_incompat bits
FEATURE_INCOMPAT_CHUNKED_FILE = 0x00000004
FEATURE_INCOMPAT_DEVICE_TABLE = 0x00000008

# i_format: version bit 0, data layout bits 1-3
INODE_LAYOUT_COMPACT = 0
INODE_LAYOUT_EXTENDED = 1
DATALAYOUT_FLAT_PLAIN = 0
DATALAYOUT_FLAT_INLINE = 2
DATALAYOUT_CHUNK_BASED = 4

CHUNK_FORMAT_INDEXES = 0x0020
CHUNK_FORMAT_BLKBITS_MASK = 0x001F

COMPACT_INODE_SIZE = 32
EXTENDED_INODE_SIZE = 64
XATTR_IBODY_HEADER_SIZE = 12
XATTR_ENTRY_HEADER_SIZE = 4
CHUNK_INDEX_SIZE = 8
DIRENT_SIZE = 12
DEVICE_SLOT_SIZE = 128
DEVICE_TAG_SIZE = 64

# Short xattr name prefixes (erofs_fs.h EROFS_XATTR_INDEX_*). Index 5 ("lustre.") has no handler
# in Linux, so it is left out. ACL names are whole names: stored with an empty suffix.
XATTR_PREFIXES: tuple[tuple[str, int], ...] = (
    ("user.", 1),
    ("trusted.", 4),
    ("security.", 6),
)
XATTR_WHOLE_NAMES = {"system.posix_acl_access": 2, "system.posix_acl_default": 3}

# Directory entry file types (erofs_fs.h EROFS_FT_*)
FILE_TYPES = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}

# struct erofs_super_block, first 128 bytes: magic, checksum, feature_compat, blkszbits,
# sb_extslots, root_nid, inos, epoch, fixed_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid,
# volume_name, feature_incompat, available_compr_algs, extra_devices, devt_slotoff; zeros after.
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHH")
SUPERBLOCK_SIZE = 128
# struct erofs_deviceslot: tag[64], blocks_lo, uniaddr_lo, blocks_hi, uniaddr_hi, reserved[52]
DEVICE_SLOT = struct.Struct("<64sIIHH52x")
# struct erofs_inode_compact: i_format, i_xattr_icount, i_mode, i_nlink, i_size, i_mtime (0: the
# epoch), i_u, i_ino, i_uid, i_gid, i_reserved
COMPACT_INODE = struct.Struct("<HHHHIIIIHHI")
# struct erofs_inode_extended: i_format, i_xattr_icount, i_mode, i_nb (0), i_size, i_u, i_ino,
# i_uid, i_gid, i_mtime (signed seconds), i_mtime_nsec, i_nlink, reserved[16]
EXTENDED_INODE = struct.Struct("<HHHHQIIIIqII16x")
# struct erofs_xattr_ibody_header: h_name_filter (0: no filter), h_shared_count, reserved[7]
XATTR_IBODY_HEADER = struct.Struct("<IB7x")
XATTR_ENTRY = struct.Struct("<BBH")
# struct erofs_inode_chunk_index: startblk_hi (48-bit feature only: 0), device_id, startblk_lo
CHUNK_INDEX = struct.Struct("<HHI")
DIRENT = struct.Struct("<QHBx")

assert SUPERBLOCK.size <= SUPERBLOCK_SIZE
assert DEVICE_SLOT.size == DEVICE_SLOT_SIZE
assert COMPACT_INODE.size == COMPACT_INODE_SIZE and EXTENDED_INODE.size == EXTENDED_INODE_SIZE
assert XATTR_IBODY_HEADER.size == XATTR_IBODY_HEADER_SIZE and DIRENT.size == DIRENT_SIZE


def i_format(layout_version: int, datalayout: int) -> int:
    return layout_version | (datalayout << 1)


MAX_DEV_MAJOR = (1 << 12) - 1  # Linux dev_t: 12-bit major, 20-bit minor
MAX_DEV_MINOR = (1 << 20) - 1


def encode_dev(major: int, minor: int) -> int:
    """``i_u.rdev`` as the kernel's ``new_encode_dev``: minor's low byte, major, minor's high bits."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def xattr_entry_size(suffix_len: int, value_len: int) -> int:
    return (XATTR_ENTRY_HEADER_SIZE + suffix_len + value_len + 3) & ~3
