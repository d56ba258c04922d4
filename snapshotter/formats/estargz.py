"""gzip eStargz byte layout: the 51-byte footer, the 47-byte legacy stargz footer, the TOC member.

Owns building and parsing those footers, bounded gunzip of a chunk or of the TOC member, and
extraction of ``stargz.index.json`` from it. The TOC JSON itself is handled by ``toc``.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

from snapshotter.formats.index import FormatError
from snapshotter.formats.toc import TOC_TAR_NAME, normalize_name

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
FORMAT = "estargz"
LEGACY_FORMAT = "stargz"

_GZIP_MAGIC = b"\x1f\x8b\x08"
_FLG_FEXTRA = 0x04
_STARGZ_MAGIC = b"STARGZ"
_SUBFIELD_LEN = 16 + len(_STARGZ_MAGIC)  # "%016x" offset + "STARGZ"
# Final empty stored deflate block plus a gzip trailer with CRC32(b"") = 0 and ISIZE = 0.
_EMPTY_BODY = b"\x01\x00\x00\xff\xff" + b"\x00" * 8
# The TOC member holds a tar header (maybe with PAX/GNU extensions), padding and the
# end-of-archive blocks on top of the JSON; allow that much beyond the JSON limit.
_TOC_TAR_OVERHEAD = 64 << 10
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_TOC_PIECE = 1 << 20  # inflate the TOC JSON this much at a time


def _footer(extra: bytes) -> bytes:
    # MTIME 0, XFL 0, OS 255 (unknown): what Go's gzip writer emits at NoCompression.
    header = _GZIP_MAGIC + bytes([_FLG_FEXTRA]) + b"\x00\x00\x00\x00" + b"\x00\xff"
    return header + struct.pack("<H", len(extra)) + extra + _EMPTY_BODY


def _subfield(toc_offset: int) -> bytes:
    if not 0 <= toc_offset < 1 << 63:
        raise ValueError(f"TOC offset {toc_offset} does not fit in int64")
    return b"%016x" % toc_offset + _STARGZ_MAGIC


def gzip_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member whose extra field "SG" holds the offset."""
    sub = _subfield(toc_offset)
    return _footer(b"SG" + struct.pack("<H", len(sub)) + sub)


def legacy_footer(toc_offset: int) -> bytes:
    """The 47-byte legacy (CRFS) stargz footer: the extra field is the bare subfield."""
    return _footer(_subfield(toc_offset))


def _footer_extra(footer: bytes, size: int, xlen: int) -> bytes:
    if len(footer) != size:
        raise FormatError(f"footer is {len(footer)} bytes, want {size}")
    if footer[:3] != _GZIP_MAGIC:
        raise FormatError(f"{size}-byte footer: not a gzip header (wrong magic)")
    if footer[3] != _FLG_FEXTRA:
        raise FormatError(f"{size}-byte footer: gzip flags {footer[3]:#x}, want only FEXTRA")
    (got_xlen,) = struct.unpack_from("<H", footer, 10)
    if got_xlen != xlen:
        raise FormatError(f"{size}-byte footer: gzip extra field is {got_xlen} bytes, want {xlen}")
    d = zlib.decompressobj(_GZIP_WBITS)
    try:
        body = d.decompress(footer, 1)
    except zlib.error as exc:
        raise FormatError(f"{size}-byte footer: corrupt gzip member: {exc}") from exc
    if body or not d.eof or d.unused_data:
        raise FormatError(f"{size}-byte footer: gzip member is not empty")
    return footer[12 : 12 + xlen]


def _parse_subfield(sub: bytes, size: int) -> int:
    if sub[16:] != _STARGZ_MAGIC:
        raise FormatError(f"{size}-byte footer: STARGZ magic missing")
    hexdigits = sub[:16]
    if not all(c in b"0123456789abcdefABCDEF" for c in hexdigits):
        raise FormatError(f"{size}-byte footer: TOC offset {hexdigits!r} is not hexadecimal")
    offset = int(hexdigits, 16)
    if offset >= 1 << 63:
        raise FormatError(f"{size}-byte footer: TOC offset {offset} overflows int64")
    return offset


def parse_gzip_footer(footer: bytes) -> int:
    """The TOC offset from a 51-byte eStargz footer; FormatError if it is not one."""
    extra = _footer_extra(footer, FOOTER_SIZE, 4 + _SUBFIELD_LEN)
    if extra[:2] != b"SG":
        raise FormatError(f"{FOOTER_SIZE}-byte footer: extra subfield id {extra[:2]!r}, want b'SG'")
    (sublen,) = struct.unpack_from("<H", extra, 2)
    if sublen != _SUBFIELD_LEN:
        raise FormatError(f"{FOOTER_SIZE}-byte footer: subfield length {sublen}, want {_SUBFIELD_LEN}")
    return _parse_subfield(extra[4:], FOOTER_SIZE)


def parse_legacy_footer(footer: bytes) -> int:
    """The TOC offset from a 47-byte legacy stargz footer; FormatError if it is not one."""
    return _parse_subfield(_footer_extra(footer, LEGACY_FOOTER_SIZE, _SUBFIELD_LEN), LEGACY_FOOTER_SIZE)


def gunzip_prefix(data: bytes, want: int) -> bytes:
    """Decompress at most ``want`` bytes from concatenated gzip members at the start of ``data``.

    Stops as soon as ``want`` bytes are out, so a bomb costs at most ``want`` bytes of memory.
    Returns fewer bytes only if the members end cleanly before that; a member cut short or a
    corrupt one raises FormatError.
    """
    pieces: list[bytes] = []
    got = 0
    rest = data
    while got < want and rest:
        d = zlib.decompressobj(_GZIP_WBITS)
        try:
            piece = d.decompress(rest, want - got)
        except zlib.error as exc:
            raise FormatError(f"corrupt gzip stream: {exc}") from exc
        pieces.append(piece)
        got += len(piece)
        if got >= want:
            break
        if not d.eof:
            raise FormatError("gzip stream is truncated")
        rest = d.unused_data
    # One member is the usual case: return its output as is rather than copy it.
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def decompress_toc(raw: bytes, max_toc_bytes: int) -> bytearray:
    """The ``stargz.index.json`` bytes from the TOC gzip member (only the first member is read).

    Only the tar header is inflated before the entry's size is checked; the JSON is then
    inflated straight into the result, in pieces, so that it exists in memory once.
    """
    d = zlib.decompressobj(_GZIP_WBITS)
    try:
        head = d.decompress(raw, _TOC_TAR_OVERHEAD)
    except zlib.error as exc:
        raise FormatError(f"TOC: corrupt gzip member: {exc}") from exc
    try:
        with tarfile.open(fileobj=io.BytesIO(head), mode="r:") as tf:
            member = tf.next()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise FormatError(f"TOC: malformed tar entry: {exc}") from exc
    if member is None:
        raise FormatError("TOC: gzip member holds no tar entry")
    if normalize_name(member.name) != TOC_TAR_NAME or not member.isreg():
        raise FormatError(f"TOC: tar entry is {member.name!r}, want {TOC_TAR_NAME!r}")
    if member.size > max_toc_bytes:
        raise FormatError(f"TOC is {member.size} bytes, larger than the {max_toc_bytes}-byte limit")
    data = bytearray(head[member.offset_data : member.offset_data + member.size])
    del head
    while len(data) < member.size and not d.eof:
        try:
            piece = d.decompress(d.unconsumed_tail, min(_TOC_PIECE, member.size - len(data)))
        except zlib.error as exc:
            raise FormatError(f"TOC: corrupt gzip member: {exc}") from exc
        if not piece:
            break
        data += piece
    if len(data) != member.size:
        raise FormatError(f"TOC: tar entry is truncated ({len(data)} of {member.size} bytes)")
    # The rest of the member (tar padding and end blocks) to its end, where the CRC is checked.
    try:
        d.decompress(d.unconsumed_tail, _TOC_TAR_OVERHEAD)
    except zlib.error as exc:
        raise FormatError(f"TOC: corrupt gzip member: {exc}") from exc
    if not d.eof:
        raise FormatError(
            "TOC: gzip member is truncated"
            if not d.unconsumed_tail
            else f"TOC: more than {_TOC_TAR_OVERHEAD} bytes follow the TOC in its gzip member"
        )
    return data
