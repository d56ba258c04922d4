"""The tar reader accepts and refuses what Go's archive/tar (containerd's) does."""

from __future__ import annotations

import io
import tarfile

import pytest

from snapshotter.eager.tarreader import (
    MAX_SPECIAL_FILE,
    SparseError,
    TarError,
    TarHeader,
    TarReader,
    pax_time_ns,
)


def make_tar(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else info.size
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1_600_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def reader(data: bytes, piece: int = 7) -> TarReader:
    """A reader whose source returns at most ``piece`` bytes a call (short reads everywhere)."""
    stream = io.BytesIO(data)
    return TarReader(lambda n: stream.read(min(n, piece)))


def entries(data: bytes) -> list[tuple[TarHeader, bytes]]:
    tar = reader(data)
    out = []
    while (header := tar.next()) is not None:
        body = b""
        while chunk := tar.read(5):
            body += chunk
        out.append((header, body))
    return out


def test_regular_files_directories_and_links_with_their_attributes() -> None:
    data = make_tar(
        (member("dir/", tarfile.DIRTYPE, mode=0o750, uid=7, gid=8), b""),
        (member("dir/file", mode=0o4755, uid=1000, gid=1000), b"content"),
        (member("dir/sym", tarfile.SYMTYPE, linkname="file"), b""),
        (member("dir/hard", tarfile.LNKTYPE, linkname="dir/file"), b""),
        (member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), b""),
    )
    (d, _), (f, body), (s, _), (h, _), (c, _) = entries(data)
    assert (d.name, d.typeflag, d.mode, d.uid, d.gid) == (b"dir/", b"5", 0o750, 7, 8)  # as Go keeps it
    assert (f.typeflag, f.mode, f.uid, body, f.mtime_ns) == (
        b"0",
        0o4755,
        1000,
        b"content",
        1_600_000_000 * 10**9,
    )
    assert (s.typeflag, s.linkname) == (b"2", b"file")
    assert (h.typeflag, h.linkname) == (b"1", b"dir/file")
    assert (c.typeflag, c.devmajor, c.devminor) == (b"3", 1, 3)


def test_pax_records_override_the_header() -> None:
    info = member("short")
    info.pax_headers = {
        "path": "a/" + "x" * 200,
        "mtime": "1600000000.123456789123",
        "atime": "-1.5",
        "uid": "70000",
        "SCHILY.xattr.user.k": "v",
        "SCHILY.xattr.user.empty": "",
        "linkpath": "",  # empty: the header's own value stays
    }
    ((header, body),) = entries(make_tar((info, b"x")))
    assert body == b"x"
    assert header.name == b"a/" + b"x" * 200
    assert header.mtime_ns == 1_600_000_000_123_456_789  # nine digits kept, the rest cut
    assert header.atime_ns == -1_500_000_000
    assert header.uid == 70000
    assert header.xattrs() == {b"user.k": b"v", b"user.empty": b""}


def test_gnu_long_names_and_links() -> None:
    long_name, long_link = "n" * 150, "l" * 150
    data = make_tar(
        (member(long_name), b"1"),
        (member("s", tarfile.SYMTYPE, linkname=long_link), b""),
        fmt=tarfile.GNU_FORMAT,
    )
    (a, body), (b, _) = entries(data)
    assert a.name == long_name.encode() and body == b"1"
    assert b.linkname == long_link.encode()


def test_ustar_prefix_joins_the_name() -> None:
    name = "p" * 120 + "/file"
    ((header, _),) = entries(make_tar((member(name), b""), fmt=tarfile.USTAR_FORMAT))
    assert header.name == name.encode()


def test_global_header_is_an_entry_and_applies_to_nothing_else() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"uid": "99"}) as tar:
        tar.addfile(member("f", size=0))
    (g, _), (f, _) = entries(buf.getvalue())
    assert g.typeflag == b"g" and g.uid == 99
    assert f.uid == 0


def block(name: bytes, typeflag: bytes = b"0", size: int = 0, magic: bytes = b"ustar\x0000") -> bytearray:
    """A raw header block with a correct checksum."""
    raw = bytearray(512)
    raw[0 : len(name)] = name
    raw[100:108] = b"0000644\0"
    raw[108:116] = raw[116:124] = b"0000000\0"
    raw[124:136] = f"{size:011o}\0".encode()
    raw[136:148] = b"00000000000\0"
    raw[156:157] = typeflag
    raw[257:265] = magic
    fix_checksum(raw)
    return raw


def fix_checksum(raw: bytearray) -> None:
    raw[148:156] = b" " * 8
    raw[148:156] = f"{sum(raw):06o}\0 ".encode()


def test_end_of_archive_rules() -> None:
    one = bytes(block(b"a"))
    assert [h.name for h, _ in entries(one)] == [b"a"]  # ends at end of input, no zero blocks
    assert [h.name for h, _ in entries(one + bytes(512))] == [b"a"]  # one zero block, then the end
    assert [h.name for h, _ in entries(one + bytes(1024) + b"junk after the end")] == [b"a"]
    with pytest.raises(TarError, match="zero block followed"):
        entries(one + bytes(512) + one)
    with pytest.raises(TarError, match="inside a header"):
        entries(one + one[:100])


def test_a_bad_checksum_is_an_error_not_the_end() -> None:
    """Python's tarfile takes a corrupt header for the end of the archive; Go refuses it."""
    bad = block(b"b")
    bad[0] = ord("c")  # checksum no longer matches
    with pytest.raises(TarError, match="checksum"):
        entries(bytes(block(b"a")) + bytes(bad))


def test_numbers_in_base_256_and_bad_octal() -> None:
    raw = block(b"big", size=0)
    raw[124:136] = b"\x80" + (5 << 33).to_bytes(11, "big")  # base-256 size
    fix_checksum(raw)
    header = reader(bytes(raw)).next()
    assert header is not None and header.size == 5 << 33
    raw = block(b"bad")
    raw[100:108] = b"07x7\0\0\0\0"
    fix_checksum(raw)
    with pytest.raises(TarError, match="octal"):
        entries(bytes(raw))


def test_legacy_type_with_a_trailing_slash_is_a_directory() -> None:
    ((header, _),) = entries(bytes(block(b"olddir/", typeflag=b"\0")))
    assert header.typeflag == b"5"
    ((header, _),) = entries(bytes(block(b"oldfile", typeflag=b"\0")))
    assert header.typeflag == b"0"


def test_header_only_types_carry_no_data() -> None:
    """A directory claiming a size has no data blocks (Go reads the next header right after)."""
    data = bytes(block(b"d/", typeflag=b"5", size=1000)) + bytes(block(b"next"))
    assert [h.name for h, _ in entries(data)] == [b"d/", b"next"]


def test_truncated_data_is_an_error_but_missing_final_padding_is_not() -> None:
    full = make_tar((member("f"), b"x" * 100))
    assert entries(full[: 512 + 100])[0][1] == b"x" * 100  # padding and end blocks cut: fine
    with pytest.raises(TarError, match="inside an entry"):
        entries(full[: 512 + 50])


def test_special_headers_are_bounded() -> None:
    """A PAX header over 1 MiB is refused before it is read (memory stays bounded)."""
    header = bytes(block(b"PaxHeader", typeflag=b"x", size=MAX_SPECIAL_FILE + 1))
    served = 0

    def source(n: int) -> bytes:  # the header, then zeros without end
        nonlocal served
        chunk = header[served : served + n] if served < len(header) else bytes(min(n, 1 << 16))
        served += len(chunk)
        return chunk

    with pytest.raises(TarError, match="at most 1 MiB"):
        TarReader(source).next()
    assert served < 2 << 20


def test_sparse_entries_are_refused() -> None:
    info = member("sparse")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s"}
    with pytest.raises(SparseError):
        entries(make_tar((info, b"")))
    with pytest.raises(SparseError):
        entries(bytes(block(b"oldsparse", typeflag=b"S", magic=b"ustar  \0")))


@pytest.mark.parametrize("value", [b"1.x", b"abc", b"1e3", b" 12"])
def test_malformed_pax_times_are_refused(value: bytes) -> None:
    with pytest.raises(TarError):
        pax_time_ns(value)


def test_malformed_pax_records_are_refused() -> None:
    raw = block(b"PaxHeader", typeflag=b"x", size=12)
    data = bytes(raw) + b"99 path=abc\n".ljust(512, b"\0") + bytes(block(b"f"))
    with pytest.raises(TarError, match="PAX record"):
        entries(data)
