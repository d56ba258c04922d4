"""Tar members → index entries, recorded as the eStargz TOC records them (names, attributes,
hardlink resolution), so every format lazysnap builds from a tar gives the same ``LayerIndex``
entries. Shared by the Nydus-like writer and the gzip indexer."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation

from snapshotter.formats.index import Entry, EntryType, FormatError
from snapshotter.formats.toc import INT64_MAX, INT64_MIN, hardlink_target

U32_MAX = (1 << 32) - 1
XATTR_PREFIX = "SCHILY.xattr."
TAR_TYPES = {
    tarfile.DIRTYPE: EntryType.DIR,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.BLKTYPE: EntryType.BLOCK,
    tarfile.FIFOTYPE: EntryType.FIFO,
}
# tarfile keeps undecodable name bytes as lone surrogates; the eStargz TOC (Go JSON) turns each
# into U+FFFD, and so do we, so that names are valid UTF-8 and match the TOC's.
_SURROGATES = re.compile("[\ud800-\udfff]")
_NS = Decimal(10**9)


def text(raw: str) -> str:
    """A tar name or link as valid UTF-8: lone surrogates become U+FFFD, as in the TOC."""
    return _SURROGATES.sub("\ufffd", raw)


def u32(value: int, what: str, name: str) -> int:
    """``value`` if it fits an unsigned 32-bit field, else FormatError naming the entry."""
    if not 0 <= value <= U32_MAX:
        raise FormatError(f"entry {name!r}: {what} {value} does not fit in 32 bits")
    return value


def mtime_ns(info: tarfile.TarInfo) -> int:
    """mtime in ns; exact from a PAX record (tarfile's float would lose the nanoseconds). A time
    int64 ns cannot hold is recorded as 0, as the eStargz TOC drops times it cannot format."""
    try:
        seconds = Decimal(info.pax_headers.get("mtime", info.mtime))
    except (InvalidOperation, ValueError, TypeError):
        return 0
    if not seconds.is_finite() or abs(seconds) > (1 << 63) // 10**9:
        return 0
    ns = int(seconds * _NS)
    return ns if INT64_MIN <= ns <= INT64_MAX else 0


def xattrs(info: tarfile.TarInfo, name: str) -> dict[str, bytes]:
    """The entry's PAX ``SCHILY.xattr.*`` records, with their exact bytes."""
    out: dict[str, bytes] = {}
    for key, value in sorted(info.pax_headers.items()):
        if key.startswith(XATTR_PREFIX):
            try:
                # tarfile decoded the value with surrogateescape: this restores the exact bytes.
                out[key[len(XATTR_PREFIX) :]] = value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raise FormatError(f"entry {name!r}: xattr {key!r} is not encodable") from None
    return out


def entry_from_tar(info: tarfile.TarInfo, name: str, done: Mapping[str, Entry]) -> Entry:
    """The index entry of tar member ``info`` named ``name`` (normalized); ``done`` holds the
    entries before it, for hardlinks. The caller checks what its format adds (payload sizes)."""
    typ = EntryType.REG if info.isreg() else TAR_TYPES[info.type]
    entry = Entry(
        name=name,
        type=typ,
        mode=info.mode & 0o7777,
        uid=u32(info.uid, "uid", name),
        gid=u32(info.gid, "gid", name),
        mtime_ns=mtime_ns(info),
        xattrs=xattrs(info, name),
    )
    if typ is EntryType.REG:
        entry.size = info.size
    elif typ in (EntryType.CHAR, EntryType.BLOCK):
        entry.dev_major = u32(info.devmajor, "devmajor", name)
        entry.dev_minor = u32(info.devminor, "devminor", name)
    elif typ is EntryType.SYMLINK:
        entry.link_name = text(info.linkname)
        if not entry.link_name:
            raise FormatError(f"entry {name!r}: symlink without linkName")
    elif typ is EntryType.HARDLINK:
        entry.link_name = hardlink_target(name, text(info.linkname), done, "the layer")
    return entry
