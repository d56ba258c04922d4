"""The ``lazysnap serve`` daemon: root directory, socket, gRPC server, signals.

Lazy layers are served by the FUSE manager (``snapshotter.fusemanager``), a process the daemon
starts and leaves running, so that containers keep their layers while the daemon restarts.

Owns process-level concerns: one daemon per root (an flock on ROOT/lazysnap.lock), one daemon per
socket (a live socket is never stolen), a socket only root (or the configured group) can use, and a
clean stop on SIGTERM/SIGINT that removes the socket and closes the store.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import grp
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import IO

import grpc
from aiohttp import web

from snapshotter import __version__
from snapshotter.admin import admin_socket, start_admin, start_metrics
from snapshotter.config import Config, manager_fingerprint
from snapshotter.fuseclient import FuseManagerClient
from snapshotter.metrics import Metrics
from snapshotter.sdnotify import notify
from snapshotter.service import add_to_server
from snapshotter.snapshots import Snapshotter

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10


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


def manager_command(config: Config, config_path: Path | None, log_level: str | None) -> list[str]:
    """How the daemon starts the FUSE manager of its root (same interpreter, same config)."""
    cmd = [sys.executable, "-P", "-m", "snapshotter", "fuse-manager", "--root", str(config.root)]
    if config_path is not None:
        cmd += ["--config", str(config_path.resolve())]
    if log_level is not None:
        cmd += ["--log-level", log_level]
    return cmd


async def serve(config: Config, config_path: Path | None = None, log_level: str | None = None) -> None:
    lock = RootLock(config.root)
    snapshotter: Snapshotter | None = None
    manager: FuseManagerClient | None = None
    runners: list[web.AppRunner] = []
    ready = False
    try:
        claim_socket_path(config.address)
        if config.remote.enabled:
            manager = FuseManagerClient(
                config.root,
                manager_command(config, config_path, log_level),
                mount_timeout=config.remote.mount_timeout_seconds,
                fingerprint=manager_fingerprint(config),
            )
            try:
                found = await asyncio.to_thread(manager.ensure_running)
            except OSError as exc:
                raise StartupError(f"cannot start the FUSE manager: {exc}") from None
            log.info("FUSE manager serves lazy layers", extra={"pid": found.get("pid")})
        snapshotter = Snapshotter(config.root, remote=manager)
        removed = await asyncio.to_thread(snapshotter.cleanup)
        if removed:
            log.info("cleaned directories of interrupted operations", extra={"count": len(removed)})
        # Layers the manager still serves (the daemon restarted) are kept; dead ones are remounted.
        await asyncio.to_thread(snapshotter.restore_remote)
        metrics = Metrics()
        runners.append(await start_admin(admin_socket(config.root), manager, metrics))
        if config.metrics.address:
            runners.append(await start_metrics(config.metrics.address, metrics, manager))
        server = grpc.aio.server()
        add_to_server(server, snapshotter, metrics.observe_grpc)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            server.add_insecure_port(f"unix:{config.address}")
        finally:
            os.umask(old_umask)
        secure_socket(config.address, config.grpc.socket_group)
        await server.start()
        socket_inode = config.address.stat().st_ino
        ready = True
        notify("READY=1", f"STATUS=serving on {config.address}", f"MAINPID={os.getpid()}")
        log.info(
            "serving",
            extra={"version": __version__, "address": str(config.address), "root": str(config.root)},
        )
        await _wait_for_stop_signal()
        log.info("stopping", extra={"grace_seconds": STOP_GRACE_SECONDS})
        notify("STOPPING=1")
        await server.stop(STOP_GRACE_SECONDS)
        try:
            if config.address.stat().st_ino == socket_inode:
                config.address.unlink()
        except FileNotFoundError:
            pass
    finally:
        for runner in runners:
            await runner.cleanup()
        if runners:
            admin_socket(config.root).unlink(missing_ok=True)
        # The FUSE manager is left running: containers on lazy layers keep reading while the
        # daemon restarts. Stopping the manager (SIGTERM to ROOT/fuse.pid) unmounts them. Only a
        # manager this daemon started and then failed to start beside is stopped here.
        if not ready and manager is not None:
            await asyncio.to_thread(manager.stop_spawned)
        if snapshotter is not None:
            snapshotter.close()
        lock.release()
    log.info("stopped")


async def _wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
