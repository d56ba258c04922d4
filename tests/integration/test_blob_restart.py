"""The blob server is replaced under a reader that never stops: gracefully, by SIGKILL with a read in
flight, and with systemd's fd store protocol instead of the holder. The reader (its own process,
O_DIRECT, every byte checked) must see correct bytes and no error throughout."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from snapshotter.fuse import kernel
from snapshotter.fuse.holder import start_holder
from tests.support.blobs import blob_name
from tests.support.lazy import wait_until
from tests.support.services import terminate_pid

MiB = 1 << 20
SIZE = 64 * MiB
REPO = Path(__file__).resolve().parents[2]
LABEL = "restart"


@dataclass
class Bench:
    """Everything one test starts, stopped by pid (and unmounted) at the end, also on failure."""

    root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)  # servers
    readers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    holder_pid: int | None = None
    servers: int = 0

    @property
    def mountpoint(self) -> Path:
        return self.root / "mnt"

    @property
    def blob(self) -> Path:
        return self.mountpoint / blob_name(LABEL)

    def start_holder(self) -> None:
        self.holder_pid = start_holder(self.root / "holder.sock", log_path=self.root / "holder.log")

    def server(
        self,
        *extra: str,
        env: dict[str, str] | None = None,
        argv0: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> Server:
        """Start a blob server process and wait until it serves."""
        self.servers += 1
        n = self.servers
        ready, stats = self.root / f"ready{n}", self.root / f"stats{n}"
        args = [
            "--mountpoint", str(self.mountpoint), "--state", str(self.root / "state.json"),
            "--blob", f"{LABEL}:{SIZE}", "--ready", str(ready), "--stats", str(stats), *extra,
        ]  # fmt: skip
        if "--fdstore" not in extra:
            args += ["--holder", str(self.root / "holder.sock")]
        log = open(self.root / f"server{n}.log", "wb")  # noqa: SIM115 - the child writes it
        cmd = (argv0 or [sys.executable]) + ["-m", "tests.support.blobserve", *args]
        # From the repository, whatever the cwd: libfuse's loop (the per-file backend's tests, run
        # earlier in the same process) leaves the process in "/".
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, pass_fds=pass_fds, cwd=REPO)
        log.close()
        self.procs.append(proc)
        assert wait_until(lambda: ready.exists() or proc.poll() is not None), "server did not start"
        assert ready.exists(), (self.root / f"server{n}.log").read_text()
        return Server(proc, ready.read_text().split()[1], stats)

    def reader(self) -> Reader:
        progress = self.root / "progress"
        progress.write_bytes(bytes(8))
        err = open(self.root / "reader.log", "wb")  # noqa: SIM115 - the child writes it
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.blobread", str(self.blob), LABEL, str(SIZE),
             "--progress", str(progress)],
            stderr=err,
        )  # fmt: skip
        err.close()
        self.readers.append(proc)
        return Reader(proc, progress, self.root / "reader.log")

    def close(self) -> None:
        # Servers first, then the holder, then readers: a reader whose request a server had taken
        # cannot die (not even by SIGKILL) until the connection ends with its last fd.
        for proc in reversed(self.procs):
            terminate_pid(proc.pid)
            proc.wait()
        if self.holder_pid is not None:
            terminate_pid(self.holder_pid)
        for proc in self.readers:
            terminate_pid(proc.pid)
            proc.wait()


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    how: str  # "mounted" or "resumed"
    stats_path: Path

    def stop(self, sig: int) -> dict[str, int]:
        """SIGTERM: hand over; SIGUSR1: stop and unmount. The server's counters."""
        self.proc.send_signal(sig)
        assert self.proc.wait(60) == 0
        return dict(json.loads(self.stats_path.read_text()))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(60)


@dataclass
class Reader:
    proc: subprocess.Popen[bytes]
    progress_path: Path
    log: Path

    def checked(self) -> int:
        """Bytes read and found correct so far; fails the test at once if the reader failed."""
        assert self.proc.poll() is None, f"the reader failed: {self.log.read_text()}"
        return int.from_bytes(self.progress_path.read_bytes()[:8], "little")

    def wait_for(self, amount: int) -> None:
        assert wait_until(lambda: self.checked() >= amount, timeout=120), self.checked()

    def finish(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0, self.log.read_text()
        assert self.log.read_text() == ""


@pytest.fixture
def bench(privileged: None, workdir: Path) -> Iterator[Bench]:
    b = Bench(workdir)
    try:
        yield b
    finally:
        b.close()


def test_a_graceful_handover_under_a_reader(bench: Bench) -> None:
    bench.start_holder()
    first = bench.server()
    assert first.how == "mounted"
    reader = bench.reader()
    reader.wait_for(2 * SIZE)
    stats = first.stop(signal.SIGTERM)  # hand over: the mount stays, requests wait in the kernel
    assert stats["reads_in_flight"] == 0 and stats["read_errors"] == 0
    assert kernel.mount_at(bench.mountpoint) is not None
    at_handover = reader.checked()
    second = bench.server()
    assert second.how == "resumed"
    reader.wait_for(at_handover + 2 * SIZE)  # served by the second server
    reader.finish()
    stats = second.stop(signal.SIGUSR1)
    assert stats["reads"] > 0 and stats["read_errors"] == 0
    assert kernel.mount_at(bench.mountpoint) is None


def test_a_killed_server_is_replaced_and_its_unanswered_read_resent(bench: Bench) -> None:
    bench.start_holder()
    stall_at = 40 * MiB
    stalled = bench.root / "stalled"
    first = bench.server("--stall-at", str(stall_at), "--stalled", str(stalled))
    reader = bench.reader()
    assert wait_until(stalled.exists, timeout=120)  # the server holds the read of 40 MiB..
    first.kill()  # .. and dies with it: only the kernel still knows the request
    assert reader.checked() == stall_at
    second = bench.server()
    assert second.how == "resumed"
    reader.wait_for(stall_at + 2 * SIZE)
    reader.finish()
    stats = second.stop(signal.SIGUSR1)
    assert stats["resent"] >= 1 and stats["read_errors"] == 0


def test_a_read_a_handover_could_not_finish_is_left_to_the_successor(bench: Bench) -> None:
    """A handover waits a bounded time for the reads it has taken (the registry may stall); one it
    gives up on, and that then fails (its chunk reader closes), is never answered: the kernel keeps
    it and resends it to the successor, and the reader sees right bytes, no error."""
    bench.start_holder()
    stall_at = 40 * MiB
    stalled = bench.root / "stalled"
    first = bench.server(
        "--stall-at", str(stall_at), "--stalled", str(stalled),
        "--stop-timeout", "0.5", "--fail-stalled-after-stop",
    )  # fmt: skip
    reader = bench.reader()
    assert wait_until(stalled.exists, timeout=120)
    stats = first.stop(signal.SIGTERM)  # hand over; the stalled read then fails in the old server
    assert stats["read_errors"] == 1
    assert reader.checked() == stall_at  # and the reader did not get the failure: it waits
    second = bench.server()
    assert second.how == "resumed"
    reader.wait_for(stall_at + SIZE)
    reader.finish()
    stats = second.stop(signal.SIGUSR1)
    assert stats["resent"] >= 1 and stats["read_errors"] == 0


def test_repeated_kills_under_load(bench: Bench) -> None:
    bench.start_holder()
    server = bench.server("--delay", "0.002")  # slow reads: kills land while reads are in flight
    reader = bench.reader()
    for _ in range(3):
        reader.wait_for(reader.checked() + 8 * MiB)
        server.kill()
        server = bench.server("--delay", "0.002")
        assert server.how == "resumed"
    reader.wait_for(reader.checked() + SIZE)
    reader.finish()
    assert server.stop(signal.SIGUSR1)["read_errors"] == 0


def test_the_systemd_fd_store_protocol_carries_the_connection(bench: Bench) -> None:
    """The test plays systemd: it receives the fd pushed with FDSTORE=1 and passes it to the next
    server as fd 3 with $LISTEN_FDS, $LISTEN_FDNAMES and $LISTEN_PID."""
    notify_path = bench.root / "notify"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(notify_path))
    stored: int | None = None
    try:
        first = bench.server("--fdstore", env={**os.environ, "NOTIFY_SOCKET": str(notify_path)})
        msg, fds, _flags, _addr = socket.recv_fds(manager, 4096, 4)
        assert msg.startswith(b"FDSTORE=1\nFDNAME=lazysnap-blobs-") and len(fds) == 1
        stored = fcntl.fcntl(fds[0], fcntl.F_DUPFD_CLOEXEC, 10)  # clear of fd 3, where it goes
        os.close(fds[0])
        name = msg.split(b"FDNAME=")[1].decode()
        reader = bench.reader()
        reader.wait_for(SIZE)
        first.kill()
        at_kill = reader.checked()
        # Start the successor as systemd would: the stored fd as fd 3, $LISTEN_PID its own pid.
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "LISTEN_FDS": "1", "LISTEN_FDNAMES": name}
        second = bench.server(
            "--fdstore",
            env=env,
            argv0=["bash", "-c", f'exec 3<&{stored} {stored}<&-; export LISTEN_PID=$$; exec "$0" "$@"',
                   sys.executable],
            pass_fds=(stored,),
        )  # fmt: skip
        assert second.how == "resumed"
        reader.wait_for(at_kill + SIZE)
        reader.finish()
        stats = second.stop(signal.SIGUSR1)
        assert stats["read_errors"] == 0
        assert manager.recv(4096) == f"FDSTOREREMOVE=1\nFDNAME={name}".encode()
    finally:
        manager.close()
        if stored is not None:
            os.close(stored)
