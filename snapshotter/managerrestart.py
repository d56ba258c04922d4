"""Restarting the FUSE manager under running containers: ``lazysnap restart-manager``.

With the EROFS backend a manager can hand its lazy layers over to a successor (an upgrade, a
restart): on SIGUSR2 it stops reading the blob server's requests, answers the reads it has taken
and exits, leaving the EROFS mounts (kernel mounts) and the blob server's FUSE connection (kept by
the fd holder) in place; the next manager resumes the connection, and requests that arrived
meanwhile wait in the kernel. This module drives that from outside: it checks that the running
manager can hand over, signals it, waits for it to exit and for a successor to serve. The daemon's
supervisor starts the successor when a daemon runs and lazy layers need one; otherwise this module
starts it, with the predecessor's command line (so an upgraded package runs under the same flags),
logging to ``ROOT/fuse-manager.log``.

The per-file FUSE backend cannot hand over: its mounts end with their manager.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from snapshotter.fuseclient import START_TIMEOUT_SECONDS, FuseManagerClient
from snapshotter.ownership import process_exists, root_is_locked

# The predecessor answers the reads it has taken before it exits: a blob server's stop waits up to
# 30 s for them, then readers and the registry client close.
STOP_TIMEOUT_SECONDS = 120.0
# The daemon's supervisor looks every 2 s (daemon.MANAGER_CHECK_SECONDS) and then waits for the
# manager it starts to serve.
SUPERVISOR_WAIT_SECONDS = 10.0 + START_TIMEOUT_SECONDS
_POLL_SECONDS = 0.05


class RestartError(Exception):
    """The manager cannot be restarted without breaking lazy layers, or the restart failed."""


@dataclass(frozen=True)
class Restarted:
    old_pid: int
    new_pid: int
    started_by: str  # "the daemon" or "restart-manager"


def restart_manager(
    root: Path,
    *,
    stop_timeout: float = STOP_TIMEOUT_SECONDS,
    supervisor_wait: float = SUPERVISOR_WAIT_SECONDS,
) -> Restarted:
    """Hand the FUSE manager of ``root`` over to a successor and wait until the successor serves."""
    client = FuseManagerClient(root, [])
    found = client.running()
    if found is None:
        raise RestartError(f"no FUSE manager serves {root}: nothing to restart")
    old = int(found.get("pid", 0))
    backend = found.get("backend")
    if backend == "fuse":
        raise RestartError(
            f"the FUSE manager of {root} (pid {old}) serves lazy layers with the per-file FUSE "
            "backend, which cannot hand its mounts over: a restart would unmount the lazy layers of "
            "running containers. Restart it (SIGTERM to ROOT/fuse.pid) only when no container uses them."
        )
    if backend != "erofs":
        raise RestartError(
            f"the FUSE manager of {root} (pid {old}, version {found.get('version')}) cannot hand its "
            "lazy layers over to a successor: a restart would unmount the lazy layers of running "
            "containers"
        )
    if not found.get("handover"):
        raise RestartError(
            f"the FUSE manager of {root} (pid {old}) has no fd holder keeping its blob connection "
            f"(see {root}/fuse-holder.log): a restart would break the lazy layers of running containers"
        )
    command = _command_line(old)
    try:
        serving = len(client.stats().get("layers", {}))
    except OSError:
        serving = 0
    os.kill(old, signal.SIGUSR2)
    _wait_for_exit(client, old, stop_timeout)
    # A daemon's supervisor starts the successor of a manager that served lazy layers (none is
    # needed otherwise until the daemon mounts one: then start it here, at once).
    if serving and root_is_locked(root):
        new = _wait_for_successor(client, old, supervisor_wait)
        if new is not None:
            return Restarted(old, new, "the daemon")
    starter = FuseManagerClient(root, command, output=root / "fuse-manager.log")
    try:
        started = starter.ensure_running()
    except OSError as exc:
        raise RestartError(f"cannot start a successor of manager {old}: {exc}") from None
    new_pid = int(started.get("pid", 0))
    who = "restart-manager" if starter.spawned is not None else "the daemon"
    return Restarted(old, new_pid, who)


def _command_line(pid: int) -> list[str]:
    """How ``pid`` was started (to start its successor the same way)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as exc:
        raise RestartError(f"cannot read the command line of manager {pid}: {exc.strerror}") from None
    command = [arg.decode(errors="surrogateescape") for arg in raw.split(b"\0")[:-1]]
    if "fuse-manager" not in command:
        raise RestartError(f"process {pid} is not a FUSE manager: {' '.join(command)}")
    return command


def _wait_for_exit(client: FuseManagerClient, pid: int, timeout: float) -> None:
    """Wait until the manager ``pid`` has handed over and exited; fail if it refuses (it still
    serves and says it cannot hand over) or takes too long."""
    deadline = time.monotonic() + timeout
    while process_exists(pid):
        found = client.running()
        if found is not None and found.get("pid") == pid and not found.get("handover"):
            raise RestartError(f"manager {pid} refused to hand over (see its log); it still serves")
        if time.monotonic() > deadline:
            raise RestartError(f"manager {pid} did not stop within {timeout:.0f}s after SIGUSR2")
        time.sleep(_POLL_SECONDS)


def _wait_for_successor(client: FuseManagerClient, old: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.running()
        if found is not None and found.get("pid") != old:
            return int(found.get("pid", 0))
        time.sleep(_POLL_SECONDS)
    return None
