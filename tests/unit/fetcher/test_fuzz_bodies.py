"""Property-based fuzzing of how response bodies are taken apart (multipart.py, transfer.py):
whatever a server sends, however the network splits it, only the documented errors escape, no
more is read than a request may carry, and no byte is ever put where it does not belong.
Example counts are bounded to keep CI fast."""

from __future__ import annotations

import hashlib
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.fetcher.multipart import (
    BytePart,
    ByterangesReader,
    MultipartError,
    PartHeader,
    parse_byteranges,
)
from snapshotter.fetcher.transfer import (
    FRAMING_BYTES,
    FRAMING_BYTES_PER_RANGE,
    Answer,
    PastEnd,
    Piece,
    SizeMismatch,
    Transfer,
    WrongAnswer,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DATA = hashlib.shake_256(b"fuzz bodies").digest(5000)  # every byte depends on its position
BOUNDARY = "B0und"


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    """``body`` in pieces at the (sorted, deduplicated) cut points, as a network delivers it."""
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in itertools.pairwise(points) if b > a]


def incremental(body: bytes, cuts: list[int]) -> list[BytePart]:
    reader = ByterangesReader(BOUNDARY)
    found: list[tuple[PartHeader, list[bytes]]] = []
    events = [e for chunk in split(body, cuts) for e in reader.feed(chunk)] + reader.finish()
    for event in events:
        if isinstance(event, PartHeader):
            found.append((event, []))
        else:
            found[-1][1].append(event)
    return [BytePart(h.start, h.end, h.total, b"".join(d)) for h, d in found]


@st.composite
def ranges_of_data(draw: st.DrawFn, max_ranges: int = 6) -> list[tuple[int, int]]:
    points = draw(st.lists(st.integers(0, len(DATA)), min_size=2, max_size=2 * max_ranges, unique=True))
    points.sort()
    return [(a, b) for a, b in zip(points[::2], points[1::2], strict=False) if b > a] or [(0, 1)]


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[bytes, list[BytePart]]:
    """A well-formed multipart/byteranges body of DATA (any line ends, padding, preamble and
    epilogue) and the parts it holds."""
    ranges = draw(ranges_of_data())
    nl = draw(st.sampled_from([b"\r\n", b"\n"]))
    preamble = draw(st.sampled_from([b"", b"preamble" + nl, b"x --B0und y" + nl]))
    padding = draw(st.sampled_from([b"", b" ", b" \t "]))
    epilogue = draw(st.binary(max_size=20))
    body = preamble
    for a, b in ranges:
        headers = b"Content-Type: application/octet-stream" + nl if draw(st.booleans()) else b""
        body += b"--" + BOUNDARY.encode() + padding + nl + headers
        body += f"Content-Range: bytes {a}-{b - 1}/{len(DATA)}".encode() + nl + nl + DATA[a:b] + nl
    body += b"--" + BOUNDARY.encode() + b"--" + epilogue
    return body, [BytePart(a, b, len(DATA), DATA[a:b]) for a, b in ranges]


@FUZZ
@given(multipart_bodies(), st.lists(st.integers(0, 10_000), max_size=12))
def test_streamed_multipart_equals_whole_parse(sample: tuple[bytes, list[BytePart]], cuts: list[int]) -> None:
    body, parts = sample
    assert parse_byteranges(body, BOUNDARY) == parts
    assert incremental(body, cuts) == parts


@FUZZ
@given(
    multipart_bodies(),
    st.integers(0, 10_000),
    st.binary(max_size=8),
    st.lists(st.integers(0, 10_000), max_size=8),
)
def test_mangled_multipart_fails_the_same_streamed_or_whole(
    sample: tuple[bytes, list[BytePart]], at: int, junk: bytes, cuts: list[int]
) -> None:
    body, _ = sample
    at %= len(body) + 1
    mangled = body[:at] + junk + body[at + len(junk) // 2 :]
    try:
        whole: list[BytePart] | MultipartError = parse_byteranges(mangled, BOUNDARY)
    except MultipartError as e:
        whole = e
    try:
        streamed: list[BytePart] | MultipartError = incremental(mangled, cuts)
    except MultipartError as e:
        streamed = e
    if isinstance(whole, MultipartError):
        assert isinstance(streamed, MultipartError)
    else:
        assert streamed == whole


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8), st.integers(0, 300))
def test_arbitrary_bytes_only_multipart_errors(body: bytes, cuts: list[int], max_framing: int) -> None:
    reader = ByterangesReader(BOUNDARY, max_framing=max_framing)
    data = 0
    try:
        for chunk in split(body, cuts):
            data += sum(len(e) for e in reader.feed(chunk) if isinstance(e, bytes))
        reader.finish()
    except MultipartError:
        return
    assert data <= len(body)


# -- answers ---------------------------------------------------------------------------------------


@st.composite
def pieces_with_progress(draw: st.DrawFn) -> list[Piece]:
    """Pieces of DATA, each holding a random prefix already (the bytes a cut answer left)."""
    pieces = []
    for a, b in draw(ranges_of_data()):
        piece = Piece(a, b)
        have = draw(st.integers(0, b - a - 1))
        piece.take(a, DATA[a : a + have])
        pieces.append(piece)
    return pieces


@st.composite
def honest_answers(draw: st.DrawFn, asked: list[tuple[int, int]]) -> tuple[int, dict[str, str], bytes]:
    """What a sound server may answer to a request for ``asked``: the whole blob, one part (the
    range, or all ranges coalesced), or multipart (possibly only the first parts)."""
    style = draw(st.sampled_from(["whole", "single", "multipart"]))
    if style == "whole":
        return 200, {"Content-Length": str(len(DATA))}, DATA
    if style == "single":
        a, b = asked[0][0], asked[-1][1] if draw(st.booleans()) else asked[0][1]
        headers = {"Content-Range": f"bytes {a}-{b - 1}/{len(DATA)}", "Content-Length": str(b - a)}
        return 206, headers, DATA[a:b]
    kept = asked[: draw(st.integers(1, len(asked)))]
    body = b""
    for a, b in kept:
        head = f"--{BOUNDARY}\r\nContent-Range: bytes {a}-{b - 1}/{len(DATA)}\r\n\r\n"
        body += head.encode() + DATA[a:b] + b"\r\n"
    body += f"--{BOUNDARY}--\r\n".encode()
    return 206, {"Content-Type": f"multipart/byteranges; boundary={BOUNDARY}"}, body


def run_answer(
    pieces: list[Piece],
    asked: list[tuple[int, int]],
    status: int,
    headers: dict[str, str],
    body: bytes,
    cuts: list[int],
    cut_at: int | None,
    size: int | None,
) -> Answer | None:
    """Feed ``body`` (cut after ``cut_at`` bytes if given) as blob.py does; None if refused."""
    length = headers.get("Content-Length")
    try:
        answer = Answer(
            pieces,
            asked,
            status=status,
            content_type_header=headers.get("Content-Type", ""),
            content_range=headers.get("Content-Range", ""),
            content_length=int(length) if length is not None and length.isdigit() else None,
            size=size,
        )
    except (WrongAnswer, SizeMismatch):
        return None
    if answer.useless:
        return answer
    sent = body if cut_at is None else body[: cut_at % (len(body) + 1)]
    try:
        for chunk in split(sent, cuts):
            answer.feed(chunk)
            if answer.satisfied:
                break
        else:
            if cut_at is None:
                answer.finish()
    except (WrongAnswer, PastEnd):
        pass
    return answer


def assert_in_place(pieces: list[Piece]) -> None:
    for p in pieces:
        assert 0 <= p.have <= p.end - p.start
        assert p.data() == DATA[p.start : p.start + p.have]


@FUZZ
@given(
    pieces_with_progress(),
    st.data(),
    st.lists(st.integers(0, 20_000), max_size=10),
    st.one_of(st.none(), st.integers(0, 20_000)),
)
def test_honest_answers_put_every_byte_in_place(
    pieces: list[Piece], data: st.DataObject, cuts: list[int], cut_at: int | None
) -> None:
    asked = [p.remainder for p in pieces]
    status, headers, body = data.draw(honest_answers(asked))
    answer = run_answer(pieces, asked, status, headers, body, cuts, cut_at, len(DATA))
    assert answer is not None
    assert_in_place(pieces)
    if cut_at is None and status == 200:
        assert all(p.done for p in pieces)  # a whole blob serves every range


HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            "bytes 0-9/5000",
            "bytes 100-4999/5000",
            "bytes 0-4999/*",
            "bytes 10-5/5000",
            f"multipart/byteranges; boundary={BOUNDARY}",
            "multipart/byteranges",
            "application/octet-stream",
            "",
        ]
    ),
    st.text(max_size=30),
)


@FUZZ
@given(
    pieces_with_progress(),
    st.sampled_from([200, 206]),
    st.dictionaries(st.sampled_from(["Content-Type", "Content-Range", "Content-Length"]), HEADER_VALUES),
    st.binary(max_size=3000),
    st.lists(st.integers(0, 3000), max_size=8),
    st.sampled_from([None, len(DATA), 100]),
)
def test_any_answer_reads_within_bounds(
    pieces: list[Piece],
    status: int,
    headers: dict[str, str],
    body: bytes,
    cuts: list[int],
    size: int | None,
) -> None:
    asked = [p.remainder for p in pieces]
    before = [(p.start, p.end, p.have) for p in pieces]
    answer = run_answer(pieces, asked, status, headers, body, cuts, None, size)
    assert [(p.start, p.end) for p in pieces] == [(a, b) for a, b, _ in before]
    for p, (_, _, had) in zip(pieces, before, strict=True):
        assert had <= p.have <= p.end - p.start  # nothing lost, nothing beyond the piece
    if answer is not None:
        span = asked[-1][1] - asked[0][0]
        framing = FRAMING_BYTES + FRAMING_BYTES_PER_RANGE * len(asked)
        bound = max(p.end for p in pieces) if status == 200 else span + framing
        assert answer.consumed <= bound + max((len(c) for c in split(body, cuts)), default=0)


@FUZZ
@given(
    ranges_of_data(max_ranges=8),
    st.integers(50, 3000),
    st.integers(1, 5),
    st.lists(st.integers(0, 4000), min_size=1, max_size=60),
)
def test_claimed_and_cut_pieces_stitch_exactly(
    ranges: list[tuple[int, int]], budget: int, max_ranges: int, arrivals: list[int]
) -> None:
    transfer = Transfer(ranges)
    n = 0
    while not transfer.complete:
        batch = transfer.claim(budget, max_ranges)
        assert batch and len(batch) <= max_ranges
        assert sum(p.end - p.need for p in batch) <= budget
        for piece in batch:  # each gets a random part of what it asked for (a cut), or all of it
            got = 1 + arrivals[n % len(arrivals)]
            n += 1
            piece.take(piece.need, DATA[piece.need : min(piece.end, piece.need + got)])
        transfer.release(batch)
    assert transfer.result() == [DATA[a:b] for a, b in ranges]
