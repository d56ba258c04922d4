"""Twenty containers started at once from one lazily pulled image: every container reads the same
files and gets the right bytes, and each chunk is fetched from the registry once, not once per
container (counted at a loopback proxy and in the daemon's stats)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import faults
from tests.support.daemon import SNAPSHOTTER, TEST_BACKEND, LazysnapDaemon
from tests.support.faults import FaultImage, parse_sha256sum
from tests.support.proxy import CountingProxy
from tests.support.services import Containerd, Registry, require_privileges, run_container

CONTAINERS = 20


@pytest.fixture(scope="module")
def image(registry: Registry) -> FaultImage:
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    return faults.fault_image(registry.host)


def test_twenty_containers_read_the_same_files_and_each_chunk_is_fetched_once(
    image: FaultImage, proxy: CountingProxy, lazy_stack: tuple[LazysnapDaemon, Containerd]
) -> None:
    daemon, cd = lazy_stack  # no prefetch, no background fetch: only what containers read is fetched
    ref = f"{proxy.host}/{image.ref}"
    cd.rpull(ref)
    assert daemon.stats()["lazy_mounts"] == len(image.layers)
    pulled = proxy.reset()  # manifest, config, and each layer's footer + TOC

    l1, l2, l3 = (list(files) for files in image.layers[1:])
    # 60 small files of two layers and two files of several chunks: 72 chunks in three layers.
    files = [*l1[:30], l1[-1], *l2[:30], l3[-1]]
    want = {f: image.sha256[f] for f in files}
    script = "/bin/busybox sha256sum " + " ".join(files)

    barrier = threading.Barrier(CONTAINERS)

    def one(_: int) -> tuple[int, str, str, float]:
        barrier.wait()
        t0 = time.monotonic()
        proc = run_container(cd, ref, "/bin/sh", "-c", script, snapshotter=SNAPSHOTTER, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0

    started = time.monotonic()
    with ThreadPoolExecutor(CONTAINERS) as pool:
        results = list(pool.map(one, range(CONTAINERS)))
    wall = time.monotonic() - started
    for rc, out, err, _ in results:
        assert rc == 0, f"container failed ({rc}): {err}\n{daemon.log_tail(20)}"
        assert parse_sha256sum(out) == want
    fetched = proxy.reset()

    # What must be fetched: the streams of the files read, plus at most all of busybox (the
    # kernel maps only the pages it executes), plus what the kernel reads ahead of them (the EROFS
    # backend reads a data blob ahead, across file boundaries). Each once, whatever the number
    # of containers.
    needed = image.chunk_extents(files)
    busybox = image.chunk_extents(["/bin/busybox"])
    low, high = sum(needed.values()), sum(needed.values()) + sum(busybox.values())
    layers = daemon.stats()["layers"]
    assert isinstance(layers, dict)
    # Bytes the daemon fetched for these reads: on demand, and ahead of the multi-chunk file read
    # front to back (readahead); no startup set, no rest of the image in this stack.
    on_demand = sum(sum(layer["bytes"].values()) for layer in layers.values())
    chunks = sum(layer["chunks_fetched"] for layer in layers.values())
    requests = sum(sum(layer["requests"].values()) for layer in layers.values())
    print(
        f"{CONTAINERS} containers in {wall:.1f}s (each {min(r[3] for r in results):.1f}-"
        f"{max(r[3] for r in results):.1f}s); rpull fetched {pulled} B; reads fetched {fetched} B at "
        f"the proxy, {on_demand} B / {chunks} chunks / {requests} requests by the daemon's count; "
        f"chunks read: {len(needed)} ({low} B) + busybox up to {len(busybox)} ({high - low} B)"
    )
    refetched = sum(layer["chunk_refetches"] for layer in layers.values())
    assert refetched == 0 and chunks >= len(needed), (refetched, chunks, len(needed))
    if TEST_BACKEND == "fuse":  # reads only what is read: the exact bound
        assert chunks <= len(needed) + len(busybox), (chunks, len(needed), len(busybox))
        assert on_demand <= high, (low, on_demand, high)
    assert low <= on_demand <= sum(image.blob_sizes.values()), (low, on_demand)
    # The registry served those bytes once (+ HTTP headers), not once per container.
    assert low <= fetched <= on_demand + 1024 * requests + (64 << 10), (low, fetched, on_demand)
    assert all(layer["read_errors"] == 0 for layer in layers.values())
