"""The FUSE kernel protocol on /dev/fuse, as far as a read-only server of flat files needs it.

Owns the wire format: opcodes, INIT flags, open flags, notification codes and the packed structs
of ``include/uapi/linux/fuse.h`` (protocol 7.x, little-endian host layout, every struct padded to 8
bytes). Pure functions on bytes; no file descriptors here.

Facts used (fuse.h changelog and fs/fuse/dev.c):
- A request is ``fuse_in_header`` (40 bytes) plus an opcode-specific body; the server answers with
  one write of ``fuse_out_header`` (16 bytes, ``error`` a negative errno) plus the reply body.
  FORGET, BATCH_FORGET and INTERRUPT take no reply.
- Notifications are writes with ``unique == 0`` and the notify code in ``error``.
- Interrupts carry odd uniques; ordinary requests even ones. Since 7.40 (Linux 6.9) the kernel can
  resend the requests a dead server had read (FUSE_NOTIFY_RESEND); it marks them with bit 63 of
  ``unique`` (FUSE_UNIQUE_RESEND) and advertises this with FUSE_HAS_RESEND (flags2 bit 7) in INIT.
- Flag bits 32..63 travel in ``flags2``, which only counts when FUSE_INIT_EXT (7.36) is set.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

KERNEL_VERSION = 7
# The newest minor whose messages this module knows; the connection uses min(kernel's, ours).
# 7.40 added max_stack_depth to init_out, backing_id to open_out and FUSE_NOTIFY_RESEND.
SUPPORTED_MINOR = 40
# FUSE_MAX_PAGES (7.28) is the oldest feature we cannot do without.
OLDEST_MINOR = 28

ROOT_ID = 1
PAGE_SIZE = 4096
# The kernel refuses reads of /dev/fuse into smaller buffers.
MIN_READ_BUFFER = 8192
UNIQUE_RESEND = 1 << 63


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


NO_REPLY = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})


class Notify(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7  # 7.40, Linux 6.9


class InitFlag(enum.IntFlag):
    """INIT flags; bits 32..63 are sent as ``flags2``."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


class OpenFlag(enum.IntFlag):
    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5


IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (then flags2 since 7.36)
FLAGS2 = struct.Struct("<I")
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth request_timeout unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime *nsec mode nlink uid gid rdev
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid *_nsec
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QII")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
INTERRUPT_IN = struct.Struct("<Q")
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type
NOTIFY_INVAL_INODE = struct.Struct("<Qqq")  # ino off len
NOTIFY_INVAL_ENTRY = struct.Struct("<QII")  # parent namelen flags
NOTIFY_DELETE = struct.Struct("<QQII")  # parent child namelen padding

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and INIT_OUT.size == 64 and ATTR.size == 88
assert READ_IN.size == 40 and KSTATFS.size == 80


class ProtocolError(Exception):
    """The kernel sent something this server cannot parse (a short or inconsistent request)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request as read from /dev/fuse."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: bytes

    @property
    def resent(self) -> bool:
        """True for a request the kernel resent after FUSE_NOTIFY_RESEND."""
        return bool(self.unique & UNIQUE_RESEND)


def parse_request(buf: bytes | bytearray | memoryview, length: int) -> Request:
    """Split the ``length`` bytes read into ``buf`` into header fields and body."""
    if length < IN_HEADER.size:
        raise ProtocolError(f"short request: {length} bytes")
    total, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(buf, 0)
    if total != length:
        raise ProtocolError(f"request length {total} but {length} bytes read (opcode {opcode})")
    return Request(opcode, unique, nodeid, uid, gid, pid, bytes(buf[IN_HEADER.size : length]))


Buffer = bytes | bytearray | memoryview


def reply(unique: int, *parts: Buffer, error: int = 0) -> list[Buffer]:
    """The buffers of one reply: header (``error`` a positive errno or 0) then ``parts``; for writev."""
    size = OUT_HEADER.size + sum(len(p) for p in parts)
    if error:
        return [OUT_HEADER.pack(OUT_HEADER.size, -error, unique)]
    return [OUT_HEADER.pack(size, 0, unique), *parts]


def notification(code: Notify, *parts: Buffer) -> list[Buffer]:
    """The buffers of one unsolicited notification (unique 0, the code in the error field)."""
    size = OUT_HEADER.size + sum(len(p) for p in parts)
    return [OUT_HEADER.pack(size, int(code), 0), *parts]


@dataclass(frozen=True, slots=True)
class InitIn:
    major: int
    minor: int
    max_readahead: int
    flags: int  # all 64 bits (flags2 folded in when the kernel set INIT_EXT)


def parse_init(body: bytes) -> InitIn:
    if len(body) < INIT_IN.size:
        raise ProtocolError(f"short INIT: {len(body)} bytes")
    major, minor, max_readahead, flags = INIT_IN.unpack_from(body, 0)
    if flags & InitFlag.INIT_EXT and len(body) >= INIT_IN.size + FLAGS2.size:
        (flags2,) = FLAGS2.unpack_from(body, INIT_IN.size)
        flags |= flags2 << 32
    return InitIn(major, minor, max_readahead, flags)


@dataclass(frozen=True, slots=True)
class InitOut:
    minor: int
    max_readahead: int
    flags: int  # all 64 bits; flags2 is derived
    max_background: int
    congestion_threshold: int
    max_write: int
    max_pages: int
    time_gran: int = 1

    def pack(self) -> bytes:
        return INIT_OUT.pack(
            KERNEL_VERSION,
            self.minor,
            self.max_readahead,
            self.flags & 0xFFFFFFFF,
            self.max_background,
            self.congestion_threshold,
            self.max_write,
            self.time_gran,
            self.max_pages,
            0,  # map_alignment (DAX only)
            self.flags >> 32,
            0,  # max_stack_depth (passthrough only)
            0,  # request_timeout: never let the kernel abort a slow registry fetch
        )


@dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    size: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    blksize: int = PAGE_SIZE

    def pack(self) -> bytes:
        blocks = (self.size + 511) // 512
        t = self.mtime
        return ATTR.pack(
            self.ino, self.size, blocks, t, t, t, 0, 0, 0, self.mode, self.nlink, self.uid, self.gid, 0,
            self.blksize, 0,
        )  # fmt: skip


def _split_timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def entry_out(nodeid: int, attr: Attr, timeout: float) -> bytes:
    """Reply body of LOOKUP: the node and how long the kernel may cache its name and attributes."""
    secs, nsecs = _split_timeout(timeout)
    return ENTRY_OUT_HEAD.pack(nodeid, 0, secs, secs, nsecs, nsecs) + attr.pack()


def attr_out(attr: Attr, timeout: float) -> bytes:
    """Reply body of GETATTR."""
    secs, nsecs = _split_timeout(timeout)
    return ATTR_OUT_HEAD.pack(secs, nsecs, 0) + attr.pack()


def open_out(fh: int, flags: int) -> bytes:
    return OPEN_OUT.pack(fh, flags, 0)


def statfs_out(blocks: int, files: int, bsize: int = PAGE_SIZE, namelen: int = 255) -> bytes:
    return KSTATFS.pack(blocks, 0, 0, files, 0, bsize, namelen, bsize, 0)


@dataclass(frozen=True, slots=True)
class ReadIn:
    fh: int
    offset: int
    size: int


def parse_read(body: bytes) -> ReadIn:
    if len(body) < 24:
        raise ProtocolError(f"short READ: {len(body)} bytes")
    fh, offset, size = struct.unpack_from("<QQI", body, 0)
    return ReadIn(fh, offset, size)


def parse_name(body: bytes) -> bytes:
    """The NUL-terminated name that LOOKUP (and friends) carry."""
    end = body.find(b"\0")
    return body if end < 0 else body[:end]


def parse_interrupt(body: bytes) -> int:
    """The unique of the request an INTERRUPT is about."""
    if len(body) < INTERRUPT_IN.size:
        raise ProtocolError("short INTERRUPT")
    return int(INTERRUPT_IN.unpack_from(body, 0)[0])


def dirent(ino: int, cookie: int, dtype: int, name: bytes) -> bytes:
    """One ``fuse_dirent``: ``cookie`` is the offset the next READDIR continues from."""
    head = DIRENT_HEAD.pack(ino, cookie, len(name), dtype)
    pad = (-(len(head) + len(name))) % 8
    return head + name + b"\0" * pad


def dirents(entries: Sequence[tuple[int, int, int, bytes]], limit: int) -> tuple[bytes, int]:
    """As many ``(ino, cookie, dtype, name)`` entries as fit in ``limit`` bytes; and how many."""
    out = bytearray()
    count = 0
    for ino, cookie, dtype, name in entries:
        one = dirent(ino, cookie, dtype, name)
        if len(out) + len(one) > limit:
            break
        out += one
        count += 1
    return bytes(out), count


def inval_inode(nodeid: int, offset: int = 0, length: int = 0) -> list[Buffer]:
    """Drop the kernel's attributes and cached pages of a node (``length`` 0: to the end)."""
    return notification(Notify.INVAL_INODE, NOTIFY_INVAL_INODE.pack(nodeid, offset, length))


def inval_entry(parent: int, name: bytes) -> list[Buffer]:
    """Drop the kernel's cached name ``name`` in directory ``parent``."""
    return notification(Notify.INVAL_ENTRY, NOTIFY_INVAL_ENTRY.pack(parent, len(name), 0), name + b"\0")


def resend() -> list[Buffer]:
    """Ask the kernel to queue again every request read but not answered on this connection."""
    return notification(Notify.RESEND)
