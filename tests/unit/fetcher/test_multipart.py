"""multipart/byteranges and Content-Range parsing, including the awkward cases real servers send."""

from __future__ import annotations

import pytest

from snapshotter.fetcher.multipart import (
    BytePart,
    MultipartError,
    content_type,
    parse_byteranges,
    parse_content_range,
    range_header,
)

from .conftest import multipart_body

DATA = bytes(range(256)) * 4


def test_range_header_is_inclusive() -> None:
    assert range_header([(0, 10), (20, 21)]) == "bytes=0-9,20-20"


def test_content_range() -> None:
    assert parse_content_range("bytes 0-9/100") == (0, 10, 100)
    assert parse_content_range("Bytes  5-5/*") == (5, 6, None)
    for bad in ("bytes 9-0/100", "bytes 0-100/100", "items 0-1/2", "bytes */100", ""):
        with pytest.raises(MultipartError):
            parse_content_range(bad)


def test_content_type_boundary_quoted_and_plain() -> None:
    assert content_type('multipart/byteranges; boundary="a b;c"') == ("multipart/byteranges", "a b;c")
    assert content_type("Multipart/ByteRanges;boundary=xyz") == ("multipart/byteranges", "xyz")
    assert content_type("application/octet-stream") == ("application/octet-stream", None)


@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
def test_parts_with_either_line_end(newline: bytes) -> None:
    body = multipart_body(DATA, [(0, 10), (100, 300)], "B", newline=newline)
    assert parse_byteranges(body, "B") == [
        BytePart(0, 10, len(DATA), DATA[0:10]),
        BytePart(100, 300, len(DATA), DATA[100:300]),
    ]


def test_preamble_epilogue_and_padding() -> None:
    body = b"This is a preamble --B that is not a delimiter\r\n" + multipart_body(DATA, [(5, 9)], "B")
    body = body.replace(b"--B\r\n", b"--B  \t\r\n") + b"epilogue\r\n"
    assert parse_byteranges(body, "B") == [BytePart(5, 9, len(DATA), DATA[5:9])]


def test_boundary_inside_data_does_not_split_a_part() -> None:
    data = b"xx\r\n--B\r\nyy" + DATA
    body = multipart_body(data, [(0, 20), (30, 40)], "B")
    assert [p.data for p in parse_byteranges(body, "B")] == [data[0:20], data[30:40]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"no boundary here", "no multipart boundary"),
        (b"--B--\r\n", "no parts"),
        (b"--B\r\nContent-Type: x\r\n\r\n0123\r\n--B--", "no Content-Range"),
        (b"--B\r\nContent-Range: bytes 0-9/10\r\n\r\n0123\r\n--B--", "not followed by the boundary"),
        (b"--B\r\nContent-Range: bytes 0-9/10\r\n\r\n0123", "short"),
        (b"--B\r\nContent-Range bytes 0-9/10\r\n\r\n", "malformed part header"),
        (b"--B\r\nContent-Range: bytes 0-3/10", "not terminated"),
    ],
)
def test_malformed(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        parse_byteranges(body, "B")
