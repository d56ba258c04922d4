"""systemd's file descriptor store as a keeper of the blob server's /dev/fuse fd.

When the FUSE manager is the main process of a systemd service with ``FileDescriptorStoreMax=1``
(or more), it can push its /dev/fuse fd to the service manager (``sd_notify`` ``FDSTORE=1`` with
``FDNAME=``, the fd as SCM_RIGHTS) and gets it back on the next start of the service in
``$LISTEN_FDS``/``$LISTEN_FDNAMES`` (fds from 3 on), as with socket activation.

What systemd 252 (Debian 12) keeps, per systemd.service(5) of that version: stored fds are closed
when POLLHUP or POLLERR is seen on them (a /dev/fuse fd reports POLLERR once its connection is
aborted), "or when the service is fully stopped and no job is queued or being executed for it".
So the fd survives ``systemctl restart`` (a restart job is executing) and a crash or SIGKILL when
``Restart=`` schedules the restart (the unit waits in auto-restart with a job), but not
``systemctl stop`` followed by ``start``, nor a crash without ``Restart=``. (v254 added
``FileDescriptorStorePreserve=yes`` to keep the store across a stop as well.) Only the main process
may push fds unless ``NotifyAccess=all``, and only the main process receives them on start. Where
this does not fit (the manager is not a unit's main process, or no systemd), use the holder.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


class FdStoreError(Exception):
    """Not running under systemd, or the notify socket refused the message."""


def _valid_fdname(name: str) -> bool:
    # systemd's fdname_is_valid(): at most 255 printable ASCII characters, no ":" (the separator).
    return 0 < len(name) <= 255 and all(32 < ord(c) < 127 and c != ":" for c in name)


class SystemdFdStore:
    """An ``FdKeeper`` backed by the service manager's fd store (see the module docstring)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self._env = dict(os.environ if environ is None else environ)
        self._taken: set[str] = set()

    @property
    def available(self) -> bool:
        """True when a notify socket is set (whether the unit allows an fd store is not visible)."""
        return bool(self._env.get("NOTIFY_SOCKET"))

    def _notify(self, message: str, fd: int | None = None) -> None:
        address = self._env.get("NOTIFY_SOCKET", "")
        if not address:
            raise FdStoreError("not running under systemd: $NOTIFY_SOCKET is not set")
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                if fd is None:
                    sock.sendall(message.encode())
                else:
                    socket.send_fds(sock, [message.encode()], [fd])
        except OSError as exc:
            raise FdStoreError(f"systemd notify socket {address.lstrip(chr(0))}: {exc.strerror}") from None

    def keep(self, name: str, fd: int) -> None:
        """Store a copy of ``fd`` under ``name`` in the service manager."""
        if not _valid_fdname(name):
            raise ValueError(f"bad fd name {name!r}")
        self._notify(f"FDSTORE=1\nFDNAME={name}", fd)

    def take(self, name: str) -> int | None:
        """The fd named ``name`` that systemd passed to this process at start, once; else None."""
        if name in self._taken or self._env.get("LISTEN_PID") != str(os.getpid()):
            return None
        try:
            count = int(self._env.get("LISTEN_FDS", "0"))
        except ValueError:
            return None
        names = self._env.get("LISTEN_FDNAMES", "").split(":")
        for i in range(count):
            if i < len(names) and names[i] == name:
                fd = SD_LISTEN_FDS_START + i
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    return None
                self._taken.add(name)
                return fd
        return None

    def forget(self, name: str) -> None:
        """Have the service manager close its copy of the fd stored under ``name``."""
        if not _valid_fdname(name):
            raise ValueError(f"bad fd name {name!r}")
        self._notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
