"""A cache smaller than the images must not become a re-fetch loop (issue 15).

The image: busybox and a 48 MiB incompressible file in 512 KiB eStargz chunks (49 MiB in all,
the size the issue measured). The daemon runs with the defaults (the rest of an image fetched
eagerly) and a chunk cache of a sixth of the image; a container reads half of the big file.
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from tests.e2e.conftest import LazysnapStack
from tests.support import faults
from tests.support.daemon import SNAPSHOTTER
from tests.support.lazy import wait_until
from tests.support.proxy import CountingProxy
from tests.support.services import Registry, require_privileges, run_in_container

READ_MIB = 24  # of the 48 MiB file, as the container read 23 MiB of 49
SCRIPT = (
    f"/bin/busybox dd if={faults.LOSSY_FILE} bs=1048576 count={READ_MIB} 2>/dev/null | /bin/busybox sha256sum"
)
# Seconds to watch the registry after the container ran: the 30 s, in CI too.
AFTER_RUN_SECONDS = float(os.environ.get("LZ_AFTER_RUN_SECONDS", "30"))


@pytest.fixture(scope="module")
def image(registry: Registry) -> faults.FaultImage:
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    return faults.lossy_image(registry.host)


@pytest.mark.parametrize("limited", [True, False], ids=["cache-one-sixth", "no-limit"])
def test_a_cache_smaller_than_the_image_never_becomes_a_refetch_loop(
    image: faults.FaultImage, proxy: CountingProxy, lazysnap_stack: LazysnapStack, limited: bool
) -> None:
    """The container reads correct bytes, the cache stays under its limit, and the registry serves
    at most the image plus what the container read, during the run and after it: fetching ahead
    stops where what it brings could not stay, instead of fetching, evicting and fetching again.
    Without a limit the whole image arrives in the background, each byte once."""
    total = sum(image.blob_sizes.values())
    limit = total // 6
    daemon, cd = lazysnap_stack(cache={"max_bytes": limit if limited else 10 << 30})
    ref = f"{proxy.host}/{image.ref}"
    cd.rpull(ref)
    out = run_in_container(cd, ref, "/bin/sh", "-c", SCRIPT, snapshotter=SNAPSHOTTER)
    want = hashlib.sha256(faults.lossy_content()[: READ_MIB << 20]).hexdigest()
    assert out.split()[0] == want
    read = READ_MIB << 20
    if limited:
        time.sleep(AFTER_RUN_SECONDS)  # watching for fetches that must not happen: nothing to wait for
        fetched = proxy.reset()  # from before the pull: manifest, TOCs, everything
        stats = daemon.stats()
        cache, layers = stats["cache"], stats["layers"]
        assert isinstance(cache, dict) and isinstance(layers, dict)
        print(f"image {total} B, read {read} B, fetched {fetched} B, cache {cache}")
        for digest, layer in layers.items():
            print(digest[:19], layer["bytes"], layer["chunks_fetched"], layer["chunk_refetches"])
        assert cache["bytes"] <= limit
        assert fetched <= total + read, (fetched, total, read)
        assert any(layer["rest_stopped"] for layer in layers.values())
        assert "does not fit the cache" in daemon.log_tail(1000)

    else:
        assert wait_until(
            lambda: all(layer["background_done"] for layer in daemon.stats()["layers"].values()),  # type: ignore[union-attr]
            timeout=120,
        )
        fetched = proxy.reset()
        # Each byte about once: plus manifests, headers, and the chunk that straddles the start
        # of each layer's tail (fetched with the TOC at mount, and again whole).
        assert total <= fetched <= total + (1 << 20), (fetched, total)
