"""The FUSE manager is restarted and upgraded under running containers (issue 11, point 5).

A container reads without pause through a lazily pulled layer: 1 MiB pieces of a 32 MiB file and
many small files, each read for the first time (so each needs bytes from the registry) and checked
against its sha256. Meanwhile the FUSE manager is handed over (SIGUSR2, as an upgrade does),
killed with SIGKILL and replaced by the daemon's supervisor, killed while the daemon itself is down
and replaced by a manager the test starts, killed several times in a row, and restarted with
``lazysnap restart-manager``. Every time a read is surely in flight: lazysnap's blob requests are
held by the registry proxy (``FaultProxy`` stalls) until the manager is gone or stopping, and the
blob server reports the READs it has taken and not answered. The container must see correct bytes
and no error, no mount may be lost, the fd holder stays the one of its root, and a clean stop
leaves no mount, holder or process behind.

The per-file FUSE backend (``[fs] backend = "fuse"``) has no handover by design: its mounts end
with their manager. Its restart tests are skipped; ``restart-manager`` refuses it with a reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapshotter.admin import admin_get, fetch_stats
from snapshotter.config import load
from snapshotter.contract import manager_socket
from snapshotter.daemon import manager_command
from snapshotter.formats import build_estargz
from snapshotter.fuse.holder import HolderClient
from tests.e2e.conftest import ContainerdFactory, make_tmpdir, remove_tmpdir
from tests.support import faults, mounts, oci
from tests.support.daemon import SNAPSHOTTER, TEST_BACKEND, LazysnapDaemon, run_cli, write_config
from tests.support.faults import FaultProxy
from tests.support.lazy import wait_until
from tests.support.mounts import lazy_layer_mounts
from tests.support.services import (
    Containerd,
    Registry,
    pid_alive,
    require_privileges,
    run_args,
    run_in_container,
    terminate_pid,
    unique_id,
)

# The per-file FUSE backend has no handover by design (its mounts end with their manager): the
# run of the suite on that backend deselects these tests (`-m "not erofs_only"` in the Makefile).
erofs_only = pytest.mark.erofs_only

MiB = 1 << 20
LARGE_SIZE = 32 * MiB
SMALL_FILES = 400
CHUNK_SIZE = 512 << 10
REPO = "lztest/restart"
TAG = "esgz"
LAZYSNAP_UA = "lazysnap/"  # the proxy holds lazysnap's requests only, never containerd's pull
# Nothing is fetched but what the container reads: no prefetch, no background fetch, no
# neighbours of small files. Reads wait as long as it takes (a held request is not a failure).
CONFIG: dict[str, dict[str, object]] = {
    "prefetch": {"background": False, "fetch_whole_below_bytes": 0},
    "read": {"small_file_readahead_bytes": 0, "timeout_seconds": 300.0},
    "fetch": {"timeout_seconds": 300.0},
}
RESTART_TIMEOUT = 60.0  # for a successor to serve; normally a few seconds
SUPERVISOR_STARTED = 'msg="started the FUSE manager"'
SUCCESSOR_WAITS = "waiting for the FUSE manager that holds this root to stop"


# --------------------------------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartImage:
    ref: str  # repo:tag, without host
    large: bytes  # /data/large.bin
    small: dict[str, str]  # path -> sha256 of the small files

    def piece(self, mib: int) -> str:
        return hashlib.sha256(self.large[mib * MiB : (mib + 1) * MiB]).hexdigest()


@pytest.fixture(scope="module")
def image(registry: Registry) -> Iterator[RestartImage]:
    """busybox, then one eStargz layer (512 KiB chunks) with a 32 MiB file and 400 small files of
    1-16 KiB, all incompressible."""
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    base: list[oci.Entry] = [
        *oci.busybox_entries(("sh",)),
        oci.Dir("/tmp", mode=0o1777),
        oci.Dir("/out"),
    ]
    large = oci.pseudo_random(LARGE_SIZE, b"lazysnap-manager-restart")
    small = {
        f"/data/small/f{i:03d}": oci.pseudo_random(1024 + (i * 7919) % (15 << 10), f"s{i}".encode())
        for i in range(SMALL_FILES)
    }
    data: list[oci.Entry] = [oci.Dir("/data"), oci.Dir("/data/small"), oci.File("/data/large.bin", large)]
    data += [oci.File(path, content) for path, content in small.items()]

    def encode(raw: bytes) -> oci.EncodedLayer:
        built = build_estargz(raw, chunk_size=CHUNK_SIZE, compression_level=1)
        return oci.EncodedLayer(built.blob, built.media_type, built.annotations, built.diff_id)

    workdir = Path(tempfile.mkdtemp(prefix="lzr", dir="/tmp"))
    try:
        built = oci.build_layout(workdir / "layout", [base, data], tag=TAG, cmd=["/bin/sh"], encode=encode)
        oci.push(built.layout_dir, TAG, registry.host, REPO)
    finally:
        if not mounts.unmount_all(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    yield RestartImage(
        f"{REPO}:{TAG}", large, {path: hashlib.sha256(content).hexdigest() for path, content in small.items()}
    )


# --------------------------------------------------------------------------------------------------
# The reading container
# --------------------------------------------------------------------------------------------------

# Round K is two lanes read at once, ``round.K.a`` and ``round.K.b`` (lines "P <mib> <sha256>" for
# a 1 MiB piece of the large file, "F <path> <sha256>" for a small file), started when the file
# ``round.K`` appears. Every read is checked; a wrong or failed read is written to ``bad`` and its
# error to ``errors``. ``done.K`` says a round is finished; ``stop`` ends the loop.
LOOP = r"""
B=/bin/busybox
check() {
  case $1 in
    P) got=$($B dd if=/data/large.bin bs=1048576 skip=$2 count=1 status=none 2>>/out/errors | $B sha256sum) ;;
    F) got=$($B sha256sum "$2" 2>>/out/errors) ;;
  esac
  got=${got%% *}
  if [ "$got" = "$3" ]; then echo "ok $1 $2" >> /out/progress; else echo "BAD $1 $2 $got" >> /out/bad; fi
}
lane() {
  while read kind what want; do check "$kind" "$what" "$want"; done < "$1"
}
k=0
while :; do
  while [ ! -e /out/round.$k ]; do
    if [ -e /out/stop ]; then echo stopped > /out/exited; exit 0; fi
    $B usleep 20000
  done
  lane /out/round.$k.a & lane /out/round.$k.b & wait
  echo "$k" > /out/done.$k
  k=$((k+1))
done
"""


class ReadingContainer:
    """A running container that reads what the test gives it, round by round (see LOOP)."""

    def __init__(self, cd: Containerd, ref: str, image: RestartImage, out: Path) -> None:
        self.cd = cd
        self.ref = ref
        self.image = image
        self.out = out
        self.rounds = 0
        # Pieces backwards (the chunk reader reads ahead forwards only), small files shuffled: every
        # read needs chunks no earlier read fetched.
        self._pieces = list(range(LARGE_SIZE // MiB))[::-1]
        self._files = sorted(image.small)
        random.Random(11).shuffle(self._files)
        self.cid = unique_id("reader")

    def start(self) -> None:
        (self.out / "loop.sh").write_text(LOOP)
        self.cd.containers.add((self.cd.namespace, self.cid))
        mount = f"type=bind,src={self.out},dst=/out,options=rbind:rw"
        args = ["run", "-d", *run_args(self.cd, self.cid), "--mount", mount, "--snapshotter", SNAPSHOTTER]
        self.cd.ctr(*args, self.ref, self.cid, "/bin/sh", "/out/loop.sh")

    def next_round(self, pieces: int = 2, files: int = 40) -> int:
        """Give the container its next round of never-read data; returns the round's number."""
        k = self.rounds
        lanes = {
            "a": [f"P {p} {self.image.piece(p)}" for p in self._take(self._pieces, pieces)],
            "b": [f"F {f} {self.image.small[f]}" for f in self._take(self._files, files)],
        }
        for lane, lines in lanes.items():
            (self.out / f"round.{k}.{lane}").write_text("".join(f"{line}\n" for line in lines))
        (self.out / f"round.{k}.tmp").write_text("")
        os.rename(self.out / f"round.{k}.tmp", self.out / f"round.{k}")
        self.rounds += 1
        return k

    @staticmethod
    def _take(items: list[Any], n: int) -> list[Any]:
        assert len(items) >= n, "the test ran out of never-read data"
        taken = items[:n]
        del items[:n]
        return taken

    def wait_done(self, k: int, timeout: float = 120) -> None:
        assert wait_until(lambda: (self.out / f"done.{k}").exists() or self.failures() != "", timeout), (
            f"round {k} did not finish"
        )
        assert self.failures() == ""

    def failures(self) -> str:
        """What went wrong inside the container so far: wrong bytes, read errors."""
        found = ""
        for name in ("bad", "errors"):
            path = self.out / name
            if path.exists() and path.read_text():
                found += f"{name}:\n{path.read_text()}"
        return found

    def checked(self) -> int:
        path = self.out / "progress"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def stop(self) -> None:
        (self.out / "stop").write_text("")
        assert wait_until(lambda: (self.out / "exited").exists()), "the reading loop did not stop"
        assert self.failures() == ""


# --------------------------------------------------------------------------------------------------
# The stack and what the test observes of the manager
# --------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    daemon: LazysnapDaemon
    cd: Containerd
    proxy: FaultProxy
    image: RestartImage
    out: Path
    started: list[subprocess.Popen[Any]]

    @property
    def root(self) -> Path:
        return self.daemon.root

    @property
    def ref(self) -> str:
        return f"{self.proxy.host}/{self.image.ref}"

    def log(self) -> str:
        return self.daemon.log_path.read_text(errors="replace")

    def manager(self) -> int | None:
        """The pid of the manager serving the root (it answers on ROOT/fuse.sock), or None."""
        try:
            return int(admin_get(manager_socket(self.root), "/version", timeout=5)["pid"])
        except OSError:
            return None

    def manager_stats(self) -> dict[str, Any]:
        return fetch_stats(manager_socket(self.root))

    def reads_in_flight(self) -> int:
        try:
            return int(self.manager_stats()["blobs"]["reads_in_flight"])
        except OSError:
            return 0

    def resumed(self) -> int:
        """How many managers have resumed the blob connection so far (all log to the daemon's log)."""
        return self.log().count('msg="blob server resumed"')

    def hold_reads(self) -> None:
        """From now on lazysnap's blob requests are held by the proxy (a read stays in flight)."""
        self.proxy.fail_all(faults.STALL)

    def let_reads_through(self) -> None:
        self.proxy.clear()
        self.proxy.release_stalls()

    def wait_in_flight(self) -> int:
        """Wait until the manager has taken a READ it cannot answer yet; its pid."""
        assert wait_until(lambda: self.reads_in_flight() > 0, RESTART_TIMEOUT), self.daemon.log_tail()
        pid = self.manager()
        assert pid is not None
        return pid

    def wait_successor(self, old: int, resumed: int) -> int:
        """Wait until a manager other than ``old`` serves, having resumed the blob connection (the
        ``resumed``-th time); ``old`` must be gone. The new manager's pid."""
        assert wait_until(
            lambda: self.manager() not in (None, old) and self.resumed() >= resumed, RESTART_TIMEOUT
        ), f"no successor of manager {old} serves:\n{self.daemon.log_tail()}"
        assert not pid_alive(old), f"manager {old} is still running"
        new = self.manager()
        assert new is not None
        return new

    def start_manager(self) -> int:
        """Start a FUSE manager as the daemon would (same command, same config), logging to the
        daemon's log; its pid."""
        assert self.daemon.config is not None
        config = load(self.daemon.config, root=self.root)
        command = manager_command(config, self.daemon.config, "debug", TEST_BACKEND or None)
        with open(self.daemon.log_path, "ab") as log:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd="/"
            )
        self.started.append(proc)
        return proc.pid


def processes_with(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains ``text``: (pid, command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry.name)):
            found.append((int(entry.name), cmdline.strip()))
    return found


def holders(root: Path) -> list[int]:
    return [pid for pid, _ in processes_with(f"snapshotter.fuse.holder --socket {root}/fuse-holder.sock")]


def holder_pid(root: Path) -> int:
    """The holder answering on the root's socket, which must be the only holder of the root."""
    pid = HolderClient(root / "fuse-holder.sock", timeout=5).ping()
    assert holders(root) == [pid]
    return pid


def blob_mount(root: Path) -> tuple[str, int]:
    """The blob server's mount (its file system type and device): the same connection as long as
    it does not change."""
    found = [m for m in mounts.mounts_under(root / "blobs") if m.target == str(root / "blobs")]
    assert len(found) == 1, found
    return found[0].fstype, os.stat(root / "blobs").st_dev


@pytest.fixture
def stack(
    image: RestartImage, registry: Registry, containerd_factory: ContainerdFactory
) -> Iterator[Callable[..., Stack]]:
    """``stack(**config_sections)``: a FaultProxy in front of the registry, lazysnap with CONFIG
    (and these sections), a containerd using it, and the image pulled lazily through the proxy.
    At teardown, containerd, the daemon and its manager stop; any process of the root the test
    left (a manager it started, a holder) is stopped by pid, and the directories are removed."""
    made: list[tuple[Stack | None, LazysnapDaemon, FaultProxy, Path, list[subprocess.Popen[Any]]]] = []

    def make(**sections: dict[str, object]) -> Stack:
        workdir = make_tmpdir()
        proxy = FaultProxy(registry.host, target_user_agent=LAZYSNAP_UA).start()
        merged = {key: {**CONFIG.get(key, {}), **sections.get(key, {})} for key in {*CONFIG, *sections}}
        daemon = LazysnapDaemon(workdir, config=write_config(workdir / "config.toml", merged))
        started: list[subprocess.Popen[Any]] = []
        made.append((None, daemon, proxy, workdir, started))
        daemon.start()
        cd = containerd_factory(proxy_plugins={SNAPSHOTTER: str(daemon.address)})
        out = workdir / "out"
        out.mkdir()
        s = Stack(daemon, cd, proxy, image, out, started)
        made[-1] = (s, daemon, proxy, workdir, started)
        cd.rpull(s.ref)
        assert daemon.stats()["lazy_mounts"] == 2, daemon.log_tail()
        return s

    yield make
    for s, daemon, proxy, workdir, started in reversed(made):
        try:
            if s is not None:
                s.cd.stop()
            proxy.stop()
            daemon.stop()
        finally:
            for proc in started:
                terminate_pid(proc.pid)
                proc.wait(10)
            for pid, _ in processes_with(str(daemon.root)):
                terminate_pid(pid)
            remove_tmpdir(workdir)


def assert_clean_stop(s: Stack) -> None:
    """Stop containerd, then the daemon as a node does (its manager with SIGTERM): no lazy layer,
    blob mount, holder or process of the root may remain."""
    assert s.cd.stop() == []
    s.daemon.stop()
    assert mounts.mounts_under(s.root) == []
    assert wait_until(lambda: processes_with(str(s.root)) == [], 10), processes_with(str(s.root))
    assert not (s.root / "fuse-holder.sock").exists()


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------


@erofs_only
def test_a_reading_container_sees_right_bytes_across_manager_handovers_and_kills(
    stack: Callable[..., Stack],
) -> None:
    s = stack()
    layers = sorted(lazy_layer_mounts(s.root))
    assert len(layers) == 2
    blobs = blob_mount(s.root)
    holder = holder_pid(s.root)
    reader = ReadingContainer(s.cd, s.ref, s.image, s.out)
    reader.start()
    reader.wait_done(reader.next_round())  # the loop works, before anything happens to the manager

    def unchanged() -> None:
        """Nothing was lost: the layers, the blob connection, the holder."""
        assert sorted(lazy_layer_mounts(s.root)) == layers
        assert blob_mount(s.root) == blobs
        assert holder_pid(s.root) == holder
        assert reader.failures() == ""

    resumed = 0

    # (a) Handover (SIGUSR2) with reads in flight: the old manager answers what it has taken,
    # reads arriving meanwhile wait in the kernel. The daemon's supervisor starts a successor
    # while the old one still waits for the registry: it must wait for its predecessor's exit.
    s.hold_reads()
    k = reader.next_round()
    old = s.wait_in_flight()
    os.kill(old, signal.SIGUSR2)
    assert wait_until(lambda: "FUSE manager stopping for a successor" in s.log())
    assert wait_until(lambda: SUCCESSOR_WAITS in s.log(), RESTART_TIMEOUT), s.daemon.log_tail()
    assert pid_alive(old)  # still answering the reads it has taken
    s.let_reads_through()
    resumed += 1
    s.wait_successor(old, resumed)
    reader.wait_done(k)
    unchanged()

    # (b) SIGKILL with reads in flight: the kernel keeps the READs the dead manager had taken and
    # resends them to the successor the daemon's supervisor starts.
    s.hold_reads()
    k = reader.next_round()
    old = s.wait_in_flight()
    os.kill(old, signal.SIGKILL)
    s.let_reads_through()
    resumed += 1
    new = s.wait_successor(old, resumed)
    reader.wait_done(k)
    assert s.manager_stats()["blobs"]["resent"] > 0  # the READs the killed manager had taken
    unchanged()

    # ... and with the daemon down: the test starts the successor, which the daemon then finds.
    s.daemon.stop(keep_manager=True)
    s.hold_reads()
    k = reader.next_round()
    old = s.wait_in_flight()
    os.kill(old, signal.SIGKILL)
    s.let_reads_through()
    ours = s.start_manager()
    resumed += 1
    assert s.wait_successor(old, resumed) == ours
    reader.wait_done(k)
    unchanged()
    s.daemon.start()
    assert s.manager() == ours  # found, not started again
    assert len(s.daemon.stats()["layers"]) == 2

    # (c) Several times in a row, each time with a read in flight: kill, kill, hand over.
    s.hold_reads()
    k = reader.next_round()
    for _ in range(2):
        old = s.wait_in_flight()
        started = s.log().count(SUPERVISOR_STARTED)
        os.kill(old, signal.SIGKILL)
        resumed += 1
        new = s.wait_successor(old, resumed)
        # (and the supervisor saw it serve: killed earlier, it would count as a failed start)
        assert wait_until(lambda: s.log().count(SUPERVISOR_STARTED) > started)  # noqa: B023
    old = s.wait_in_flight()
    assert old == new
    os.kill(old, signal.SIGUSR2)
    s.let_reads_through()
    resumed += 1
    s.wait_successor(old, resumed)
    reader.wait_done(k)
    unchanged()

    # Afterwards: the loop goes on, new containers start from the image, stats work.
    reader.wait_done(reader.next_round())
    whole = run_in_container(
        s.cd,
        s.ref,
        "/bin/sh",
        "-c",
        "/bin/busybox sha256sum /data/large.bin /data/small/f000 /data/small/f399",
        snapshotter=SNAPSHOTTER,
    )
    sums = faults.parse_sha256sum(whole)
    assert sums == {
        "/data/large.bin": hashlib.sha256(s.image.large).hexdigest(),
        "/data/small/f000": s.image.small["/data/small/f000"],
        "/data/small/f399": s.image.small["/data/small/f399"],
    }
    stats = run_cli("stats", "--root", str(s.root))
    assert stats.returncode == 0, stats.stderr
    assert len(json.loads(stats.stdout)["layers"]) == 2
    reader.stop()
    assert "blob read failed" not in s.log()
    # Every successor served at its first start.
    assert "refusing to start" not in s.log() and "cannot start the FUSE manager" not in s.log()
    assert s.log().count("FUSE manager stopping for a successor") == 2
    unchanged()
    assert_clean_stop(s)


def restart_manager_in_background(root: Path) -> subprocess.Popen[str]:
    """``lazysnap restart-manager --root ROOT``, running while the test goes on."""
    return subprocess.Popen(
        [sys.executable, "-m", "snapshotter", "restart-manager", "--root", str(root)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@erofs_only
def test_restart_manager_hands_over_under_a_reading_container(stack: Callable[..., Stack]) -> None:
    """``lazysnap restart-manager`` with reads in flight: with the daemon running (its supervisor
    starts the successor), with the daemon down (the command starts it), and after the fd holder
    was stopped (the manager starts a new one before it hands over)."""
    s = stack()
    layers = sorted(lazy_layer_mounts(s.root))
    blobs = blob_mount(s.root)
    reader = ReadingContainer(s.cd, s.ref, s.image, s.out)
    reader.start()
    reader.wait_done(reader.next_round())
    resumed = 0

    for daemon_up in (True, False):
        if not daemon_up:
            s.daemon.stop(keep_manager=True)
        s.hold_reads()
        k = reader.next_round()
        old = s.wait_in_flight()
        stopping = s.log().count("FUSE manager stopping for a successor")
        cli = restart_manager_in_background(s.root)
        s.started.append(cli)
        assert wait_until(lambda: s.log().count("FUSE manager stopping for a successor") > stopping)  # noqa: B023
        s.let_reads_through()
        out, err = cli.communicate(timeout=RESTART_TIMEOUT * 2)
        assert cli.returncode == 0, err
        new = s.manager()
        who = "the daemon" if daemon_up else "restart-manager"
        handed = f"FUSE manager of {s.root} handed over: pid {old} -> pid {new} (started by {who})"
        assert out.strip() == handed
        assert not pid_alive(old)
        reader.wait_done(k)
        if daemon_up:
            resumed += 1
            assert s.resumed() == resumed
        else:
            assert "blob server resumed" in (s.root / "fuse-manager.log").read_text()
            s.daemon.start()
            assert s.manager() == new  # found, not started again
        assert sorted(lazy_layer_mounts(s.root)) == layers
        assert blob_mount(s.root) == blobs

    # The holder is gone (stopped by someone): the manager starts a new one before handing over.
    holder = holder_pid(s.root)
    terminate_pid(holder)
    assert holders(s.root) == []
    before = s.manager()
    done = run_cli("restart-manager", "--root", str(s.root), timeout=RESTART_TIMEOUT * 2)
    assert done.returncode == 0, done.stderr
    assert f"pid {before} -> pid {s.manager()}" in done.stdout
    assert holder_pid(s.root) != holder
    reader.wait_done(reader.next_round())
    assert sorted(lazy_layer_mounts(s.root)) == layers
    assert blob_mount(s.root) == blobs
    reader.stop()
    assert "blob read failed" not in s.log()
    assert_clean_stop(s)


@erofs_only
def test_restart_manager_with_no_lazy_layer_mounted(privileged: None) -> None:
    """A daemon without lazy layers: its supervisor would start no successor (nothing needs one
    until the next mount), so the command starts it at once; the daemon then uses it."""
    require_privileges()
    workdir = make_tmpdir()
    daemon = LazysnapDaemon(workdir)
    try:
        daemon.start()
        old = daemon.manager_pid()
        done = run_cli("restart-manager", "--root", str(daemon.root), timeout=RESTART_TIMEOUT)
        assert done.returncode == 0, done.stderr
        new = daemon.manager_pid()
        assert new not in (None, old) and not pid_alive(old or 0)
        assert f"pid {old} -> pid {new} (started by restart-manager)" in done.stdout
        assert "blob server resumed" in (daemon.root / "fuse-manager.log").read_text()
        stats = run_cli("stats", "--root", str(daemon.root))  # the daemon reaches the new manager
        assert stats.returncode == 0 and json.loads(stats.stdout)["layers"] == {}, stats.stderr
        daemon.stop()
        assert mounts.mounts_under(daemon.root) == []
        assert wait_until(lambda: processes_with(str(daemon.root)) == [], 10)
    finally:
        try:
            daemon.stop()
        finally:
            for found, _ in processes_with(str(daemon.root)):
                terminate_pid(found)
            remove_tmpdir(workdir)


def test_restart_manager_refuses_what_it_cannot_hand_over(privileged: None) -> None:
    """No manager: nothing to restart. A manager on the per-file FUSE backend: a restart would
    unmount the lazy layers, so the command refuses, and the manager ignores SIGUSR2."""
    require_privileges()
    workdir = make_tmpdir()
    daemon = LazysnapDaemon(workdir, extra_args=["--fs-backend", "fuse"])
    try:
        nothing = run_cli("restart-manager", "--root", str(workdir / "root"))
        assert nothing.returncode == 1
        assert f"no FUSE manager serves {workdir / 'root'}: nothing to restart" in nothing.stderr

        daemon.start()  # starts its manager
        pid = daemon.manager_pid()
        assert pid is not None
        refused = run_cli("restart-manager", "--root", str(daemon.root))
        assert refused.returncode == 1
        assert "per-file FUSE backend" in refused.stderr
        assert "would unmount the lazy layers of running containers" in refused.stderr
        os.kill(pid, signal.SIGUSR2)
        log = daemon.log_path
        assert wait_until(lambda: "refusing to stop for a successor" in log.read_text())
        assert daemon.manager_pid() == pid
        assert admin_get(manager_socket(daemon.root), "/version", timeout=5)["pid"] == pid  # still serving
    finally:
        try:
            daemon.stop()
        finally:
            for found, _ in processes_with(str(daemon.root)):
                terminate_pid(found)
            remove_tmpdir(workdir)
