"""What a lazysnap process owns on the node: its root directory and its unix sockets.

One daemon per root (an flock on ``ROOT/lazysnap.lock``; the FUSE manager has its own lock), one
server per socket (a live socket is never stolen, a stale one left by a crash is reclaimed), and
sockets born private: created under a 0177 umask, so there is no moment at which another user
could connect, then opened to a group only when configured.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10  # in-flight calls may finish this long after SIGTERM


class StartupError(Exception):
    """The daemon refuses to start; the message says why and what to do."""


class RootLock:
    """Exclusive use of a root directory by one daemon, held for the process's life."""

    def __init__(self, root: Path) -> None:
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"root {root} is unusable: cannot create it: {exc.strerror}") from None
        if not root.is_dir():
            raise StartupError(f"root {root} is unusable: it is not a directory")
        if not os.access(root, os.W_OK | os.X_OK):
            raise StartupError(f"root {root} is unusable: not writable by this user")
        path = root / "lazysnap.lock"
        self._file: IO[str] = open(path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StartupError(
                    f"root {root} is in use by another lazysnap daemon (pid {holder}); "
                    "stop it or choose another --root"
                ) from None
            raise StartupError(f"root {root} is unusable: cannot lock {path}: {exc.strerror}") from None
        self._file.truncate(0)
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        self._file.close()


def claim_socket_path(address: Path) -> None:
    """Make ``address`` free for us to bind: remove a stale socket, refuse a live one."""
    try:
        address.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create the socket directory {address.parent}: {exc.strerror}") from None
    try:
        st = address.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(
            f"socket path {address} exists and is not a socket; remove it or choose another --address"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(address))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket", extra={"address": str(address)})
        address.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise StartupError(
        f"socket {address} is in use by a live daemon; stop it first or choose another --address"
    )


def secure_socket(address: Path, group: str) -> None:
    """0600 for root only, or 0660 with the configured group."""
    if not group:
        os.chmod(address, 0o600)
        return
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"grpc.socket_group: group {group!r} does not exist") from None
    os.chown(address, -1, gid)
    os.chmod(address, 0o660)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files and sockets created inside are 0600 (the umask is process-wide: keep this short)."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def root_is_locked(root: Path) -> bool:
    """Whether a daemon holds ``root``'s lock right now (without taking it for long)."""
    try:
        fh = open(root / "lazysnap.lock", "a+")  # noqa: SIM115 - closed below
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def process_exists(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
