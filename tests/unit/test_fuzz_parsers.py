"""Property-based fuzzing of everything that parses untrusted bytes: footers, TOCs (raw and as
JSON inside a valid member), the zstd:chunked annotations and the filter language. Whatever the
input, only the documented error may escape. Example counts are bounded to keep CI fast."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import tarfile
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.filters import FilterSyntaxError, parse_all
from snapshotter.formats import FormatError, TocLocation, locate_toc, parse_toc
from snapshotter.formats.estargz import gzip_footer
from snapshotter.formats.index import Compression

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# TOC entries made of plausible keys with arbitrary values: reaches the validator, not only JSON.
ENTRY_KEYS = [
    *("name", "type", "size", "mode", "uid", "gid", "linkName", "digest", "offset", "innerOffset"),
    *("chunkOffset", "chunkSize", "chunkDigest", "devMajor", "devMinor", "xattrs", "modtime"),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)
entries = st.lists(st.dictionaries(st.sampled_from(ENTRY_KEYS), json_values, max_size=8), max_size=6)
types = st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "bogus"])


def toc_member(toc: dict[str, object]) -> bytes:
    """A gzip member holding the tar entry stargz.index.json, as an eStargz blob carries it."""
    data = json.dumps(toc).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 10**12))
def test_footer_bytes(tail: bytes, extra: int) -> None:
    with contextlib.suppress(FormatError):
        locate_toc(tail, len(tail) + extra)


ZSTD_KEYS = [
    "io.containers.zstd-chunked.manifest-position",
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-checksum",
]


@FUZZ
@given(st.dictionaries(st.sampled_from(ZSTD_KEYS), st.text(max_size=40)), st.binary(max_size=80))
def test_zstd_annotations(annotations: dict[str, str], tail: bytes) -> None:
    with contextlib.suppress(FormatError):
        locate_toc(tail, 10**6, annotations)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([Compression.GZIP, Compression.ZSTD]))
def test_raw_toc_bytes(raw: bytes, compression: Compression) -> None:
    location = TocLocation("estargz" if compression == Compression.GZIP else "zstdchunked", compression,
                           offset=1000, length=len(raw), footer_size=51)  # fmt: skip
    with contextlib.suppress(FormatError):
        parse_toc(raw, location, blob_size=1000 + len(raw) + 51, expected_digest=None, verify=False)


@FUZZ
@given(entries, st.lists(types, max_size=6), st.integers(0, 3))
def test_toc_json_reaches_the_validator(
    raw_entries: list[dict[str, object]], kinds: list[str], version: int
) -> None:
    for entry, kind in zip(raw_entries, kinds, strict=False):
        entry["type"] = kind
    member = toc_member({"version": version, "entries": raw_entries})
    offset = 4096
    blob_size = offset + len(member) + len(gzip_footer(offset))
    location = TocLocation("estargz", Compression.GZIP, offset=offset, length=len(member), footer_size=51)
    with contextlib.suppress(FormatError):
        parse_toc(member, location, blob_size=blob_size, expected_digest=None, verify=False)


@FUZZ
@given(st.lists(st.text(alphabet=st.sampled_from('abc.=!~,"/|\\ x0_'), max_size=30), max_size=3))
def test_filters(filters: list[str]) -> None:
    with contextlib.suppress(FilterSyntaxError):
        parse_all(filters)


def test_bombs_stay_bounded() -> None:
    """A TOC member that inflates far past the limit is refused as a format error."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = bomb.compress(b"\0" * (80 << 20)) + bomb.flush()
    location = TocLocation("estargz", Compression.GZIP, offset=0, length=len(member), footer_size=51)
    try:
        parse_toc(
            member,
            location,
            blob_size=len(member) + 51,
            expected_digest=None,
            verify=False,
            max_toc_bytes=1 << 20,
        )
    except FormatError as exc:
        assert "TOC" in str(exc) or "large" in str(exc) or "limit" in str(exc)
    else:
        raise AssertionError("an 80 MiB TOC passed a 1 MiB limit")
