"""Registry faults end to end: real lazysnap, real containerd (`ctr-remote image rpull`), the real
registry behind ``FaultProxy`` (tests/support/faults.py), which breaks lazysnap's blob requests on
purpose while containers read files spread over several lazy layers and chunks.

What is shown: reads return the original bytes through 5xx, resets, stalls, ignored or wrong
ranges, short bodies, expired tokens and expired redirect URLs; when the registry stalls or is
gone, a read fails with EIO within ``read.timeout_seconds`` (and a log line says why) and the
daemon keeps serving, so the same reads succeed once the registry is back; retries are bounded
by ``fetch.max_retries`` and back off; a wrong answer is never served. Over a lossy link (a
connection reset inside 5%, 10% or 20% of all 64 KiB pieces of response body) a 48 MiB file reads
right, in full and at scattered offsets, fetching at most 1.5x the bytes a sound link needs:
cut responses are resumed, not started over.

The outage of ``test_registry_away_then_back`` lasts ``LZ_AWAY_SECONDS`` (default 10 s with
``CI=true``, else 30 s).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import ContainerdFactory, make_tmpdir, remove_tmpdir
from tests.support import faults
from tests.support.daemon import LazysnapDaemon, write_config
from tests.support.faults import FaultImage, FaultProxy, parse_sha256sum
from tests.support.lazy import wait_until
from tests.support.services import Containerd, Registry, require_privileges, run_container

SNAPSHOTTER = "lazysnap"
LAZYSNAP_UA = "lazysnap/"  # faults hit lazysnap's requests only, never containerd's own pull
AWAY_SECONDS = float(os.environ.get("LZ_AWAY_SECONDS", "10" if os.environ.get("CI") == "true" else "30"))
# Only what reads need is fetched (the rest of the image would hide what reads do), so that the
# reads make enough requests for every kind of fault to hit some.
QUIET = {
    "fetch": {"rest": "off"},
}
# Time a container or a host process needs around a read, beyond the daemon's bound.
MARGIN = 2.0


@pytest.fixture(scope="module")
def image(registry: Registry) -> FaultImage:
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    return faults.fault_image(registry.host)


@dataclass
class Stack:
    daemon: LazysnapDaemon
    cd: Containerd
    proxy: FaultProxy
    image: FaultImage

    @property
    def ref(self) -> str:
        return f"{self.proxy.host}/{self.image.ref}"

    def run(self, script: str, timeout: float = 120) -> tuple[int, str, str]:
        proc = run_container(
            self.cd, self.ref, "/bin/sh", "-c", script, snapshotter=SNAPSHOTTER, timeout=timeout
        )
        return proc.returncode, proc.stdout, proc.stderr

    def hashes(self, files: list[str]) -> dict[str, str]:
        """sha256 of ``files`` read in one container; fails the test if the container fails."""
        rc, out, err = self.run("/bin/busybox sha256sum " + " ".join(files))
        assert rc == 0, f"sha256sum failed ({rc}): {err}\n--- lazysnap log ---\n{self.daemon.log_tail(30)}"
        return parse_sha256sum(out)

    def timed_cat(self, path: str) -> tuple[int, float, str]:
        """cat ``path`` in a container, timed inside it: (exit status, seconds, stderr)."""
        rc, _, err = self.run(f"/bin/busybox time -f elapsed=%e /bin/busybox cat {path} >/dev/null")
        m = re.search(r"elapsed=([0-9.]+)", err)
        assert m, f"no timing in {err!r}"
        return rc, float(m.group(1)), err

    def host_path(self, path: str) -> Path:
        """``path`` inside the FUSE mount of its lazy layer, as the host sees it."""
        layer = next(i for i, files in enumerate(self.image.layers) if path in files)
        layers = self.daemon.stats()["layers"]
        assert isinstance(layers, dict)
        return Path(layers[self.image.layer_digests[layer]]["mountpoint"]) / path.lstrip("/")

    def layer_stats(self) -> list[dict[str, object]]:
        layers = self.daemon.stats()["layers"]
        assert isinstance(layers, dict)
        return list(layers.values())

    def log(self) -> str:
        return self.daemon.log_path.read_text(errors="replace")


StackFactory = Callable[..., Stack]


@pytest.fixture
def fault_stack(
    request: pytest.FixtureRequest, registry: Registry, containerd_factory: ContainerdFactory
) -> Iterator[StackFactory]:
    """``fault_stack(before_pull=f, image=..., seed=..., **config_sections)``: a FaultProxy in
    front of the registry, lazysnap with that config, a containerd using it, and the image (the
    ``image`` fixture's unless given) pulled lazily through the proxy (with whatever faults are
    configured on it by then)."""
    started: list[tuple[LazysnapDaemon, FaultProxy, Path, list[Containerd]]] = []

    def make(
        *,
        before_pull: Callable[[FaultProxy], None] | None = None,
        image: FaultImage | None = None,
        seed: int = 6,
        **sections: dict[str, object],
    ) -> Stack:
        if image is None:
            image = request.getfixturevalue("image")
            assert isinstance(image, FaultImage)
        workdir = make_tmpdir()
        proxy = FaultProxy(registry.host, seed=seed, target_user_agent=LAZYSNAP_UA).start()
        merged = {key: {**QUIET.get(key, {}), **sections.get(key, {})} for key in {*QUIET, *sections}}
        daemon = LazysnapDaemon(workdir, config=write_config(workdir / "config.toml", merged))
        containerds: list[Containerd] = []
        started.append((daemon, proxy, workdir, containerds))
        daemon.start()
        cd = containerd_factory(proxy_plugins={SNAPSHOTTER: str(daemon.address)})
        containerds.append(cd)
        stack = Stack(daemon, cd, proxy, image)
        if before_pull is not None:
            before_pull(proxy)
        cd.rpull(stack.ref)
        assert daemon.stats()["lazy_mounts"] == len(image.layers), daemon.log_tail()
        return stack

    yield make
    for daemon, proxy, workdir, containerds in reversed(started):
        try:
            for cd in containerds:  # containerd first, as lazy_stack does; containerd_factory checks
                cd.stop()
            daemon.stop()
        finally:
            proxy.stop()
            remove_tmpdir(workdir)


def expected(image: FaultImage, files: list[str]) -> dict[str, str]:
    return {f: image.sha256[f] for f in files}


def host_read(path: Path) -> tuple[int, float]:
    """Read a file from the host: (errno, 0 if the read succeeded; seconds it took)."""
    t0 = time.monotonic()
    try:
        path.read_bytes()
    except OSError as exc:
        return exc.errno or -1, time.monotonic() - t0
    return 0, time.monotonic() - t0


def test_reads_under_ten_percent_faults_return_the_original_bytes(
    fault_stack: StackFactory, image: FaultImage
) -> None:
    started = time.monotonic()
    # 10% of lazysnap's blob requests fail, one in each window of ten, every kind in turn; they
    # start with the mount (footer and TOC fetches). Redirects come in phase 2.
    stack = fault_stack(
        before_pull=lambda p: p.mix(0.10), fetch={"timeout_seconds": 2.0}, read={"timeout_seconds": 60.0}
    )
    l1, l2, l3 = (list(files) for files in image.layers[1:])
    # Phase 1: the registry serves blobs itself. 401s are expired tokens. Files are read in a
    # fixed shuffled order: read in blob order, the kernel's readahead of a data blob (EROFS
    # backend) would bring a file's neighbours along and leave too few requests for every kind.
    phase1 = [f for f in l1 + l2 if "/s" in f] + [l1[-1]]
    random.Random(1).shuffle(phase1)
    assert stack.hashes(phase1) == expected(image, phase1)
    faulted1 = stack.proxy.counts()["faults"]
    # Phase 2: blob GETs are redirected to presigned-like URLs on the proxy (lazysnap re-resolves
    # its cached registry URL when it gets a redirect); 403s there are expired URLs.
    stack.proxy.redirect = True
    phase2 = [l2[-1], *l3]
    random.Random(2).shuffle(phase2)
    assert stack.hashes(phase2) == expected(image, phase2)
    counts = stack.proxy.counts()
    faulted = counts["faults"]
    faulted2 = {k: n - faulted1.get(k, 0) for k, n in faulted.items() if n > faulted1.get(k, 0)}
    print(f"proxy: {counts}; phase 1 faults {faulted1}; phase 2 faults {faulted2}")

    # Every kind came up, and in the right setting, while ~10% of eligible requests failed.
    assert set(faulted1) == set(faults.TRANSPORT_KINDS) - {faults.FORBIDDEN}, faulted1
    assert set(faulted2) >= set(faults.TRANSPORT_KINDS) - {faults.UNAUTHORIZED}, faulted2
    total = sum(faulted.values())
    assert counts["eligible"] // 10 <= total <= counts["eligible"] // 10 + 1, counts
    assert counts["redirects"] > 0 and counts["tokens"] > 0

    # Each fault the client cannot use is retried, with a log line: all but 401 (answered by a new
    # token at once), 403 (by re-resolving the URL at once) and a 200 for the whole blob (used).
    retried = total - sum(
        faulted.get(k, 0) for k in (faults.UNAUTHORIZED, faults.FORBIDDEN, faults.IGNORE_RANGE)
    )
    # (A wrong range answering a multi-range request is not retried: the server is taken for one
    # that cannot do multi-range, and the ranges are asked again one by one.)
    log = stack.log()
    assert log.count("retrying request") + log.count("server range support downgraded") >= retried
    layers = stack.layer_stats()
    assert all(layer["read_errors"] == 0 and layer["verify_failures"] == 0 for layer in layers), layers
    # What reads needed: on demand, or ahead of a file read front to back (readahead).
    on_demand = sum(layer["bytes"]["on_demand"] + layer["bytes"]["readahead"] for layer in layers)  # type: ignore[index]
    needed = sum(image.chunk_extents(phase1 + phase2).values())
    # Every chunk read was fetched on demand (nothing at mount: no prefetch, no background).
    assert on_demand >= needed, (on_demand, needed)
    assert all(layer["bytes"]["prefetch"] == layer["bytes"]["background"] == 0 for layer in layers)  # type: ignore[index]
    print(f"on-demand {on_demand} B for {needed} B of chunks read; {time.monotonic() - started:.1f}s")


def test_stalled_registry_read_fails_with_eio_within_the_read_timeout(fault_stack: StackFactory) -> None:
    read_timeout = 3.0
    stack = fault_stack(
        fetch={"timeout_seconds": 2.0, "max_retries": 2}, read={"timeout_seconds": read_timeout}
    )
    image = stack.image
    assert stack.hashes([image.layers[1][0]]) == expected(image, [image.layers[1][0]])  # busybox cached
    stack.proxy.fail_all(faults.STALL)

    target = image.layers[2][5]
    rc, elapsed, err = stack.timed_cat(target)
    assert rc != 0 and "Input/output error" in err, err
    assert elapsed <= read_timeout + MARGIN, f"read failed after {elapsed}s, bound {read_timeout}s"

    # The same from the host, through the layer's FUSE mount: EIO, within the bound.
    err_no, host_elapsed = host_read(stack.host_path(image.layers[3][7]))
    assert err_no == errno.EIO
    assert host_elapsed <= read_timeout + MARGIN, f"read failed after {host_elapsed}s"
    print(f"stalled reads: EIO after {elapsed:.2f}s (container), {host_elapsed:.2f}s (host)")

    log = stack.log()
    assert f"no byte arrived for {read_timeout}s" in log, stack.daemon.log_tail(20)
    assert stack.proxy.counts()["faults"][faults.STALL] >= 1

    # The registry answers again: the daemon, never restarted, serves the same files.
    stack.proxy.clear()
    stack.proxy.release_stalls()
    both = [target, image.layers[3][7]]
    assert wait_until(lambda: stack.run("/bin/busybox cat " + " ".join(both) + " >/dev/null")[0] == 0, 30)
    assert stack.hashes(both) == expected(image, both)
    assert stack.daemon.proc is not None and stack.daemon.proc.poll() is None


def test_registry_away_then_back(fault_stack: StackFactory) -> None:
    read_timeout = 5.0
    stack = fault_stack(
        fetch={"timeout_seconds": 2.0, "max_retries": 3}, read={"timeout_seconds": read_timeout}
    )
    image = stack.image
    assert stack.hashes([image.layers[1][0]]) == expected(image, [image.layers[1][0]])  # busybox cached
    files = [image.layers[1][10], image.layers[2][10], image.layers[3][10]]

    host_file = stack.host_path(files[1])
    gone = time.monotonic()
    stack.proxy.away(AWAY_SECONDS)
    with ThreadPoolExecutor(2) as pool:  # one in a container, one from the host, at once
        in_container = pool.submit(stack.timed_cat, files[0])
        on_host = pool.submit(host_read, host_file)
        rc, elapsed, err = in_container.result()
        err_no, host_elapsed = on_host.result()
    assert stack.proxy.is_away, "the reads above must have ended during the outage"
    assert rc != 0 and "Input/output error" in err, err
    assert elapsed <= read_timeout + MARGIN, f"read failed after {elapsed}s"
    assert err_no == errno.EIO and host_elapsed <= read_timeout + MARGIN, (err_no, host_elapsed)
    print(f"during the outage: EIO after {elapsed:.2f}s (container), {host_elapsed:.2f}s (host)")
    assert "cannot connect" in stack.log()

    assert wait_until(lambda: not stack.proxy.is_away, AWAY_SECONDS + 10)
    back = time.monotonic()
    assert back - gone >= AWAY_SECONDS - 0.5
    # Same files, same daemon, same mounts: the reads now succeed.
    assert stack.hashes(files) == expected(image, files)
    print(f"away {AWAY_SECONDS}s; reads succeeded {time.monotonic() - back:.1f}s after it came back")


def fetch_series(events: list[faults.ProxyEvent], min_delay: float) -> list[list[float]]:
    """Arrival times of one range's requests, split into fetches: a retry waits at least the base
    delay, while a new fetch follows the failure of the previous one at once."""
    series: list[list[float]] = []
    for e in events:
        if series and e.t - series[-1][-1] >= min_delay * 0.5:
            series[-1].append(e.t)
        else:
            series.append([e.t])
    return series


def test_retries_are_bounded_and_back_off(fault_stack: StackFactory) -> None:
    max_retries, base_delay = 4, 0.1  # base_delay: RegistryClient's retry_base_delay default
    stack = fault_stack(
        fetch={"timeout_seconds": 2.0, "max_retries": max_retries}, read={"timeout_seconds": 20.0}
    )
    image = stack.image
    assert stack.hashes([image.layers[1][0]]) == expected(image, [image.layers[1][0]])  # busybox cached
    stack.proxy.codes_5xx = (503,)
    stack.proxy.fail_all(faults.HTTP_5XX)
    stack.proxy.reset_counts()
    log_before = len(stack.log())
    counters_before = stack.daemon.stats()["registry"]

    # One small file: one chunk, one range request per fetch.
    err_no, elapsed = host_read(stack.host_path(image.layers[2][20]))
    assert err_no == errno.EIO

    events = stack.proxy.faulted()
    assert events and {e.status for e in events} == {503} and len({e.range for e in events}) == 1
    gave_up = stack.log()[log_before:].count("fetch failed")
    series = fetch_series(events, base_delay)
    print(f"EIO after {elapsed:.2f}s; {len(events)} requests in fetches of {[len(s) for s in series]}")
    # One fetch per FUSE read that reached the registry (the kernel retries a failed read once).
    assert len(series) == gave_up >= 1
    for times in series:
        assert len(times) == 1 + max_retries, series
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for n, gap in enumerate(gaps, 1):  # delay n is base * 2^(n-1) * (1 + jitter in [0, 1))
            assert gap >= base_delay * 2 ** (n - 1) * 0.95, gaps
        assert all(b > a - 0.02 for a, b in itertools.pairwise(gaps)), f"gaps shrink: {gaps}"
        assert gaps[-1] >= 2 * gaps[0], gaps
    assert "HTTP 503; gave up after 5 attempts" in stack.log()
    # The registry metrics count what the proxy saw: every attempt, the retries, the give-ups.
    counters = stack.daemon.stats()["registry"]
    assert counters["requests"] - counters_before["requests"] == len(events)
    assert counters["retries"] - counters_before["retries"] == len(series) * max_retries
    assert counters["failures"] - counters_before["failures"] == len(series)


def test_wrong_ranges_are_retried_or_eio_and_a_whole_blob_is_sliced(fault_stack: StackFactory) -> None:
    """Precisely: a 206 for other bytes than asked (its Content-Range says so) is retried, so the
    read returns the right bytes if a later attempt is right, and EIO if none is; a 206 that lies
    about its range fails chunk verification: EIO, not retried, not cached; a 200 with the whole
    blob is sliced and the right bytes are served (and the server is marked as ignoring Range)."""
    max_retries = 3
    stack = fault_stack(
        fetch={"timeout_seconds": 2.0, "max_retries": max_retries}, read={"timeout_seconds": 20.0}
    )
    image, proxy = stack.image, stack.proxy
    l1, l2, l3 = (list(files) for files in image.layers[1:])
    assert stack.hashes([l1[0]]) == expected(image, [l1[0]])  # busybox cached
    # Files far from l1[0] in the layer: the kernel may have read l1[0]'s neighbours ahead.
    first = 50

    # Every answer has the wrong range: retried, then EIO; nothing is served.
    proxy.fail_all(faults.WRONG_RANGE)
    rc, out, err = stack.run(f"/bin/busybox sha256sum {l1[first]}")
    assert rc != 0 and "Input/output error" in err and parse_sha256sum(out) == {}, (out, err)
    wrong = proxy.counts()["faults"][faults.WRONG_RANGE]
    assert wrong >= 1 + max_retries and wrong % (1 + max_retries) == 0, wrong
    assert re.search(r"asked for \[\d+, \d+\), got \[\d+, \d+\); gave up after 4 attempts", stack.log())

    # Every other answer has the wrong range: the retries get the right bytes.
    proxy.configure({faults.WRONG_RANGE: 0.5})
    files = l1[first : first + 11]
    assert stack.hashes(files) == expected(image, files)
    assert proxy.counts()["faults"][faults.WRONG_RANGE] > wrong

    # A server that lies (right Content-Range, wrong bytes): the chunk digest catches it.
    proxy.fail_all(faults.MISLABELED)
    rc, out, err = stack.run(f"/bin/busybox sha256sum {l2[0]}")
    assert rc != 0 and "Input/output error" in err and parse_sha256sum(out) == {}, (out, err)
    assert sum(layer["verify_failures"] for layer in stack.layer_stats()) >= 1  # type: ignore[misc]
    assert "chunk failed verification" in stack.log()
    proxy.clear()
    assert stack.hashes([l2[0]]) == expected(image, [l2[0]])  # the bad bytes were not cached

    # Range ignored: 200 with the whole blob, sliced (small files, and a file of several chunks).
    proxy.fail_all(faults.IGNORE_RANGE)
    before = proxy.counts()["faults"].get(faults.IGNORE_RANGE, 0)
    files = [*l3[:5], l3[-1]]
    assert stack.hashes(files) == expected(image, files)
    counts = proxy.counts()
    assert counts["faults"][faults.IGNORE_RANGE] > before
    assert re.search(r"server range support downgraded.*mode=none", stack.log())
    print(f"proxy: {counts}")


# -- a lossy link ---------------------------------------------------------------------------------

LOSS_RATES = (0.05, 0.10, 0.20)
# 64 KiB read at each of 16 offsets spread over the file (4 KiB blocks), before the full read.
_SEGMENT = faults.LOSSY_SIZE // 16
SCATTERED_BLOCKS = [(i * _SEGMENT + (i * 7919 << 12) % (_SEGMENT // 2)) >> 12 for i in range(16)]
SCATTERED_COUNT = 16  # blocks per read
# Registry bytes (body bytes through the proxy) of the same reads over a sound link, once per module.
_sound_link_bytes: list[int] = []


@pytest.fixture(scope="module")
def lossy_image(registry: Registry) -> FaultImage:
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    return faults.lossy_image(registry.host)


def read_big_file(stack: Stack) -> int:
    """In one container, read ``LOSSY_FILE`` at the scattered offsets and then in full, check
    every byte (by sha256), and return the blob bytes the proxy served for the whole run."""
    path = faults.LOSSY_FILE
    reads = "; ".join(
        f"/bin/busybox dd if={path} bs=4096 skip={b} count={SCATTERED_COUNT} | /bin/busybox sha256sum"
        for b in SCATTERED_BLOCKS
    )
    rc, out, err = stack.run(f"set -eo pipefail; {reads}; /bin/busybox sha256sum {path}", timeout=600)
    log_tail = stack.daemon.log_tail(30)
    assert rc == 0 and "error" not in err.lower(), f"rc={rc}: {err[-2000:]}\n--- lazysnap log ---\n{log_tail}"
    content = faults.lossy_content()
    want = [
        hashlib.sha256(content[b << 12 : (b + SCATTERED_COUNT) << 12]).hexdigest() for b in SCATTERED_BLOCKS
    ] + [stack.image.sha256[path]]
    assert [line.split()[0] for line in out.splitlines()] == want
    layers = stack.layer_stats()
    assert all(layer["read_errors"] == 0 and layer["verify_failures"] == 0 for layer in layers), layers
    served = stack.proxy.counts()["blob_bytes_served"]
    assert isinstance(served, int)
    return served


@pytest.mark.parametrize("loss", LOSS_RATES, ids=[f"{round(p * 100)}pct" for p in LOSS_RATES])
def test_a_lossy_link_reads_every_byte_without_refetching(
    fault_stack: StackFactory, lossy_image: FaultImage, loss: float
) -> None:
    """The proxy resets the connection inside a random part of ``loss`` of all 64 KiB pieces of
    response body (from the mount on). Reads get every byte right, no EIO, and the registry
    serves at most 1.5x the bytes a sound link needs: cut responses are resumed."""
    if not _sound_link_bytes:
        _sound_link_bytes.append(read_big_file(fault_stack(image=lossy_image)))
    seed = int(os.environ.get("LZ_LOSS_SEED", "0")) + round(loss * 100)
    started = time.monotonic()
    stack = fault_stack(image=lossy_image, seed=seed, before_pull=lambda proxy: proxy.lossy(loss))
    served = read_big_file(stack)
    counts = stack.proxy.counts()
    registry = stack.daemon.stats()["registry"]
    assert isinstance(registry, dict)
    ratio = served / _sound_link_bytes[0]
    print(
        f"loss {loss:.0%} seed {seed}: {served} B served, {ratio:.3f}x a sound link's "
        f"{_sound_link_bytes[0]} B; {counts['piece_resets']} resets, {registry['resumed']} resumed requests "
        f"saved {registry['resumed_bytes']} B; {time.monotonic() - started:.1f}s"
    )
    assert counts["piece_resets"] > 0 and registry["resumed"] > 0
    assert ratio <= 1.5
