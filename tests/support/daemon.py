"""Run ``lazysnap serve`` as a subprocess and talk to it with the generated gRPC client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from snapshotter.admin import admin_socket, fetch_stats
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from tests.support.services import pid_alive, terminate_pid

SNAPSHOTTER = "lazysnap"
# `make test` runs the lazy-layer tests once per backend: LAZYSNAP_TEST_BACKEND=fuse|erofs.
TEST_BACKEND = os.environ.get("LAZYSNAP_TEST_BACKEND", "")


def write_config(path: Path, sections: Mapping[str, Mapping[str, object]]) -> Path:
    """A lazysnap config file with these ``[section] key = value`` settings (TOML via JSON values)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class LazysnapDaemon:
    """One daemon process with its root, socket and log file under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        config: Path | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.workdir = workdir
        self.root = workdir / "root"
        self.address = workdir / "lazysnap.sock"
        self.log_path = workdir / "lazysnap.log"
        self.config = config
        self.extra_args = extra_args or []
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "snapshotter", "serve", "--root", str(self.root)]
        cmd += ["--address", str(self.address), "--log-level", "debug"]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        if TEST_BACKEND:
            cmd += ["--fs-backend", TEST_BACKEND]
        return cmd + self.extra_args

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lazysnap exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.address.exists():
                try:
                    channel = grpc.insecure_channel(f"unix:{self.address}")
                    grpc.channel_ready_future(channel).result(timeout=1)
                    self._channel = channel
                    return
                except grpc.FutureTimeoutError:
                    channel.close()
            time.sleep(0.05)
        raise RuntimeError(f"lazysnap did not start serving in {timeout}s:\n{self.log_tail()}")

    @property
    def stub(self) -> pb_grpc.SnapshotsStub:
        assert self._channel is not None, "daemon not started"
        return pb_grpc.SnapshotsStub(self._channel)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0, *, keep_manager: bool = False) -> int:
        """Signal the daemon and wait for it; SIGKILL if it does not exit in time. Then stop the
        FUSE manager it started (which unmounts lazy layers), unless ``keep_manager``: a daemon
        restart as on a node, where running containers keep their lazy layers."""
        self._close_channel()
        code = self.proc.returncode if self.proc else 0
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                tail = self.log_tail()
                raise RuntimeError(f"lazysnap ignored signal {sig} for {timeout}s:\n{tail}") from None
        if not keep_manager:
            self.stop_manager(timeout)
        return code

    def kill(self) -> None:
        """kill -9 of the daemon alone: its FUSE manager, in a session of its own, survives."""
        self.stop(signal.SIGKILL, keep_manager=True)

    def manager_pid(self) -> int | None:
        try:
            pid = int((self.root / "fuse.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def stop_manager(self, timeout: float = 20.0) -> None:
        """SIGTERM the FUSE manager of this root (it unmounts every lazy layer) and wait for it."""
        pid = self.manager_pid()
        if pid is not None:
            terminate_pid(pid, timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stats(self) -> dict[str, Any]:
        """The daemon's lazy-pull statistics from its admin endpoint."""
        return fetch_stats(admin_socket(self.root))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "snapshotter", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
