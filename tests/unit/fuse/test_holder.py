"""The fd holder process: keeps, hands back and drops fds; drops dead ones; one per socket."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.fuse.holder import HolderClient, HolderError, HolderUnavailableError, start_holder
from tests.support.lazy import wait_until
from tests.support.services import pid_alive, terminate_pid


@pytest.fixture
def holder(workdir: Path) -> Iterator[HolderClient]:
    sock = workdir / "holder.sock"
    pid = start_holder(sock, log_path=workdir / "holder.log")
    try:
        yield HolderClient(sock)
    finally:
        terminate_pid(pid)


def same_pipe(read_fd: int, write_fd: int) -> bool:
    os.write(write_fd, b"ping")
    return os.read(read_fd, 4) == b"ping"


def test_a_kept_fd_is_handed_back_as_a_copy(holder: HolderClient) -> None:
    r, w = os.pipe()
    try:
        holder.keep("blobs", r)
        os.close(r)  # the holder's copy keeps the pipe open
        taken = holder.take("blobs")
        assert taken is not None
        assert same_pipe(taken, w)
        os.close(taken)
        again = holder.take("blobs")  # taking leaves the holder its own copy
        assert again is not None
        os.close(again)
    finally:
        os.close(w)


def test_keeping_again_under_a_name_replaces_the_fd(holder: HolderClient) -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        holder.keep("blobs", r1)
        holder.keep("blobs", r2)
        taken = holder.take("blobs")
        assert taken is not None
        assert same_pipe(taken, w2)
        os.close(taken)
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_a_dropped_name_is_gone(holder: HolderClient) -> None:
    r, w = os.pipe()
    holder.keep("blobs", r)
    holder.forget("blobs")
    assert holder.take("blobs") is None
    holder.forget("never-kept")  # dropping what is not there is fine
    for fd in (r, w):
        os.close(fd)


def test_an_fd_whose_other_end_hangs_up_is_dropped(holder: HolderClient) -> None:
    r, w = os.pipe()
    holder.keep("blobs", r)
    os.close(r)
    os.close(w)  # POLLHUP on the holder's read end, as POLLERR on an aborted FUSE connection

    def dropped() -> bool:
        fd = holder.take("blobs")
        if fd is None:
            return True
        os.close(fd)
        return False

    assert wait_until(dropped, timeout=10)


def test_bad_requests_get_an_error_and_the_holder_serves_on(holder: HolderClient) -> None:
    with pytest.raises(ValueError, match="bad fd name"):
        holder.take("../x")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.connect(str(holder.path))
        raw.send(b"KEEP blobs")  # no fd attached
        assert raw.recv(100).startswith(b"ERR")
        raw.send(b"FROB x")
        assert raw.recv(100).startswith(b"ERR")
    assert holder.ping() > 0


def test_the_socket_is_for_root_only_and_taken_by_one_holder(holder: HolderClient) -> None:
    assert stat.S_IMODE(os.stat(holder.path).st_mode) == 0o600
    second = subprocess.run(
        [sys.executable, "-m", "snapshotter.fuse.holder", "--socket", str(holder.path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1 and "already serves" in second.stderr
    assert holder.ping() > 0
    assert start_holder(holder.path) == holder.ping()  # found, not started again


def test_a_stopped_holder_removes_its_socket(tmp_path: Path) -> None:
    sock = tmp_path / "holder.sock"
    pid = start_holder(sock)
    try:
        terminate_pid(pid)
        assert not pid_alive(pid)
        assert not sock.exists()
        with pytest.raises(HolderUnavailableError):
            HolderClient(sock).ping()
    finally:
        terminate_pid(pid)


def test_a_holder_whose_socket_was_removed_exits(tmp_path: Path) -> None:
    """A wiped root takes the socket file along: nobody can reach the holder again, so it goes
    (closing what it kept) instead of running forever."""
    sock = tmp_path / "holder.sock"
    pid = start_holder(sock)
    r, w = os.pipe()
    try:
        HolderClient(sock).keep("blobs", r)
        os.close(r)  # only the holder's copy keeps the read end open
        os.write(w, b"x")
        sock.unlink()
        assert wait_until(lambda: not pid_alive(pid), timeout=30)
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")  # the holder closed its copy on the way out: no reader is left
    finally:
        terminate_pid(pid)
        os.close(w)


def test_errors_from_the_holder_are_holder_errors(holder: HolderClient) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(HolderError, match="bad request"):
            holder._call("KEEP two words", r)
    finally:
        os.close(r)
        os.close(w)
