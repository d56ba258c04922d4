"""HTTP range plumbing: ``Range``/``Content-Range`` headers and ``multipart/byteranges`` bodies.

Pure functions on bytes and strings, no I/O. Offsets here are half-open ``[start, end)`` like the
rest of lazysnap; the inclusive HTTP form appears only inside header strings.

Parts are cut by the length their own ``Content-Range`` announces rather than by searching for the
boundary, so blob bytes that happen to contain the boundary cannot truncate a part; the delimiter
must then follow, which catches short or corrupted bodies. Line ends may be CRLF or bare LF.
``ByterangesReader`` parses a body as it arrives, buffering only its (bounded) framing, so a
response is checked and used piece by piece and never needs to be held whole.
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
    """Split a whole ``multipart/byteranges`` body into its parts, in the order the server sent them."""
    reader = ByterangesReader(boundary)
    found: list[tuple[PartHeader, list[bytes]]] = []
    for event in [*reader.feed(body), *reader.finish()]:
        if isinstance(event, PartHeader):
            found.append((event, []))
        else:
            found[-1][1].append(event)
    return [BytePart(h.start, h.end, h.total, b"".join(data)) for h, data in found]


@dataclass(frozen=True)
class PartHeader:
    """The start of one part: its data, ``end - start`` bytes, follows as ``bytes`` events."""

    start: int
    end: int
    total: int | None


# States of ByterangesReader
_PREAMBLE, _DELIMITED, _HEADERS, _DATA, _AFTER_DATA, _DONE = range(6)


class ByterangesReader:
    """An incremental ``multipart/byteranges`` parser: ``feed`` body bytes as they arrive and get
    back, in order, a ``PartHeader`` for each part followed by that part's data as ``bytes``;
    call ``finish`` at a clean end of the body. After the close delimiter (``done``) the rest of
    the body (the epilogue) is ignored, so a caller may stop reading there.

    Only framing (preamble, delimiter lines, part headers) is buffered, and at most
    ``max_framing`` bytes of it in all: data passes through, so memory stays bounded whatever a
    server sends."""

    def __init__(self, boundary: str, *, max_framing: int | None = None) -> None:
        self._delimiter = b"--" + boundary.encode("latin-1")
        self._buffer = bytearray()
        self._state = _PREAMBLE
        self._headers: dict[str, str] = {}
        self._part: PartHeader | None = None
        self._left = 0  # data bytes still to come in the current part
        self._parts = 0  # parts begun
        self._framing = 0  # framing bytes consumed
        self._max_framing = max_framing

    @property
    def done(self) -> bool:
        """The close delimiter has been read."""
        return self._state == _DONE

    def feed(self, data: bytes) -> list[PartHeader | bytes]:
        events: list[PartHeader | bytes] = []
        if self._state == _DONE or not data:
            return events
        if self._state == _DATA and not self._buffer:  # the common case: data passes straight on
            n = min(self._left, len(data))
            events.append(data[:n])
            self._left -= n
            if not self._left:
                self._state = _AFTER_DATA
            data = data[n:]
            if not data:
                return events
        self._buffer += data
        self._parse(events, final=False)
        return events

    def finish(self) -> list[PartHeader | bytes]:
        """The body ended: parse what is left, raising if the body is not complete."""
        events: list[PartHeader | bytes] = []
        self._parse(events, final=True)
        if self._state == _DONE:
            return events
        if self._state == _PREAMBLE:
            raise MultipartError("no multipart boundary in body")
        if self._state == _DELIMITED:
            raise MultipartError("boundary line is not terminated")
        if self._state == _HEADERS:
            raise MultipartError("part headers are not terminated")
        if self._state == _DATA:
            assert self._part is not None
            size = self._part.end - self._part.start
            raise MultipartError(f"part {self._parts - 1} is short: {size - self._left} of {size} bytes")
        raise MultipartError(f"part {self._parts - 1} is not followed by the boundary")

    def _consume(self, n: int, framing: bool = True) -> None:
        del self._buffer[:n]
        if framing:
            self._framing += n
            if self._max_framing is not None and self._framing > self._max_framing:
                raise MultipartError(f"multipart framing is longer than {self._max_framing} bytes")

    def _parse(self, events: list[PartHeader | bytes], *, final: bool) -> None:
        """Advance through the buffer as far as it allows."""
        while self._step(events, final):
            pass
        # Waiting for more framing: what is buffered counts against the bound already.
        waiting = self._state != _DATA and self._max_framing is not None
        if waiting and self._framing + len(self._buffer) > (self._max_framing or 0):
            raise MultipartError(f"multipart framing is longer than {self._max_framing} bytes")

    def _step(self, events: list[PartHeader | bytes], final: bool) -> bool:
        """One step of the state machine; False when it needs more bytes (or is done)."""
        buf, delimiter = self._buffer, self._delimiter
        if self._state == _PREAMBLE:
            # The first delimiter starts the body or a line; anything before it is preamble.
            if not self._framing and buf.startswith(delimiter):
                self._consume(len(delimiter))
            else:
                at = buf.find(b"\n" + delimiter)
                if at < 0:
                    if len(buf) > len(delimiter):  # keep only what may begin a delimiter line
                        self._consume(len(buf) - len(delimiter))
                    return False
                self._consume(at + 1 + len(delimiter))
            self._state = _DELIMITED
            return True
        if self._state == _DELIMITED:
            if len(buf) < 2 and not final:
                return False
            if buf.startswith(b"--"):  # the close delimiter
                if not self._parts:
                    raise MultipartError("multipart body has no parts")
                self._state = _DONE
                self._buffer.clear()
                return False
            pos = 0
            while pos < len(buf) and buf[pos] in b" \t":  # transport padding
                pos += 1
            if buf.startswith(b"\r\n", pos):
                self._consume(pos + 2)
            elif buf.startswith(b"\n", pos):
                self._consume(pos + 1)
            elif pos == len(buf) or (buf[pos:] == b"\r" and not final):
                return False
            else:
                raise MultipartError("boundary line is not terminated")
            self._state, self._headers = _HEADERS, {}
            return True
        if self._state == _HEADERS:
            eol = buf.find(b"\n")
            if eol < 0:
                return False
            line = bytes(buf[:eol]).rstrip(b"\r")
            self._consume(eol + 1)
            if line:
                name, sep, value = line.decode("latin-1").partition(":")
                if not sep:
                    raise MultipartError(f"malformed part header {line[:80]!r}")
                self._headers[name.strip().lower()] = value.strip()
                return True
            announced = self._headers.get("content-range")
            if announced is None:
                raise MultipartError(f"part {self._parts} has no Content-Range")
            start, end, total = parse_content_range(announced)
            self._part = PartHeader(start, end, total)
            self._parts += 1
            events.append(self._part)
            self._state, self._left = _DATA, end - start
            return True
        if self._state == _DATA:
            if not buf:
                return False
            n = min(self._left, len(buf))
            events.append(bytes(buf[:n]))
            self._consume(n, framing=False)
            self._left -= n
            if not self._left:
                self._state = _AFTER_DATA
            return True
        if self._state == _AFTER_DATA:
            # An optional line end, then the next delimiter; wait until that much is here.
            if len(buf) < len(delimiter) + 2 and not final:
                return False
            pos = 2 if buf.startswith(b"\r\n") else 1 if buf.startswith(b"\n") else 0
            if not buf.startswith(delimiter, pos):
                raise MultipartError(f"part {self._parts - 1} is not followed by the boundary")
            self._consume(pos + len(delimiter))
            self._state = _DELIMITED
            return True
        return False
