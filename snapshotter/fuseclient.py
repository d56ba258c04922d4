"""The daemon's side of the FUSE manager: start it if it is not running, and ask it for mounts.

``FuseManagerClient`` offers the snapshotter what ``RemoteLayers`` offers (mount, check, unmount,
forget_unused) and the admin endpoint what ``admin.LazyBackend`` asks, each call a request over
``ROOT/fuse.sock``. Calls block; the snapshotter makes them from its worker threads.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from snapshotter import __version__
from snapshotter.admin import AdminError, admin_get, unix_request
from snapshotter.remote import NotLazyError

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 30.0


def manager_socket(root: Path) -> Path:
    """Where the FUSE manager of ``root`` listens (root only)."""
    return root / "fuse.sock"


def manager_pidfile(root: Path) -> Path:
    """The running FUSE manager's pid: ``kill -TERM $(cat ROOT/fuse.pid)`` unmounts lazy layers."""
    return root / "fuse.pid"


class FuseManagerClient:
    def __init__(self, root: Path, command: Sequence[str], *, mount_timeout: float = 60.0) -> None:
        self.address = manager_socket(root)
        self.command = list(command)  # how to start a manager for this root
        self.mount_timeout = mount_timeout
        self._spawn_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------------

    def running(self) -> dict[str, Any] | None:
        """The running manager's version and pid, or None."""
        try:
            return admin_get(self.address, "/version", timeout=5)
        except OSError:
            return None

    def ensure_running(self) -> dict[str, Any]:
        """Find the manager serving this root, or start one and wait until it serves."""
        with self._spawn_lock:
            found = self.running()
            if found is not None:
                if found.get("version") != __version__:
                    log.warning(
                        "the running FUSE manager is another version; restart it (unmounting lazy "
                        "layers) to run this one",
                        extra={"manager_version": found.get("version"), "pid": found.get("pid")},
                    )
                return found
            # A session of its own: it outlives this process, and signals to the daemon's process
            # group (a terminal's ^C, systemd's KillMode=process stop) do not reach it.
            proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, start_new_session=True)
            threading.Thread(target=proc.wait, name="fuse-manager-reaper", daemon=True).start()
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                found = self.running()
                if found is not None:
                    log.info("started the FUSE manager", extra={"pid": found.get("pid")})
                    return found
                if proc.poll() is not None:
                    raise OSError(f"the FUSE manager exited with status {proc.returncode} at start")
                time.sleep(0.05)
            raise OSError(f"the FUSE manager did not serve {self.address} within {START_TIMEOUT_SECONDS}s")

    def _post(self, path: str, body: object, timeout: float = 30.0) -> dict[str, Any]:
        return admin_get(self.address, path, timeout, method="POST", body=body)

    # --- what the snapshotter asks --------------------------------------------------------------

    def mount(self, labels: Mapping[str, str], mountpoint: Path) -> None:
        """Mount lazily or raise NotLazyError, as ``RemoteLayers.mount``; a manager that is gone
        is started again once."""
        body = {"labels": dict(labels), "mountpoint": str(mountpoint)}
        timeout = self.mount_timeout + 30
        try:
            try:
                answer = self._post("/mount", body, timeout)
            except AdminError:
                raise
            except OSError:
                self.ensure_running()
                answer = self._post("/mount", body, timeout)
        except OSError as exc:
            raise NotLazyError("fuse-manager-unavailable", str(exc)) from None
        refused = answer.get("not_lazy")
        if refused:
            raise NotLazyError(refused["reason"], refused["detail"], required=bool(refused["required"]))

    def check(self, mountpoint: Path) -> bool:
        try:
            query = urllib.parse.urlencode({"mountpoint": str(mountpoint)})
            return bool(admin_get(self.address, f"/check?{query}", timeout=10)["alive"])
        except OSError:
            return False

    def unmount(self, mountpoint: Path) -> None:
        try:
            self._post("/unmount", {"mountpoint": str(mountpoint)}, timeout=60)
        except OSError as exc:
            log.warning(
                "cannot reach the FUSE manager to unmount", extra={"at": str(mountpoint), "error": str(exc)}
            )

    def forget_unused(self, digests_in_use: set[str]) -> None:
        try:
            self._post("/forget-unused", {"digests": sorted(digests_in_use)})
        except OSError as exc:
            log.warning("cannot reach the FUSE manager to forget unused TOCs", extra={"error": str(exc)})

    # --- what the admin endpoint asks (admin.LazyBackend) ---------------------------------------

    def stats(self) -> dict[str, Any]:
        return admin_get(self.address, "/stats")

    def profile(self, image: str) -> list[str]:
        answer = admin_get(self.address, "/profile?" + urllib.parse.urlencode({"image": image}))
        return [str(f) for f in answer["files"]]

    def prune(self, keep_bytes: int) -> dict[str, Any]:
        return self._post(f"/cache/prune?keep_bytes={keep_bytes}", None, timeout=120)

    def set_log_level(self, level: str) -> None:
        self._post("/log-level?" + urllib.parse.urlencode({"level": level}), None)

    def metrics_text(self) -> str:
        status, raw = unix_request(self.address, "GET", "/metrics", timeout=10)
        if status != 200:
            raise AdminError(f"the FUSE manager answered {status} for /metrics", status)
        return raw.decode()
