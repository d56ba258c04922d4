"""The bytes of one ranged read in progress: which are still missing, which request asks for
which, and where the bytes of an answer go. Pure bookkeeping, no I/O: blob.py does the HTTP.

A read's ranges become *pieces*. A request claims pieces (one is split when it is bigger than the
link allows, see sizing.py) and asks for each one's remainder. An ``Answer`` takes the response
body as it arrives and puts each byte where its part's ``Content-Range`` (or, for a 200, its
position in the whole blob) says it belongs, keeping it only where it extends what a piece already
holds. So a piece keeps what arrived before a cut, and the next request asks for the rest alone.
At the end the pieces of each range are joined in order, checked to tile it exactly.

Every answer is bounded before it is read: a 206 may carry at most the span of what was asked
(plus bounded multipart framing), a 200 at most the blob up to the last byte needed. Reading stops
as soon as every piece of the request is complete, so nothing past what was asked is ever taken.
Whatever the body, only ``WrongAnswer``, ``PastEnd`` or ``SizeMismatch`` escape.
"""

from __future__ import annotations

import bisect
import sys
from collections import deque
from collections.abc import Iterable, Sequence

from snapshotter.fetcher.multipart import (
    ByterangesReader,
    MultipartError,
    PartHeader,
    content_type,
    parse_content_range,
)

Range = tuple[int, int]
FRAMING_BYTES = 16 << 10  # multipart framing allowed per answer (preamble, delimiters, headers)...
FRAMING_BYTES_PER_RANGE = 1 << 10  # ...plus this per range asked for


class WrongAnswer(ValueError):  # noqa: N818 - named for what it is, like the fetcher's errors
    """The answer is malformed or does not carry what was asked; whatever it placed was withdrawn."""


class PastEnd(ValueError):  # noqa: N818
    """A whole-blob answer ended before a range asked for: the range lies past the end of the blob."""


class SizeMismatch(ValueError):  # noqa: N818
    """The answer states a blob size other than the one expected."""


class Piece:
    """A byte range ``[start, end)`` of the blob and the prefix of it received so far."""

    __slots__ = ("_chunks", "_mark", "end", "have", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.have = 0
        self._chunks: list[bytes] = []
        self._mark = (0, 0)

    def __repr__(self) -> str:
        return f"Piece([{self.start}, {self.end}), have={self.have})"

    @property
    def need(self) -> int:
        """The offset of the first byte still missing."""
        return self.start + self.have

    @property
    def done(self) -> bool:
        return self.need >= self.end

    @property
    def remainder(self) -> Range:
        return (self.need, self.end)

    def take(self, offset: int, data: bytes) -> int:
        """Keep what of ``data`` (blob bytes from ``offset``) extends this piece; how many bytes."""
        need = self.start + self.have
        if need >= self.end or not offset <= need < offset + len(data):
            return 0
        part = data[need - offset : self.end - offset]
        self._chunks.append(part)
        self.have += len(part)
        return len(part)

    def split(self, at: int) -> Piece:
        """Shorten this piece to end at ``at`` (not before what it holds); the rest as a new piece."""
        assert self.need <= at < self.end
        rest = Piece(at, self.end)
        self.end = at
        return rest

    def mark(self) -> None:
        self._mark = (len(self._chunks), self.have)

    def rollback(self) -> int:
        """Drop what arrived since ``mark``; how many bytes."""
        count, have = self._mark
        dropped = self.have - have
        del self._chunks[count:]
        self.have = have
        return dropped

    def data(self) -> bytes:
        return b"".join(self._chunks)


class Transfer:
    """The pieces of one read, and which of them no request is asking for (``pending``)."""

    def __init__(self, ranges: Sequence[Range]) -> None:
        self.ranges = list(ranges)
        self.pieces = [Piece(start, end) for start, end in self.ranges if end > start]
        self._pending: deque[Piece] = deque(self.pieces)

    @property
    def received(self) -> int:
        return sum(p.have for p in self.pieces)

    @property
    def complete(self) -> bool:
        return all(p.done for p in self.pieces)

    def restart(self) -> None:
        """Forget which requests hold which pieces (they were abandoned): all missing are pending."""
        self._pending = deque(sorted((p for p in self.pieces if not p.done), key=lambda p: p.start))

    def claim(self, budget: int, max_ranges: int) -> list[Piece]:
        """The next pieces for one request: at most ``max_ranges`` of them and ``budget`` bytes
        still missing in all; a first piece bigger than ``budget`` is split to fit."""
        batch: list[Piece] = []
        total = 0
        while self._pending and len(batch) < max_ranges and total < budget:
            piece = self._pending.popleft()
            if piece.done:
                continue
            missing = piece.end - piece.need
            if missing > budget - total:
                if batch:  # the next request takes it
                    self._pending.appendleft(piece)
                    break
                rest = piece.split(piece.need + budget)
                self.pieces.append(rest)
                self._pending.appendleft(rest)
                missing = budget
            batch.append(piece)
            total += missing
        return sorted(batch, key=lambda p: p.start)

    def release(self, pieces: Iterable[Piece]) -> None:
        """Make pieces a request did not complete pending again."""
        missing = [p for p in pieces if not p.done]
        if missing:
            self._pending = deque(sorted([*self._pending, *missing], key=lambda p: p.start))

    def result(self) -> list[bytes]:
        """The bytes of each range, its pieces joined; raises if they do not tile it exactly."""
        pieces = sorted(self.pieces, key=lambda p: p.start)
        starts = [p.start for p in pieces]
        out = []
        for start, end in self.ranges:
            if end <= start:
                out.append(b"")
                continue
            i = bisect.bisect_left(starts, start)
            at, chunks = start, []
            while at < end:
                if i >= len(pieces) or pieces[i].start != at or not pieces[i].done:
                    raise AssertionError(f"pieces do not tile [{start}, {end}) at {at}: {pieces[i : i + 2]}")
                chunks.append(pieces[i].data())
                at = pieces[i].end
                i += 1
            if at != end:
                raise AssertionError(f"pieces overrun [{start}, {end})")
            data = b"".join(chunks)
            if len(data) != end - start:
                raise AssertionError(f"[{start}, {end}) stitched to {len(data)} bytes")
            out.append(data)
        return out


class Answer:
    """Places the body of one response to a request for ``batch`` (asking for ``asked``, sorted),
    as it arrives. ``status`` is 200 (the whole blob) or 206; the headers are the response's.
    ``size`` is the blob size when known. Raises ``WrongAnswer``/``SizeMismatch`` for headers
    that cannot be right; ``feed`` and ``finish`` raise ``WrongAnswer`` for a body that is not,
    after withdrawing everything this answer had placed."""

    def __init__(
        self,
        batch: Sequence[Piece],
        asked: Sequence[Range],
        *,
        status: int,
        content_type_header: str,
        content_range: str,
        content_length: int | None,
        size: int | None,
    ) -> None:
        self._pieces = sorted((p for p in batch if not p.done), key=lambda p: p.start)
        for p in self._pieces:
            p.mark()
        self._size = size
        self.whole = status == 200
        self.total: int | None = None  # the blob size this answer states
        self.parts: list[Range] = []  # the byte ranges the answer carries, as announced
        self.consumed = 0  # body bytes read
        self._reader: ByterangesReader | None = None
        self._targets: list[Piece] = []  # the pieces the current part covers
        self._offset = 0  # blob offset of the next body byte of the current part
        self._part_end = 0
        self._next = 0  # first target that may still take bytes
        if not asked or not self._pieces:
            raise ValueError("an answer needs the ranges asked for and pieces still missing")
        span = asked[-1][1] - asked[0][0]
        try:
            if self.whole:
                if size is not None and content_length is not None and content_length != size:
                    raise WrongAnswer(f"body has {content_length} of {size} bytes")
                self.total = content_length if content_length is not None else size
                self._limit = max(p.end for p in self._pieces)
                self._begin(0, self.total if self.total is not None else sys.maxsize, self.total)
                return
            if status != 206:
                raise ValueError(f"not a body of blob bytes: HTTP {status}")
            media, boundary = content_type(content_type_header)
            if media == "multipart/byteranges":
                if boundary is None:
                    raise WrongAnswer("multipart/byteranges without a boundary")
                framing = FRAMING_BYTES + FRAMING_BYTES_PER_RANGE * len(asked)
                self._limit = span + framing
                if content_length is not None and content_length > self._limit:
                    raise WrongAnswer(f"a {content_length}-byte answer to a request for {span} bytes")
                self._reader = ByterangesReader(boundary, max_framing=framing)
                return
            start, end, total = parse_content_range(content_range)
            if start < asked[0][0]:  # never so from a sound server; would make us read unasked bytes
                raise WrongAnswer(f"asked for {_ranges(asked)}, got [{start}, {end})")
            if content_length is not None and content_length != end - start:
                raise WrongAnswer(f"body has {content_length} bytes, Content-Range announces {end - start}")
            self._limit = span
            self._begin(start, end, total)
        except MultipartError as e:
            raise WrongAnswer(str(e)) from None

    @property
    def satisfied(self) -> bool:
        """Every piece is complete: the rest of the body is not needed."""
        return all(p.done for p in self._pieces)

    @property
    def useless(self) -> bool:
        """A single-part answer that covers none of the pieces (known from its headers)."""
        return self._reader is None and not self._targets

    def missing(self) -> list[Piece]:
        return [p for p in self._pieces if not p.done]

    def describe(self) -> str:
        return _ranges(self.parts) or "no parts"

    def feed(self, data: bytes) -> int:
        """Place body bytes; returns how many were kept."""
        self.consumed += len(data)
        try:
            if self._reader is None:
                kept = self._place(data)
            else:
                kept = 0
                for event in self._reader.feed(data):
                    if isinstance(event, PartHeader):
                        self._begin(event.start, event.end, event.total)
                    else:
                        kept += self._place(event)
            if self.consumed > self._limit and not self.satisfied:
                raise WrongAnswer(f"the answer is longer than the {self._limit} bytes it may have")
            return kept
        except (WrongAnswer, MultipartError) as e:
            self.rollback()
            raise WrongAnswer(str(e)) from None

    def finish(self) -> None:
        """The body ended cleanly. Pieces may still be missing (see ``missing``), but no part may
        be short; a whole blob shorter than its size is short."""
        try:
            if self._reader is not None:
                for event in self._reader.finish():
                    if isinstance(event, PartHeader):
                        self._begin(event.start, event.end, event.total)
                    else:
                        self._place(event)
            elif self.whole:
                if self._size is not None and self._offset < min(self._size, self._limit):
                    raise WrongAnswer(f"body has {self._offset} of {self._size} bytes")
                if self.missing():
                    raise PastEnd(f"the blob ends at {self._offset}")
            elif self._offset < self._part_end:
                got, announced = self._offset - self.parts[-1][0], self._part_end - self.parts[-1][0]
                raise WrongAnswer(f"body has {got} bytes, Content-Range announces {announced}")
        except (WrongAnswer, MultipartError) as e:
            self.rollback()
            raise WrongAnswer(str(e)) from None

    def rollback(self) -> int:
        """Withdraw everything this answer placed; how many bytes."""
        return sum(p.rollback() for p in self._pieces)

    def _begin(self, start: int, end: int, total: int | None) -> None:
        if total is not None:
            if self._size is not None and total != self._size:
                raise SizeMismatch(f"server says the blob has {total} bytes, expected {self._size}")
            self.total = total
        self.parts.append((start, end))
        self._offset, self._part_end, self._next = start, end, 0
        # A part serves a piece only if it holds all the piece still needs: a server that answers
        # other bytes than asked gets no credit for any overlap.
        self._targets = [p for p in self._pieces if not p.done and start <= p.need and p.end <= end]

    def _place(self, data: bytes) -> int:
        offset = self._offset
        if offset + len(data) > self._part_end:
            part = f"[{self.parts[-1][0]}, {self._part_end})"
            raise WrongAnswer(f"part {part} has more bytes than it announces")
        self._offset += len(data)
        targets, kept = self._targets, 0
        while self._next < len(targets) and targets[self._next].done:
            self._next += 1
        for piece in targets[self._next :]:
            if piece.need >= offset + len(data):
                break
            kept += piece.take(offset, data)
        return kept


def _ranges(ranges: Iterable[Range]) -> str:
    return ", ".join(f"[{a}, {b})" for a, b in ranges)
