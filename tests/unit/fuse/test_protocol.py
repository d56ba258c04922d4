"""The FUSE wire format: packing and parsing, and the layouts checked against the system's fuse.h."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from snapshotter.fuse import protocol as p


def request_bytes(opcode: int, unique: int, nodeid: int, body: bytes, pid: int = 42) -> bytes:
    return p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, pid, 0, 0) + body


def test_a_request_splits_into_header_fields_and_body() -> None:
    raw = bytearray(request_bytes(p.Opcode.LOOKUP, 10, 1, b"name\0")) + b"leftover in the buffer"
    req = p.parse_request(raw, p.IN_HEADER.size + 5)
    assert (req.opcode, req.unique, req.nodeid, req.pid, req.body) == (p.Opcode.LOOKUP, 10, 1, 42, b"name\0")
    assert not req.resent
    assert p.parse_name(req.body) == b"name"


def test_a_resent_request_is_recognised_by_the_high_bit_of_its_unique() -> None:
    raw = request_bytes(p.Opcode.READ, p.UNIQUE_RESEND | 8, 2, bytes(40))
    assert p.parse_request(raw, len(raw)).resent


@pytest.mark.parametrize("cut", [0, 39])
def test_a_short_request_is_refused(cut: int) -> None:
    with pytest.raises(p.ProtocolError, match="short"):
        p.parse_request(bytes(cut), cut)


def test_a_request_whose_length_disagrees_with_the_read_is_refused() -> None:
    raw = request_bytes(p.Opcode.GETATTR, 4, 1, bytes(16))
    with pytest.raises(p.ProtocolError, match="length"):
        p.parse_request(raw, len(raw) - 8)


def test_an_error_reply_is_a_bare_header_with_a_negative_errno() -> None:
    (header,) = p.reply(7, b"ignored", error=5)
    assert p.OUT_HEADER.unpack(header) == (16, -5, 7)


def test_a_reply_header_counts_every_part() -> None:
    header, *parts = p.reply(9, b"abc", b"defgh")
    assert p.OUT_HEADER.unpack(header) == (16 + 8, 0, 9) and parts == [b"abc", b"defgh"]


def test_init_folds_flags2_into_the_high_bits_only_with_init_ext() -> None:
    high = 1 << 7  # FUSE_HAS_RESEND, bit 39
    with_ext = struct.pack(
        "<IIIII", 7, 45, 131072, p.InitFlag.INIT_EXT | p.InitFlag.ASYNC_READ, high
    ) + bytes(44)
    init = p.parse_init(with_ext)
    assert (init.major, init.minor, init.max_readahead) == (7, 45, 131072)
    assert init.flags & p.InitFlag.HAS_RESEND and init.flags & p.InitFlag.ASYNC_READ
    without_ext = struct.pack("<IIIII", 7, 45, 131072, p.InitFlag.ASYNC_READ, high)
    assert not p.parse_init(without_ext).flags & p.InitFlag.HAS_RESEND


def test_init_out_puts_the_high_flags_into_flags2() -> None:
    out = p.InitOut(40, 1 << 20, int(p.InitFlag.MAX_PAGES | p.InitFlag.PASSTHROUGH), 16, 12, 4096, 256).pack()
    assert len(out) == 64
    major, minor, ra, flags, bg, cong, mw, gran, pages, _align, flags2 = struct.unpack_from(
        "<IIIIHHIIHHI", out
    )
    assert (major, minor, ra, bg, cong, mw, gran, pages) == (7, 40, 1 << 20, 16, 12, 4096, 1, 256)
    assert flags == p.InitFlag.MAX_PAGES and flags2 == 1 << (37 - 32)


def test_attributes_report_size_in_512_byte_blocks() -> None:
    packed = p.Attr(5, 1025, 0o100444).pack()
    ino, size, blocks = struct.unpack_from("<QQQ", packed)
    assert (len(packed), ino, size, blocks) == (88, 5, 1025, 3)


def test_entry_and_attr_timeouts_split_into_seconds_and_nanoseconds() -> None:
    entry = p.entry_out(3, p.Attr(3, 0, 0o100444), 1.5)
    assert p.ENTRY_OUT_HEAD.unpack_from(entry) == (3, 0, 1, 1, 500_000_000, 500_000_000)
    attr = p.attr_out(p.Attr(3, 0, 0o100444), 2.25)
    assert p.ATTR_OUT_HEAD.unpack_from(attr) == (2, 250_000_000, 0)


def test_dirents_are_padded_to_eight_bytes_and_stop_at_the_limit() -> None:
    entries = [(1, 1, 4, b"."), (7, 9, 8, b"sha256-abc")]
    data, count = p.dirents(entries, 1000)
    assert count == 2 and len(data) % 8 == 0
    ino, cookie, namelen, dtype = p.DIRENT_HEAD.unpack_from(data, 32)  # "." takes 24 + 1 + 7 bytes
    assert (ino, cookie, namelen, dtype) == (7, 9, 10, 8)
    assert data[56:66] == b"sha256-abc"
    assert p.dirents(entries, 40) == (data[:32], 1)  # the second one does not fit whole


def test_notifications_carry_the_code_and_no_unique() -> None:
    header, body, name = p.inval_entry(1, b"sha256-x")
    assert p.OUT_HEADER.unpack(header) == (16 + 16 + 9, int(p.Notify.INVAL_ENTRY), 0)
    assert p.NOTIFY_INVAL_ENTRY.unpack(body) == (1, 8, 0) and name == b"sha256-x\0"
    (only,) = p.resend()
    assert p.OUT_HEADER.unpack(only) == (16, int(p.Notify.RESEND), 0)


_ABI_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/fuse.h>
#define S(t) printf(#t " %zu\n", sizeof(struct t))
#define V(v) printf(#v " %llu\n", (unsigned long long)(v))
int main(void) {
    S(fuse_in_header); S(fuse_out_header); S(fuse_init_out); S(fuse_attr); S(fuse_entry_out);
    S(fuse_attr_out); S(fuse_open_in); S(fuse_open_out); S(fuse_read_in); S(fuse_release_in);
    S(fuse_kstatfs); S(fuse_forget_one); S(fuse_batch_forget_in); S(fuse_interrupt_in);
    S(fuse_notify_inval_inode_out); S(fuse_notify_inval_entry_out); S(fuse_notify_delete_out);
    printf("dirent_name %zu\n", offsetof(struct fuse_dirent, name));
    printf("init_out_flags2 %zu\n", offsetof(struct fuse_init_out, flags2));
    printf("init_out_max_pages %zu\n", offsetof(struct fuse_init_out, max_pages));
    V(FUSE_READ); V(FUSE_INIT); V(FUSE_INTERRUPT); V(FUSE_BATCH_FORGET); V(FUSE_DESTROY); V(FUSE_STATFS);
    V(FUSE_NOTIFY_INVAL_ENTRY); V(FUSE_ASYNC_READ); V(FUSE_ASYNC_DIO); V(FUSE_MAX_PAGES);
    V(FUSE_PARALLEL_DIROPS); V(FUSE_EXPLICIT_INVAL_DATA); V(FUSE_INIT_EXT); V(FOPEN_KEEP_CACHE);
    return 0;
}
"""


def test_struct_layouts_and_constants_match_the_systems_fuse_header(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/fuse.h").exists():
        pytest.skip("needs a C compiler and linux/fuse.h")
    src = tmp_path / "abi.c"
    src.write_text(_ABI_PROGRAM)
    subprocess.run([cc, "-o", str(tmp_path / "abi"), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "abi")], check=True, capture_output=True, text=True).stdout
    c = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert c["fuse_in_header"] == p.IN_HEADER.size
    assert c["fuse_out_header"] == p.OUT_HEADER.size
    assert c["fuse_init_out"] == p.INIT_OUT.size
    assert c["fuse_attr"] == p.ATTR.size
    assert c["fuse_entry_out"] == p.ENTRY_OUT_HEAD.size + p.ATTR.size
    assert c["fuse_attr_out"] == p.ATTR_OUT_HEAD.size + p.ATTR.size
    assert c["fuse_open_in"] == p.OPEN_IN.size and c["fuse_open_out"] == p.OPEN_OUT.size
    assert c["fuse_read_in"] == p.READ_IN.size and c["fuse_release_in"] == p.RELEASE_IN.size
    assert c["fuse_kstatfs"] == p.KSTATFS.size
    assert c["fuse_forget_one"] == p.FORGET_ONE.size and c["fuse_batch_forget_in"] == p.BATCH_FORGET_IN.size
    assert c["fuse_interrupt_in"] == p.INTERRUPT_IN.size
    assert c["fuse_notify_inval_inode_out"] == p.NOTIFY_INVAL_INODE.size
    assert c["fuse_notify_inval_entry_out"] == p.NOTIFY_INVAL_ENTRY.size
    assert c["fuse_notify_delete_out"] == p.NOTIFY_DELETE.size
    assert c["dirent_name"] == p.DIRENT_HEAD.size
    assert (c["init_out_max_pages"], c["init_out_flags2"]) == (28, 32)
    assert (c["FUSE_READ"], c["FUSE_INIT"], c["FUSE_INTERRUPT"]) == (
        p.Opcode.READ,
        p.Opcode.INIT,
        p.Opcode.INTERRUPT,
    )
    assert (c["FUSE_BATCH_FORGET"], c["FUSE_DESTROY"]) == (p.Opcode.BATCH_FORGET, p.Opcode.DESTROY)
    assert c["FUSE_STATFS"] == p.Opcode.STATFS and c["FUSE_NOTIFY_INVAL_ENTRY"] == p.Notify.INVAL_ENTRY
    assert (c["FUSE_ASYNC_READ"], c["FUSE_ASYNC_DIO"]) == (p.InitFlag.ASYNC_READ, p.InitFlag.ASYNC_DIO)
    assert (c["FUSE_MAX_PAGES"], c["FUSE_INIT_EXT"]) == (p.InitFlag.MAX_PAGES, p.InitFlag.INIT_EXT)
    assert c["FUSE_PARALLEL_DIROPS"] == p.InitFlag.PARALLEL_DIROPS
    assert c["FUSE_EXPLICIT_INVAL_DATA"] == p.InitFlag.EXPLICIT_INVAL_DATA
    assert c["FOPEN_KEEP_CACHE"] == p.OpenFlag.KEEP_CACHE
