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
from snapshotter.admin import (
    AdminError,
    admin_get,
    fetch_metrics,
    fetch_profile_doc,
    fetch_stats,
    prune_cache,
    set_log_level,
)
from snapshotter.contract import NotLazyError, Served, manager_socket, mount_request, served_from_answer
from snapshotter.formats.registry import requires_lazy_mount
from snapshotter.ownership import process_exists

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 30.0
# A mount request waits for the lazy mount's and the eager fill's timeouts (the manager keeps to
# them) and this much more.
MOUNT_MARGIN_SECONDS = 30.0
MANAGER_RUNNING_EXIT = 3  # `lazysnap fuse-manager` exit status: another manager serves the root


class FuseManagerClient:
    def __init__(
        self,
        root: Path,
        command: Sequence[str],
        *,
        mount_timeout: float = 60.0,
        fill_timeout: float = 0.0,
        fingerprint: str = "",
        output: Path | None = None,
    ) -> None:
        self.address = manager_socket(root)
        self.command = list(command)  # how to start a manager for this root
        self.output = output  # where a manager started here logs (appended); None: where we log
        self.mount_timeout = mount_timeout
        self.fill_timeout = fill_timeout  # the eager fallback may fill a layer for this long
        self.fingerprint = fingerprint  # of the settings a manager started now would run with
        self._spawn_lock = threading.Lock()
        self.spawned: subprocess.Popen[bytes] | None = None  # the manager this process started

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
                        "the running FUSE manager is another version; `lazysnap restart-manager` runs "
                        "this one (the EROFS backend keeps lazy layers mounted; the FUSE backend "
                        "can only be restarted by unmounting them)",
                        extra={"manager_version": found.get("version"), "pid": found.get("pid")},
                    )
                elif self.fingerprint and found.get("config") != self.fingerprint:
                    log.warning(
                        "the running FUSE manager uses other settings than this config (fetch, "
                        "cache, prefetch, read, profile, cri); `lazysnap restart-manager` applies "
                        "them (EROFS backend; the FUSE backend must unmount lazy layers to restart)",
                        extra={"pid": found.get("pid")},
                    )
                return found
            # A session of its own: it outlives this process, and signals to the daemon's process
            # group (a terminal's ^C, systemd's KillMode=process stop) do not reach it.
            # cwd "/": `-m snapshotter` must not pick up a package from wherever the daemon ran.
            proc = self._spawn()
            threading.Thread(target=proc.wait, name="fuse-manager-reaper", daemon=True).start()
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                found = self.running()
                if found is not None:
                    if found.get("pid") == proc.pid:
                        self.spawned = proc
                    log.info("started the FUSE manager", extra={"pid": found.get("pid")})
                    return found
                # Exit status 3: another manager holds this root's lock; wait for it to serve.
                if proc.poll() is not None and proc.returncode != MANAGER_RUNNING_EXIT:
                    raise OSError(f"the FUSE manager exited with status {proc.returncode} at start")
                time.sleep(0.05)
            if proc.poll() is None:
                proc.terminate()
            raise OSError(f"the FUSE manager did not serve {self.address} within {START_TIMEOUT_SECONDS}s")

    def _spawn(self) -> subprocess.Popen[bytes]:
        if self.output is None:
            return subprocess.Popen(self.command, stdin=subprocess.DEVNULL, start_new_session=True, cwd="/")
        with open(self.output, "ab") as out:
            return subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                cwd="/",
            )

    def stop_spawned(self) -> None:
        """Stop the manager this process started (a daemon that fails to start must not leave
        one behind)."""
        if self.spawned is not None and self.spawned.poll() is None:
            self.spawned.terminate()
            try:
                self.spawned.wait(30)
            except subprocess.TimeoutExpired:
                self.spawned.kill()

    def stop_if_idle(self, timeout: float = 30.0) -> bool:
        """Ask the manager to exit when no lazy layer is mounted (the daemon is stopping, so no
        new one can come), and wait until its process is gone. True when it stopped (or was not
        running)."""
        found = self.running()
        if found is None:
            return True
        try:
            answer = self._post("/stop-if-idle", {}, timeout=10)
        except OSError:
            return True
        if not answer.get("stopping"):
            log.info(
                "the FUSE manager keeps serving lazy layers of running containers",
                extra={"mounted": answer.get("mounted")},
            )
            return False
        pid = int(found.get("pid", 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.spawned is not None and self.spawned.pid == pid:
                if self.spawned.poll() is not None:
                    return True
            elif not process_exists(pid):
                return True
            time.sleep(0.05)
        log.warning("the FUSE manager did not stop in time", extra={"timeout": timeout, "pid": pid})
        return False

    def _post(self, path: str, body: object, timeout: float = 30.0) -> dict[str, Any]:
        return admin_get(self.address, path, timeout, method="POST", body=body)

    # --- what the snapshotter asks --------------------------------------------------------------

    def mount(self, labels: Mapping[str, str], mountpoint: Path, lowerdirs: Sequence[Path] = ()) -> Served:
        """Mount lazily (or fill eagerly) or raise NotLazyError, as ``RemoteLayers.mount``; a
        manager that is gone is started again once. With the eager fallback, one that did not
        answer in time is not asked again: it keeps to the timeouts this waits for, and asking
        again would start the download again."""
        body = mount_request(labels, mountpoint, lowerdirs)
        timeout = self.mount_timeout + self.fill_timeout + MOUNT_MARGIN_SECONDS
        required = requires_lazy_mount(labels)  # no download can stand in for such a layer
        try:
            answer = self._post("/mount", body, timeout)
        except AdminError as exc:  # the manager answered, with an error
            raise NotLazyError("fuse-manager-error", str(exc), required=required) from None
        except TimeoutError as exc:
            if self.fill_timeout <= 0:  # (a lazy mount only: asking again costs little)
                answer = self._post_again(body, timeout, required)
            else:
                raise NotLazyError(
                    "fuse-manager-timeout", f"no answer within {timeout}s: {exc}", required=required
                ) from None
        except OSError:
            answer = self._post_again(body, timeout, required)
        refused = answer.get("not_lazy")
        if refused:
            raise NotLazyError.from_wire(refused, required=required)
        try:
            return served_from_answer(answer)
        except ValueError:
            raise NotLazyError(
                "fuse-manager-error", f"unknown answer {answer!r}", required=required
            ) from None

    def _post_again(self, body: object, timeout: float, required: bool) -> dict[str, Any]:
        """The mount request once more, the manager started again if it is gone."""
        try:
            self.ensure_running()
            return self._post("/mount", body, timeout)
        except OSError as exc:
            raise NotLazyError("fuse-manager-unavailable", str(exc), required=required) from None

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
        return fetch_stats(self.address)

    def profile(self, image: str) -> dict[str, Any]:
        return fetch_profile_doc(self.address, image)

    def prune(self, keep_bytes: int) -> dict[str, Any]:
        return prune_cache(self.address, keep_bytes)

    def set_log_level(self, level: str) -> None:
        set_log_level(self.address, level)

    def metrics_text(self) -> str:
        return fetch_metrics(self.address)
