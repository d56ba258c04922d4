"""The ``lazysnap serve`` daemon: root directory, socket, gRPC server, signals.

Lazy layers are served by the FUSE manager (``snapshotter.fusemanager``), a process the daemon
starts and leaves running, so that containers keep their layers while the daemon restarts.

Owns the daemon's life: the root and socket it claims (``snapshotter.ownership``), the gRPC server,
finding or starting the FUSE manager, and a clean stop on SIGTERM/SIGINT that removes the socket,
closes the store and, when no lazy layer is mounted, lets the manager go too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from aiohttp import web

from snapshotter import __version__
from snapshotter.admin import admin_socket, start_admin, start_metrics
from snapshotter.config import Config, manager_fingerprint
from snapshotter.contract import holder_socket
from snapshotter.fuseclient import FuseManagerClient
from snapshotter.metrics import Metrics
from snapshotter.ownership import (
    STOP_GRACE_SECONDS,
    RootLock,
    StartupError,
    claim_socket_path,
    private_umask,
    secure_socket,
)
from snapshotter.sdnotify import notify
from snapshotter.service import add_to_server
from snapshotter.snapshots import Snapshotter

log = logging.getLogger(__name__)


def manager_command(
    config: Config, config_path: Path | None, log_level: str | None, fs_backend: str | None = None
) -> list[str]:
    """How the daemon starts the FUSE manager of its root (same interpreter, same config)."""
    cmd = [sys.executable, "-P", "-m", "snapshotter", "fuse-manager", "--root", str(config.root)]
    if config_path is not None:
        cmd += ["--config", str(config_path.resolve())]
    if log_level is not None:
        cmd += ["--log-level", log_level]
    if fs_backend is not None:
        cmd += ["--fs-backend", fs_backend]
    return cmd


async def serve(
    config: Config,
    config_path: Path | None = None,
    log_level: str | None = None,
    fs_backend: str | None = None,
) -> None:
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
                manager_command(config, config_path, log_level, fs_backend),
                mount_timeout=config.remote.mount_timeout_seconds,
                fill_timeout=config.fallback.timeout_seconds if config.fallback.mode == "eager" else 0.0,
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
        with private_umask():  # the socket is born 0600: no window where others can connect
            server.add_insecure_port(f"unix:{config.address}")
        secure_socket(config.address, config.grpc.socket_group)
        await server.start()
        socket_inode = config.address.stat().st_ino
        ready = True
        notify("READY=1", f"STATUS=serving on {config.address}", f"MAINPID={os.getpid()}")
        log.info(
            "serving",
            extra={"version": __version__, "address": str(config.address), "root": str(config.root)},
        )
        if manager is not None:
            supervisor = asyncio.create_task(_supervise_manager(manager, snapshotter))
        await _wait_for_stop_signal()
        if manager is not None:
            supervisor.cancel()
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
        # The FUSE manager is left running while it serves lazy layers: containers keep reading
        # while the daemon restarts. Stopping it (SIGTERM to ROOT/fuse.pid) unmounts them. A
        # manager with nothing mounted is stopped, as is one this daemon started and then
        # failed to start beside.
        if not ready and manager is not None:
            await asyncio.to_thread(manager.stop_spawned)
        elif manager is not None:  # with nothing mounted, nothing needs the manager either
            await asyncio.to_thread(_stop_manager_if_idle, manager, config.root)
        if snapshotter is not None:
            snapshotter.close()
        lock.release()
    log.info("stopped")


def _stop_manager_if_idle(manager: FuseManagerClient, root: Path) -> None:
    """Let the manager go if no lazy layer is mounted. A manager that was killed (and not started
    again: nothing needed it) may have left its fd holder, which keeps the blob mount ROOT/blobs
    alive with nobody serving it (whatever touches it hangs): then start a manager, which takes
    the connection over and, with nothing mounted, stops and clears both."""
    if manager.running() is None and holder_socket(root).exists():
        log.info("the FUSE manager is gone but its fd holder runs; starting a manager to clear it")
        try:
            manager.ensure_running()
        except OSError as exc:
            log.warning("cannot start the FUSE manager to clear its fd holder", extra={"error": str(exc)})
            return
    manager.stop_if_idle()


MANAGER_CHECK_SECONDS = 2.0


async def _supervise_manager(manager: FuseManagerClient, snapshotter: Snapshotter) -> None:
    """Start the FUSE manager again if it dies while lazy layers need it (an OOM kill, a crash),
    and mount them again. With the fd holder keeping the blob server's FUSE connection, reads of
    running containers wait meanwhile instead of failing."""
    while True:
        await asyncio.sleep(MANAGER_CHECK_SECONDS)
        if snapshotter.remote_snapshots() == 0 or await asyncio.to_thread(manager.running) is not None:
            continue
        log.error("the FUSE manager is gone while lazy layers need it; starting it again")
        try:
            await asyncio.to_thread(manager.ensure_running)
            await asyncio.to_thread(snapshotter.restore_remote)
        except Exception as exc:  # next round tries again
            log.error("cannot start the FUSE manager again", extra={"error": str(exc)})


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
