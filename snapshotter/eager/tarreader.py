"""Reading a layer's tar stream header by header, as Go's ``archive/tar`` reader (1.19, the one
containerd 1.6 is built with) reads it, so that the eager fallback accepts and refuses exactly
what containerd's applier does.

What that means, concretely (``archive/tar/reader.go``):

- Headers are 512-byte blocks with a valid checksum (unsigned or signed sum); V7, USTAR (with its
  155-byte name prefix), star and GNU layouts; numbers in octal (spaces and NULs trimmed) or
  base-256. A bad checksum or number is an error, not the end of the archive.
- The archive ends at end of input, at two zero blocks, or at one zero block followed by end of
  input; a zero block followed by anything else is an error. What follows the end is not read
  here (the caller still hashes it: the DiffID covers the whole stream).
- PAX extended headers (``x``) apply to the next entry: path, linkpath, uname, gname, uid, gid,
  size, mtime/atime (decimal seconds, nanosecond precision) and ``SCHILY.xattr.*``; an empty
  value keeps the header's own. Global headers (``g``) are returned as entries of type ``g`` and
  change nothing else. GNU long names and link names (``L``, ``K``) apply to the next entry. Each
  such header holds at most 1 MiB (Go's limit), so memory stays bounded whatever the input.
- Legacy type ``\\0`` is a directory when the name ends in ``/``, else a regular file. Links,
  symlinks, devices, directories and FIFOs carry no data whatever their size says.
- Sparse files are refused (``SparseError``): containerd refuses old GNU sparse entries too, and
  PAX sparse files never come out of image builders; refusing one only means containerd unpacks
  that layer itself.

Entry data is read with ``read`` (at most the entry's size); ``next`` skips what was not read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

BLOCK = 512
MAX_SPECIAL_FILE = 1 << 20  # Go's maxSpecialFileSize: PAX headers, GNU long names
HEADER_ONLY_TYPES = frozenset(b"123456")  # link, symlink, char, block, dir, fifo
_ZERO_BLOCK = bytes(BLOCK)
_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(r"[+-]?[0-9]+")
_INT64 = 1 << 63


class TarError(ValueError):
    """The stream is not a tar archive Go's reader accepts (containerd's apply would fail too)."""


class SparseError(TarError):
    """A sparse entry, which this reader does not expand."""


@dataclass
class TarHeader:
    """One entry: Go's ``tar.Header`` fields that containerd's applier uses. ``name`` and
    ``linkname`` are the raw bytes; times are nanoseconds since the epoch (``atime_ns`` is None
    when the archive gives none)."""

    name: bytes
    typeflag: bytes
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    atime_ns: int | None = None
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[bytes, bytes] = field(default_factory=dict)

    def xattrs(self) -> dict[bytes, bytes]:
        """``SCHILY.xattr.NAME`` records: NAME -> value."""
        prefix = b"SCHILY.xattr."
        return {k[len(prefix) :]: v for k, v in self.pax.items() if k.startswith(prefix)}


def _string(field_bytes: bytes) -> bytes:
    """Up to the first NUL (Go's parseString)."""
    end = field_bytes.find(b"\0")
    return field_bytes if end < 0 else field_bytes[:end]


def _octal(field_bytes: bytes) -> int:
    digits = _string(field_bytes.strip(b" \0"))
    if not digits:
        return 0
    if not _OCTAL.fullmatch(digits):
        raise TarError(f"invalid octal number {field_bytes!r} in a tar header")
    value = int(digits, 8)
    if value >= 1 << 64:
        raise TarError(f"octal number {field_bytes!r} overflows")
    return value - (1 << 64) if value >= _INT64 else value  # Go's int64(uint64) conversion


def _numeric(field_bytes: bytes) -> int:
    """Octal, or base-256 (two's complement) when the first byte's top bit is set."""
    if field_bytes and field_bytes[0] & 0x80:
        negative = bool(field_bytes[0] & 0x40)
        value = 0
        for i, byte in enumerate(field_bytes):
            if negative:
                byte ^= 0xFF
            if i == 0:
                byte &= 0x7F
            if value >> 56:
                raise TarError("base-256 number overflows")
            value = value << 8 | byte
        if value >> 63:
            raise TarError("base-256 number overflows")
        return ~value if negative else value
    return _octal(field_bytes)


def _decimal(value: bytes, what: str) -> int:
    text = value.decode("ascii", "replace")
    if not _DECIMAL.fullmatch(text) or not -_INT64 <= int(text) < _INT64:
        raise TarError(f"invalid PAX {what} {value[:40]!r}")
    return int(text)


def pax_time_ns(value: bytes) -> int:
    """A PAX time (``[-]seconds[.fraction]``) in nanoseconds, as Go's parsePAXTime reads it:
    the fraction is cut (not rounded) to nine digits and takes the sign of the seconds."""
    seconds, _, fraction = value.partition(b".")
    secs = _decimal(seconds, "time")
    if not fraction:
        return secs * 1_000_000_000
    if fraction.strip(b"0123456789"):
        raise TarError(f"invalid PAX time {value[:40]!r}")
    nanos = int(fraction[:9].ljust(9, b"0"))
    if seconds.startswith(b"-"):
        nanos = -nanos
    return secs * 1_000_000_000 + nanos


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    """PAX records ``"%d %s=%s\\n"``; malformed ones are an error (Go's parsePAXRecord)."""
    records: dict[bytes, bytes] = {}
    rest = data
    while rest:
        length_text, space, after = rest.partition(b" ")
        if not space or not re.fullmatch(rb"[+-]?[0-9]+", length_text):
            raise TarError("malformed PAX record")
        length = int(length_text)
        if length < 5 or length > len(rest):
            raise TarError("malformed PAX record length")
        body_length = length - len(length_text) - 1
        if body_length <= 0 or after[body_length - 1 : body_length] != b"\n":
            raise TarError("malformed PAX record")
        key, equals, value = after[: body_length - 1].partition(b"=")
        if not equals or not key:
            raise TarError("malformed PAX record")
        nul_checked = value if key in (b"path", b"linkpath", b"uname", b"gname") else key
        if b"\0" in nul_checked:
            raise TarError("NUL in a PAX record")
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            key = b"GNU.sparse.map"
        records[key] = value
        rest = after[body_length:]
    return records


class TarReader:
    """Entries of a tar stream read from ``source`` (``source(n)`` returns at most ``n`` bytes,
    fewer only at the end of the stream)."""

    def __init__(self, source: Callable[[int], bytes]) -> None:
        self._source = source
        self._buffer = b""
        self._remaining = 0  # data bytes of the current entry not read yet
        self._padding = 0
        self._ended = False

    # --- the stream -------------------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the stream)."""
        if self._buffer:
            data, self._buffer = self._buffer[:n], self._buffer[n:]
            if len(data) == n:
                return data
            parts = [data]
            missing = n - len(data)
        else:
            parts, missing = [], n
        while missing > 0:
            chunk = self._source(missing)
            if not chunk:
                break
            if len(chunk) > missing:  # a source that returned more than asked: keep the rest
                chunk, self._buffer = chunk[:missing], chunk[missing:]
            parts.append(chunk)
            missing -= len(chunk)
        return b"".join(parts)

    def _skip(self, n: int) -> int:
        """Discard up to ``n`` bytes; how many there were."""
        skipped = 0
        while skipped < n:
            got = len(self._read(min(n - skipped, 1 << 20)))
            if not got:
                break
            skipped += got
        return skipped

    # --- entries --------------------------------------------------------------------------------

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current entry's data; b"" once it is all read."""
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        data = self._read(n)
        self._remaining -= len(data)
        if len(data) < n:
            raise TarError("unexpected end of the tar stream inside an entry's data")
        return data

    def next(self) -> TarHeader | None:
        """The next entry, or None at the end of the archive."""
        if self._ended:
            return None
        pax: dict[bytes, bytes] = {}
        long_name = long_link = b""
        while True:
            if self._skip(self._remaining) < self._remaining:
                raise TarError("unexpected end of the tar stream inside an entry's data")
            self._remaining = 0
            if self._skip(self._padding) < self._padding:  # missing padding at the end: the end
                self._ended = True
                return None
            self._padding = 0
            parsed = self._header()
            if parsed is None:
                self._ended = True
                return None
            header = parsed
            self._set_data(header)
            kind = header.typeflag
            if kind in (b"x", b"g"):
                records = _parse_pax(self._special(header))
                if kind == b"g":
                    global_header = TarHeader(header.name, b"g")
                    self._merge(global_header, records)
                    return global_header
                pax = records
                continue
            if kind in (b"L", b"K"):
                value = _string(self._special(header))
                if kind == b"L":
                    long_name = value
                else:
                    long_link = value
                continue
            self._merge(header, pax)
            if long_name:
                header.name = long_name
            if long_link:
                header.linkname = long_link
            if kind == b"\0":
                header.typeflag = b"5" if header.name.endswith(b"/") else b"0"
            if kind == b"S" or any(k.startswith(b"GNU.sparse.") for k in pax):
                raise SparseError(f"{header.name[:200]!r} is a sparse file")
            self._set_data(header)
            return header

    def _set_data(self, header: TarHeader) -> None:
        size = 0 if header.typeflag and header.typeflag[0] in HEADER_ONLY_TYPES else header.size
        if size < 0:
            raise TarError(f"negative size in the header of {header.name[:200]!r}")
        self._remaining = size
        self._padding = -size % BLOCK

    def _special(self, header: TarHeader) -> bytes:
        """The data of a PAX or GNU long-name header: at most 1 MiB, as Go allows."""
        if self._remaining > MAX_SPECIAL_FILE:
            raise TarError(f"a {header.typeflag!r} header of {self._remaining} bytes (at most 1 MiB)")
        return self.read(self._remaining)

    def _header(self) -> TarHeader | None:
        block = self._read(BLOCK)
        if not block:
            return None
        if len(block) < BLOCK:
            raise TarError("unexpected end of the tar stream inside a header")
        if block == _ZERO_BLOCK:
            second = self._read(BLOCK)
            if not second or second == _ZERO_BLOCK:
                return None
            if len(second) < BLOCK:
                raise TarError("unexpected end of the tar stream after a zero block")
            raise TarError("a zero block followed by a non-zero block")
        self._check_sum(block)
        magic, version, trailer = block[257:263], block[263:265], block[508:512]
        name = _string(block[0:100])
        header = TarHeader(
            name=name,
            typeflag=block[156:157],
            size=_numeric(block[124:136]),
            mode=_numeric(block[100:108]),
            uid=_numeric(block[108:116]),
            gid=_numeric(block[116:124]),
            mtime_ns=_numeric(block[136:148]) * 1_000_000_000,
            linkname=_string(block[157:257]),
        )
        if magic == b"ustar\0" or (magic == b"ustar " and version == b" \0"):  # not V7
            header.devmajor = _numeric(block[329:337])
            header.devminor = _numeric(block[337:345])
            prefix = b""
            if magic == b"ustar\0" and trailer == b"tar\0":  # star
                prefix = _string(block[345:476])
                header.atime_ns = _numeric(block[476:488]) * 1_000_000_000
            elif magic == b"ustar\0":
                prefix = _string(block[345:500])
            else:  # GNU: access and change times where set
                try:
                    if block[345] != 0:
                        header.atime_ns = _numeric(block[345:357]) * 1_000_000_000
                    if block[357] != 0:
                        _numeric(block[357:369])
                except TarError:  # Go: a buggy GNU header; its prefix may be a USTAR one
                    header.atime_ns = None
                    candidate = _string(block[345:500])
                    if all(0 < c < 0x80 for c in candidate):
                        prefix = candidate
            if prefix:
                header.name = prefix + b"/" + header.name
        return header

    @staticmethod
    def _check_sum(block: bytes) -> None:
        try:
            stored = _octal(block[148:156])
        except TarError:
            raise TarError("invalid tar header checksum field") from None
        unsigned = sum(block[:148]) + sum(block[156:]) + 8 * 0x20
        if stored == unsigned:
            return
        negatives = sum(1 for c in block[:148] if c >= 0x80) + sum(1 for c in block[156:] if c >= 0x80)
        if stored != unsigned - 256 * negatives:
            raise TarError("invalid tar header (bad checksum)")

    @staticmethod
    def _merge(header: TarHeader, records: dict[bytes, bytes]) -> None:
        """Apply PAX records to ``header`` (Go's mergePAX): empty values keep the header's own."""
        for key, value in records.items():
            if not value:
                continue
            if key == b"path":
                header.name = value
            elif key == b"linkpath":
                header.linkname = value
            elif key == b"uid":
                header.uid = _decimal(value, "uid")
            elif key == b"gid":
                header.gid = _decimal(value, "gid")
            elif key == b"size":
                header.size = _decimal(value, "size")
            elif key == b"mtime":
                header.mtime_ns = pax_time_ns(value)
            elif key == b"atime":
                header.atime_ns = pax_time_ns(value)
            elif key == b"ctime":
                pax_time_ns(value)  # validated as Go does; containerd does not use it
        header.pax = records
