"""The blob server on the real kernel: exact bytes, big requests, failures kept local, removal, stop."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapshotter.fuse import kernel
from snapshotter.fuse.blobserver import BlobServer
from tests.support.blobs import PatternSource, blob_name, pattern
from tests.support.lazy import wait_until
from tests.support.services import pid_alive, terminate_pid

pytestmark = pytest.mark.usefixtures("privileged")  # every test mounts
MiB = 1 << 20
Serve = Callable[..., BlobServer]


@pytest.fixture
def serve(workdir: Path) -> Iterator[Serve]:
    """Start a blob server on ``workdir/mnt`` serving the given sources; stopped after the test."""
    servers: list[BlobServer] = []

    def start(sources: dict[str, PatternSource], **options: int) -> BlobServer:
        server = BlobServer(workdir / "mnt", state_path=workdir / "state.json", **options)
        servers.append(server)
        server.start(sources)
        return server

    yield start
    for server in servers:
        server.stop()


def blob(label: str, size: int, **kw: Callable[[int, int], bool]) -> tuple[str, PatternSource]:
    return blob_name(label), PatternSource(label.encode(), size, **kw)


def expected(source: PatternSource, offset: int, size: int) -> bytes:
    return pattern(source.salt, offset, max(0, min(size, source.size - offset)))


def read_direct(path: Path, offset: int, size: int) -> bytes:
    """Read with O_DIRECT (page-aligned buffer), so that the request reaches the server."""
    buf = mmap.mmap(-1, max(size, mmap.PAGESIZE))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return buf[: min(n, size)]
    finally:
        os.close(fd)
        buf.close()


def test_blobs_of_many_sizes_read_back_exactly(serve: Serve) -> None:
    sizes = [1, 4095, 4096, 4097, MiB - 1, MiB, MiB + 1, 3 * MiB + 12345, 17 * MiB]
    blobs = dict(blob(f"size-{size}", size) for size in sizes)
    server = serve(blobs)
    assert sorted(os.listdir(server.mountpoint)) == sorted(blobs)
    for name, source in blobs.items():
        path = server.path(name)
        assert os.stat(path).st_size == source.size
        assert path.read_bytes() == expected(source, 0, source.size), name


def test_an_empty_blob_reads_as_empty_without_asking_its_source(serve: Serve) -> None:
    name, source = blob("empty", 0)
    server = serve({name: source})
    assert server.path(name).read_bytes() == b""
    assert read_direct(server.path(name), 0, 4096) == b""
    assert source.reads == []


def test_random_reads_including_past_the_end_return_exactly_the_blob(serve: Serve) -> None:
    name, source = blob("random", 9 * MiB + 123)
    server = serve({name: source})
    rng = random.Random(7)
    with open(server.path(name), "rb", buffering=0) as fh:
        for _ in range(300):
            offset = rng.randrange(0, source.size + 10_000)
            size = rng.randrange(1, 3 * MiB)
            assert os.pread(fh.fileno(), size, offset) == expected(source, offset, size), (offset, size)
    for _ in range(50):
        offset = rng.randrange(0, source.size + 4 * 4096) // 4096 * 4096
        size = rng.randrange(1, 768) * 4096
        assert read_direct(server.path(name), offset, size) == expected(source, offset, size), (offset, size)


def test_many_threads_read_many_blobs_at_once(serve: Serve) -> None:
    blobs = dict(blob(f"concurrent-{i}", (i + 1) * 3 * MiB + i * 999) for i in range(6))
    server = serve(blobs, workers=8)
    failures: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        names = list(blobs)
        for _ in range(40):
            name = rng.choice(names)
            source = blobs[name]
            offset = rng.randrange(0, source.size) // 4096 * 4096
            size = rng.randrange(1, 512) * 4096
            if seed % 2:
                got = read_direct(server.path(name), offset, size)
            else:
                with open(server.path(name), "rb", buffering=0) as fh:
                    got = os.pread(fh.fileno(), size, offset)
            if got != expected(source, offset, size):
                failures.append(f"{name} at {offset}+{size}")

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []
    assert server.stats()["read_errors"] == 0


def test_requests_are_as_large_as_the_kernel_allows(serve: Serve) -> None:
    name, source = blob("big", 32 * MiB)
    server = serve({name: source})
    largest = min(MiB, kernel.max_pages_limit() * 4096)
    assert server.negotiated.max_read == largest
    with open(server.path(name), "rb", buffering=0) as fh:
        while fh.read(128 * 1024):
            pass
    sizes = source.read_sizes()
    assert max(sizes) == largest
    assert sum(s for s in sizes if s == largest) >= source.size // 2  # readahead ramps up, then stays
    source.reads.clear()
    offset = 0
    while offset < source.size:
        offset += len(read_direct(server.path(name), offset, 4 * MiB))
    assert set(source.read_sizes()) == {largest}


def test_a_failing_source_fails_that_read_only(serve: Serve) -> None:
    bad_name, bad = blob("bad", 8 * MiB, fail=lambda offset, size: offset < 2 * MiB and offset + size > MiB)
    good_name, good = blob("good", 4 * MiB)
    server = serve({bad_name: bad, good_name: good})
    with pytest.raises(OSError) as failed:
        read_direct(server.path(bad_name), MiB, 4096)
    assert failed.value.errno == errno.EIO
    assert read_direct(server.path(bad_name), 4 * MiB, MiB) == expected(bad, 4 * MiB, MiB)
    assert read_direct(server.path(bad_name), 0, 4096) == expected(bad, 0, 4096)
    assert server.path(good_name).read_bytes() == expected(good, 0, good.size)
    assert server.is_alive() and sorted(os.listdir(server.mountpoint)) == sorted([bad_name, good_name])
    assert server.stats()["read_errors"] >= 1


def test_a_short_answer_from_a_source_is_an_error_not_zeros(serve: Serve) -> None:
    class Short(PatternSource):
        def read(self, offset: int, size: int) -> bytes:
            return super().read(offset, size)[:-1]

    name = blob_name("short")
    server = serve({name: Short(b"short", MiB)})
    with pytest.raises(OSError) as failed:
        read_direct(server.path(name), 0, 4096)
    assert failed.value.errno == errno.EIO


def test_a_stalled_blob_does_not_hold_up_other_blobs(serve: Serve) -> None:
    slow_name, slow = blob("slow", 16 * MiB, stall=lambda offset, size: True)
    slow.gate.clear()
    fast_name, fast = blob("fast", 8 * MiB)
    server = serve({slow_name: slow, fast_name: fast}, workers=4)
    results: dict[int, bytes] = {}

    def read_slow(i: int) -> None:
        results[i] = read_direct(server.path(slow_name), i * MiB, MiB)

    threads = [threading.Thread(target=read_slow, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        # Three of the four workers are stuck in the slow blob; the others wait in the queue.
        assert wait_until(lambda: len(slow.reads) == 3 and server.stats()["reads_in_flight"] == 6)
        offset = 0
        while offset < fast.size:
            got = read_direct(server.path(fast_name), offset, 2 * MiB)
            assert got == expected(fast, offset, 2 * MiB)
            offset += len(got)
        assert len(slow.reads) == 3  # still stuck
    finally:
        slow.gate.set()
        for t in threads:
            t.join(60)
    assert results == {i: expected(slow, i * MiB, MiB) for i in range(6)}


def test_remove_makes_the_blob_disappear(serve: Serve) -> None:
    name, source = blob("removed", 2 * MiB)
    other_name, other = blob("kept", MiB)
    server = serve({name: source, other_name: other})
    path = server.path(name)
    assert path.read_bytes() == expected(source, 0, source.size)  # cached, and named in the dcache
    held = os.open(path, os.O_RDONLY)
    try:
        server.remove(name)
        with pytest.raises(FileNotFoundError):
            os.stat(path)
        assert os.listdir(server.mountpoint) == [other_name]
        with pytest.raises(OSError) as failed:  # the cached pages went with it
            os.pread(held, 4096, 0)
        assert failed.value.errno == errno.EIO
    finally:
        os.close(held)
    with pytest.raises(FileNotFoundError):
        server.remove(name)
    server.add(name, PatternSource(b"again", 4096))
    assert path.read_bytes() == pattern(b"again", 0, 4096)


def test_a_blob_added_later_is_found_at_once(serve: Serve) -> None:
    server = serve({})
    name, source = blob("later", 5000)
    with pytest.raises(FileNotFoundError):
        os.stat(server.path(name))  # no negative entry is cached
    assert server.add(name, source) == server.path(name)
    assert server.path(name).read_bytes() == expected(source, 0, 5000)


def test_adding_again_rebinds_a_blob_of_the_same_size_only(serve: Serve) -> None:
    name, source = blob("rebound", 8192)
    server = serve({name: source})
    replacement = PatternSource(b"rebound", 8192)
    server.add(name, replacement)
    read_direct(server.path(name), 0, 4096)
    assert replacement.reads and not source.reads
    with pytest.raises(FileExistsError, match="size 8192"):
        server.add(name, PatternSource(b"x", 1))
    for bad in ("sha256:" + "0" * 64, "../escape", "sha256-" + "0" * 63):
        with pytest.raises(ValueError, match="bad blob name"):
            server.add(bad, PatternSource(b"x", 1))


def test_the_mount_looks_like_a_read_only_directory_of_files(serve: Serve) -> None:
    names = [blob(f"meta-{i}", i * 4096 + 1) for i in range(3)]
    server = serve(dict(names))
    root = os.stat(server.mountpoint)
    assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o555
    st = os.stat(server.path(names[1][0]))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444 and st.st_uid == 0
    with pytest.raises(OSError) as failed:
        os.open(server.path(names[1][0]), os.O_WRONLY)
    assert failed.value.errno == errno.EROFS
    with pytest.raises(OSError) as failed:
        os.getxattr(server.path(names[1][0]), "user.x")
    assert failed.value.errno in (errno.ENOTSUP, errno.ENODATA)
    assert os.access(server.path(names[1][0]), os.R_OK)
    vfs = os.statvfs(server.mountpoint)
    assert vfs.f_files == 4 and vfs.f_blocks == 1 + 2 + 3
    with os.scandir(server.mountpoint) as it:
        listed = {e.name: e.is_file() for e in it}
    assert listed == {name: True for name, _ in names}


def test_stop_leaves_no_mount_no_thread_no_fd_and_no_state(workdir: Path) -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    name, source = blob("stop", MiB)
    server = BlobServer(workdir / "mnt", state_path=workdir / "state.json")
    server.start({name: source})
    assert (workdir / "state.json").exists()
    assert server.path(name).read_bytes() == expected(source, 0, MiB)
    held = os.open(server.path(name), os.O_RDONLY | os.O_DIRECT)  # a busy mount must still go away
    buf = mmap.mmap(-1, 4096)
    try:
        server.stop()
        assert kernel.mount_at(workdir / "mnt") is None
        with pytest.raises(OSError) as failed:  # the connection is gone
            os.preadv(held, [buf], 0)
        assert failed.value.errno == errno.ENOTCONN
    finally:
        os.close(held)
        buf.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("blobfs")]
    assert set(os.listdir("/proc/self/fd")) == fds_before
    assert not (workdir / "state.json").exists()
    server.stop()  # a second stop is harmless


def test_a_dead_mount_left_at_the_mount_point_is_cleared(workdir: Path) -> None:
    name, source = blob("dead", 4096)
    (workdir / "mnt").mkdir()
    fd = os.open("/dev/fuse", os.O_RDWR)
    kernel.mount_readonly(
        "dead", workdir / "mnt", "fuse.dead", f"fd={fd},rootmode=40000,user_id=0,group_id=0"
    )
    os.close(fd)  # no server, no keeper: the connection is aborted, the mount stays dead
    second = BlobServer(workdir / "mnt", state_path=workdir / "state.json")
    second.start({name: source})
    try:
        assert second.path(name).read_bytes() == expected(source, 0, 4096)
    finally:
        second.stop()
    assert kernel.mount_at(workdir / "mnt") is None


_KILLED_READER = """
import signal, sys
signal.signal(signal.SIGUSR1, lambda *a: None)
with open(sys.argv[1], "rb") as fh:
    data = fh.read(4096)
print(len(data), flush=True)
"""


class FailThenStall(PatternSource):
    """The first read (the kernel's readahead) fails; the next (its one-page retry, a synchronous
    and interruptible request) waits for the gate."""

    def __init__(self, salt: bytes, size: int) -> None:
        super().__init__(salt, size)
        self.gate.clear()

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            self.reads.append((offset, size))
            first = len(self.reads) == 1
        if first:
            raise OSError(errno.EIO, "first read fails")
        self.entered.set()
        self.gate.wait()
        return pattern(self.salt, offset, size)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR1])
def test_an_interrupted_read_is_answered_at_once_only_for_a_dying_reader(serve: Serve, sig: int) -> None:
    name = blob_name("interrupt")
    source = FailThenStall(b"interrupt", MiB)
    server = serve({name: source})
    reader = subprocess.Popen(
        [sys.executable, "-c", _KILLED_READER, str(server.path(name))], stdout=subprocess.PIPE
    )
    try:
        assert source.entered.wait(30)
        os.kill(reader.pid, sig)
        assert wait_until(lambda: server.stats()["interrupts"] == 1)
        if sig == signal.SIGKILL:
            # Answered EINTR without waiting for the source: the process can die.
            assert wait_until(lambda: not pid_alive(reader.pid))
            assert server.stats()["interrupted"] == 1
            source.gate.set()
        else:
            # Any other signal: the read completes normally once the source answers.
            assert server.stats()["interrupted"] == 0 and pid_alive(reader.pid)
            source.gate.set()
            out, _ = reader.communicate(timeout=30)
            assert out.strip() == b"4096" and reader.returncode == 0
        assert wait_until(lambda: server.stats()["reads_in_flight"] == 0)
    finally:
        source.gate.set()
        terminate_pid(reader.pid)
        reader.wait()


class CachedHalf(PatternSource):
    """Has the first half of the blob at hand (``read_cached``); the rest needs ``read``."""

    def __init__(self, salt: bytes, size: int) -> None:
        super().__init__(salt, size)
        self.cached: list[tuple[int, int]] = []

    def read_cached(self, offset: int, size: int) -> bytes | None:
        if offset + size > self.size // 2:
            return None
        self.cached.append((offset, size))
        return pattern(self.salt, offset, size)


def test_small_reads_a_source_has_at_hand_skip_the_workers(serve: Serve) -> None:
    name = blob_name("cached")
    source = CachedHalf(b"cached", 8 * MiB)
    server = serve({name: source})
    assert read_direct(server.path(name), 4096, 8192) == pattern(b"cached", 4096, 8192)
    assert source.cached == [(4096, 8192)] and source.reads == []
    assert read_direct(server.path(name), 6 * MiB, 4096) == pattern(b"cached", 6 * MiB, 4096)
    assert source.reads == [(6 * MiB, 4096)]  # not at hand: a worker asked read()
    source.reads.clear()
    assert read_direct(server.path(name), 0, MiB) == pattern(b"cached", 0, MiB)
    assert source.reads == [(0, MiB)]  # big: copied by a worker, in parallel with others
    assert server.stats()["reads"] == 3


def test_a_server_object_starts_once(serve: Serve) -> None:
    server = serve({})
    with pytest.raises(RuntimeError, match="starts once"):
        server.start({})
