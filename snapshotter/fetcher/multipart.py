"""HTTP range plumbing: ``Range``/``Content-Range`` headers and ``multipart/byteranges`` bodies.

Pure functions on bytes and strings, no I/O. Offsets here are half-open ``[start, end)`` like the
rest of lazysnap; the inclusive HTTP form appears only inside header strings.

Parts are cut by the length their own ``Content-Range`` announces rather than by searching for the
boundary, so blob bytes that happen to contain the boundary cannot truncate a part; the delimiter
must then follow, which catches short or corrupted bodies. Line ends may be CRLF or bare LF.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", re.IGNORECASE)


class MultipartError(ValueError):
    """The body or a header does not follow RFC 9110's multipart/byteranges or Content-Range."""


@dataclass(frozen=True)
class BytePart:
    """One part of a ranged response: bytes ``[start, end)`` of a blob of ``total`` bytes."""

    start: int
    end: int
    total: int | None  # None when the server wrote "*"
    data: bytes


def range_header(ranges: Sequence[tuple[int, int]]) -> str:
    """The ``Range`` header value asking for the half-open ``ranges``."""
    return "bytes=" + ",".join(f"{start}-{end - 1}" for start, end in ranges)


def parse_content_range(value: str) -> tuple[int, int, int | None]:
    """Parse ``bytes a-b/total`` into half-open ``(a, b + 1, total)``; ``total`` None for ``*``."""
    m = _CONTENT_RANGE.fullmatch(value)
    if not m:
        raise MultipartError(f"malformed Content-Range {value!r}")
    start, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < start or (total is not None and last >= total):
        raise MultipartError(f"inconsistent Content-Range {value!r}")
    return start, last + 1, total


def content_type(value: str) -> tuple[str, str | None]:
    """Split a Content-Type into its lower-cased media type and its (unquoted) boundary, if any."""
    msg = Message()
    msg["Content-Type"] = value
    boundary = msg.get_param("boundary")
    return msg.get_content_type(), boundary if isinstance(boundary, str) and boundary else None


def parse_byteranges(body: bytes, boundary: str) -> list[BytePart]:
    """Split a ``multipart/byteranges`` body into its parts, in the order the server sent them."""
    delimiter = b"--" + boundary.encode("latin-1")
    # The first delimiter starts the body or a line; anything before it is preamble to ignore.
    if body.startswith(delimiter):
        pos = 0
    else:
        pos = body.find(b"\n" + delimiter)
        if pos < 0:
            raise MultipartError("no multipart boundary in body")
        pos += 1
    parts: list[BytePart] = []
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):  # the close delimiter; the rest is epilogue
            if not parts:
                raise MultipartError("multipart body has no parts")
            return parts
        pos = _skip_line_end(body, pos)
        headers, pos = _read_headers(body, pos)
        value = headers.get("content-range")
        if value is None:
            raise MultipartError(f"part {len(parts)} has no Content-Range")
        start, end, total = parse_content_range(value)
        data = body[pos : pos + end - start]
        if len(data) != end - start:
            raise MultipartError(f"part {len(parts)} is short: {len(data)} of {end - start} bytes")
        parts.append(BytePart(start, end, total, data))
        pos += end - start
        if body.startswith(b"\r\n", pos):
            pos += 2
        elif body.startswith(b"\n", pos):
            pos += 1
        if not body.startswith(delimiter, pos):
            raise MultipartError(f"part {len(parts) - 1} is not followed by the boundary")


def _skip_line_end(body: bytes, pos: int) -> int:
    """Skip transport padding (spaces, tabs) after a delimiter and the line end that follows."""
    while pos < len(body) and body[pos] in b" \t":
        pos += 1
    if body.startswith(b"\r\n", pos):
        return pos + 2
    if body.startswith(b"\n", pos):
        return pos + 1
    raise MultipartError("boundary line is not terminated")


def _read_headers(body: bytes, pos: int) -> tuple[dict[str, str], int]:
    headers: dict[str, str] = {}
    while True:
        eol = body.find(b"\n", pos)
        if eol < 0:
            raise MultipartError("part headers are not terminated")
        line = body[pos:eol].rstrip(b"\r")
        pos = eol + 1
        if not line:
            return headers, pos
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise MultipartError(f"malformed part header {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
