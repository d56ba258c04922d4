"""The fd holder: a tiny long-lived process that keeps FUSE connections alive across server restarts.

A FUSE mount lives as long as some process holds its /dev/fuse fd. The blob server hands its fd to
this process (over a root-only unix socket, as SCM_RIGHTS) right after mounting; when the server
stops for an upgrade, or is killed with SIGKILL, the connection stays up, requests wait in the
kernel, and the next server takes a copy of the fd back and resumes (see ``blobserver``). Holding
the same open file, not a clone, matters: the kernel ends the requests a *clone* had read with
ECONNABORTED when the clone is closed, but it keeps those of a file that is still open elsewhere,
and FUSE_NOTIFY_RESEND gives them to the next server.

The holder is deliberately dull, so that it never needs an upgrade: the standard library only
(``python -m snapshotter.fuse.holder --socket PATH``), no threads, one ``poll`` loop, a line
protocol over SOCK_SEQPACKET, peers checked with SO_PEERCRED (root or the holder's own user), a
bounded number of clients and fds. It drops a kept fd as soon as poll reports POLLERR or POLLHUP on
it (the connection was aborted or unmounted), as systemd's fd store does. Stopping the holder
(SIGTERM) closes every kept fd: a connection whose server is also gone is then aborted. A holder
whose socket file was removed (its root wiped) can never be asked for anything again: it exits.

Protocol (one request datagram, one reply datagram): ``KEEP name`` with one fd → ``OK``;
``TAKE name`` → ``OK`` with a copy of the fd, or ``NONE``; ``DROP name`` → ``OK``;
``PING`` → ``OK pid count``; anything else → ``ERR reason``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

MAX_MESSAGE = 1024
MAX_KEPT = 256
MAX_CLIENTS = 32
SOCKET_CHECK_SECONDS = 2  # how often an idle holder checks that its socket file is still there
NAME = re.compile(r"[A-Za-z0-9._@+=-]{1,200}")
_UCRED = struct.Struct("3i")  # pid uid gid


class HolderError(Exception):
    """The holder refused a request or answered nonsense."""


class HolderUnavailableError(HolderError):
    """No holder answers at the socket."""


# ---------------------------------------------------------------------------------------------
# The holder process


class _Holder:
    def __init__(self, listener: socket.socket, path: Path) -> None:
        self.listener = listener
        self.path = path
        self.bound = os.stat(path).st_ino  # to tell our socket file from a later one
        self.poller = select.poll()
        self.clients: dict[int, socket.socket] = {}
        self.kept: dict[str, int] = {}
        self.kept_names: dict[int, str] = {}
        self.poller.register(listener.fileno(), select.POLLIN)

    def owns_socket(self) -> bool:
        """Whether the socket file is still ours. Once it is gone (its root directory was wiped)
        or replaced, nobody can reach this holder any more: what it keeps can never be taken."""
        try:
            return os.stat(self.path).st_ino == self.bound
        except OSError:
            return False

    def run(self) -> None:
        while True:
            events_seen = self.poller.poll(SOCKET_CHECK_SECONDS * 1000)
            if not events_seen and not self.owns_socket():
                _log(f"{self.path} is gone; exiting")
                return
            for fd, events in events_seen:
                if fd == self.listener.fileno():
                    self._accept()
                elif fd in self.clients:
                    self._serve(self.clients[fd], events)
                elif fd in self.kept_names and events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    _log(f"connection {self.kept_names[fd]} is gone; dropping its fd")
                    self._drop(self.kept_names[fd])

    def close_all(self) -> None:
        for name in list(self.kept):
            self._drop(name)
        for sock in self.clients.values():
            sock.close()
        self.clients.clear()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        _pid, uid, _gid = _UCRED.unpack(creds)
        if uid not in (0, os.getuid()) or len(self.clients) >= MAX_CLIENTS:
            sock.close()
            return
        sock.setblocking(False)
        self.clients[sock.fileno()] = sock
        self.poller.register(sock.fileno(), select.POLLIN)

    def _close_client(self, sock: socket.socket) -> None:
        self.poller.unregister(sock.fileno())
        del self.clients[sock.fileno()]
        sock.close()

    def _serve(self, sock: socket.socket, events: int) -> None:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg, fds = b"", []
        if not msg:
            for fd in fds:
                os.close(fd)
            self._close_client(sock)
            return
        answer, give = self._handle(msg.decode("ascii", "replace").split(), fds)
        try:
            if give is None:
                sock.send(answer.encode())
            else:
                socket.send_fds(sock, [answer.encode()], [give])
        except OSError:
            self._close_client(sock)

    def _handle(self, words: list[str], fds: list[int]) -> tuple[str, int | None]:
        """The reply to one request; received fds are kept or closed, never leaked."""
        try:
            if words == ["PING"]:
                return f"OK {os.getpid()} {len(self.kept)}", None
            if len(words) != 2 or NAME.fullmatch(words[1]) is None:
                return "ERR bad request", None
            verb, name = words
            if verb == "KEEP":
                if len(fds) != 1:
                    return "ERR KEEP needs exactly one fd", None
                if name not in self.kept and len(self.kept) >= MAX_KEPT:
                    return "ERR too many fds kept", None
                self._drop(name)
                fd = fds.pop()
                self.kept[name] = fd
                self.kept_names[fd] = name
                self.poller.register(fd, 0)  # errors and hang-ups only
                return "OK", None
            if verb == "TAKE":
                return ("OK", self.kept[name]) if name in self.kept else ("NONE", None)
            if verb == "DROP":
                self._drop(name)
                return "OK", None
            return "ERR unknown verb", None
        finally:
            for fd in fds:
                os.close(fd)

    def _drop(self, name: str) -> None:
        fd = self.kept.pop(name, None)
        if fd is not None:
            del self.kept_names[fd]
            self.poller.unregister(fd)
            os.close(fd)


def _log(message: str) -> None:
    print(f"lazysnap fd holder [{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _listen(path: Path) -> socket.socket:
    """Bind the holder's socket, refusing to take it from a holder that still answers."""
    try:
        HolderClient(path, timeout=2).ping()
    except HolderUnavailableError:
        pass
    else:
        raise HolderError(f"a holder already serves {path}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    listener.setblocking(False)
    return listener


def serve(path: Path) -> None:
    """Run a holder on ``path`` until SIGTERM or SIGINT."""
    listener = _listen(path)
    holder = _Holder(listener, path)

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _log(f"serving {path}")
    try:
        holder.run()
    finally:
        holder.close_all()
        if holder.owns_socket():
            with contextlib.suppress(OSError):
                path.unlink()
        listener.close()


# ---------------------------------------------------------------------------------------------
# The client side


class HolderClient:
    """Talks to a holder; one short connection per call. An ``FdKeeper`` for the blob server."""

    def __init__(self, path: Path | str, *, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def _call(self, request: str, fd: int | None = None) -> tuple[str, int | None]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                raise HolderUnavailableError(f"no fd holder at {self.path}: {exc.strerror}") from None
            if fd is None:
                sock.send(request.encode())
            else:
                socket.send_fds(sock, [request.encode()], [fd])
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
        except TimeoutError:
            raise HolderUnavailableError(f"the fd holder at {self.path} did not answer") from None
        finally:
            sock.close()
        answer = msg.decode("ascii", "replace")
        if answer.startswith("ERR") or not answer:
            for extra in fds:
                os.close(extra)
            raise HolderError(f"fd holder at {self.path}: {answer or 'no answer'} (to {request.split()[0]})")
        return answer, fds[0] if fds else None

    def ping(self) -> int:
        """The holder's pid."""
        answer, _ = self._call("PING")
        try:
            return int(answer.split()[1])
        except (IndexError, ValueError):
            raise HolderError(f"fd holder at {self.path} answered {answer!r} to PING") from None

    def keep(self, name: str, fd: int) -> None:
        """Have the holder keep a copy of ``fd`` under ``name`` (replacing an earlier one)."""
        self._call(f"KEEP {_checked(name)}", fd)

    def take(self, name: str) -> int | None:
        """A copy of the fd kept under ``name`` (the holder keeps its own), or None."""
        answer, fd = self._call(f"TAKE {_checked(name)}")
        if answer == "OK" and fd is not None:
            return fd
        return None

    def forget(self, name: str) -> None:
        """Have the holder close its copy of the fd kept under ``name``."""
        self._call(f"DROP {_checked(name)}")


def _checked(name: str) -> str:
    if NAME.fullmatch(name) is None:
        raise ValueError(f"bad fd name {name!r}")
    return name


def start_holder(path: Path | str, *, log_path: Path | None = None, timeout: float = 10.0) -> int:
    """The pid of the holder serving ``path``, starting one (in a session of its own) if none answers."""
    path = Path(path)
    client = HolderClient(path, timeout=2)
    try:
        return client.ping()
    except HolderUnavailableError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snapshotter.fuse.holder", "--socket", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # the server's signals and terminal never reach it
            cwd="/",
            close_fds=True,
        )
    finally:
        if log_path:
            log.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.ping()
        except HolderUnavailableError:
            if proc.poll() is not None:
                raise HolderError(f"the fd holder exited with status {proc.returncode}") from None
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise HolderError(f"the fd holder did not come up at {path}") from None
            time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Keep FUSE connections alive across server restarts.")
    parser.add_argument("--socket", required=True, type=Path, help="unix socket to serve (root-only)")
    args = parser.parse_args(argv)
    try:
        serve(args.socket)
    except HolderError as exc:
        _log(str(exc))
        return 1
    except OSError as exc:
        _log(f"cannot serve {args.socket}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
