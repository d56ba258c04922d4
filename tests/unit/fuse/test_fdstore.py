"""systemd's fd store protocol, against a stand-in notify socket and $LISTEN_FDS as systemd sets it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from snapshotter.fuse.fdstore import FdStoreError, SystemdFdStore


def test_keep_sends_fdstore_with_the_name_and_the_fd(tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        store = SystemdFdStore({"NOTIFY_SOCKET": address})
        r, w = os.pipe()
        try:
            store.keep("lazysnap-blobs-1", r)
            msg, fds, _flags, _addr = socket.recv_fds(manager, 4096, 4)
            assert msg == b"FDSTORE=1\nFDNAME=lazysnap-blobs-1" and len(fds) == 1
            os.write(w, b"x")
            assert os.read(fds[0], 1) == b"x"  # the very pipe
            os.close(fds[0])
            store.forget("lazysnap-blobs-1")
            assert manager.recv(4096) == b"FDSTOREREMOVE=1\nFDNAME=lazysnap-blobs-1"
        finally:
            os.close(r)
            os.close(w)


def test_names_systemd_would_refuse_are_refused() -> None:
    store = SystemdFdStore({"NOTIFY_SOCKET": "/nonexistent"})
    with pytest.raises(ValueError, match="bad fd name"):
        store.keep("a:b", 0)


def test_without_a_notify_socket_keeping_fails_and_nothing_is_taken() -> None:
    store = SystemdFdStore({})
    assert not store.available
    with pytest.raises(FdStoreError, match="NOTIFY_SOCKET"):
        store.keep("x", 0)
    assert store.take("x") is None


_TAKE = """
import os, sys
from snapshotter.fuse.fdstore import SystemdFdStore
env = dict(os.environ, LISTEN_PID=str(os.getpid()))
store = SystemdFdStore(env)
fd = store.take(sys.argv[1])
print(fd, os.read(fd, 100).decode() if fd is not None else "", store.take(sys.argv[1]))
"""


def test_take_finds_the_named_fd_systemd_passed(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("first")
    (tmp_path / "b").write_text("second")
    # As systemd starts a service: fds from 3 on, their names in $LISTEN_FDNAMES, $LISTEN_PID = the
    # service's pid (bash's exec keeps it; the child sets it itself here).
    script = f'exec 3<{tmp_path / "a"} 4<{tmp_path / "b"}; exec "$0" -c "$1" "$2"'
    env = {**os.environ, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "stdio-thing:lazysnap-blobs-x"}
    out = subprocess.run(
        ["bash", "-c", script, sys.executable, _TAKE, "lazysnap-blobs-x"],
        capture_output=True, text=True, env=env, check=True, cwd=os.getcwd(),
    ).stdout.split()  # fmt: skip
    assert out == ["4", "second", "None"]  # found once, then consumed
