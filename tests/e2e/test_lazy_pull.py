"""Lazy pull end to end: images converted by the real ctr-remote, pulled with `ctr-remote image
rpull --snapshotter lazysnap` through real containerd, served by lazysnap's FUSE layers.

The registry sits behind a byte-counting proxy on loopback, so the test sees what was downloaded.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.digest import file_stem
from tests.e2e.conftest import LazysnapStack
from tests.support import oci
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon
from tests.support.lazy import wait_until
from tests.support.mounts import lazy_layer_mounts
from tests.support.proxy import CountingProxy
from tests.support.scratch import tmpdir
from tests.support.services import (
    Containerd,
    Registry,
    require_privileges,
    run_args,
    run_container,
    run_in_container,
    unique_id,
    verify_container_fs,
)

LARGE_SIZE = 16 << 20
# What `cat /data/hello.txt /etc/motd` reads at startup, as `ctr-remote image optimize` records it.
PRIORITIZED = ["bin/busybox", "data/hello.txt", "etc/motd"]


@dataclass(frozen=True)
class LazyImages:
    gzip: str  # repo:tag paths, without host (the test adds the proxy's host)
    estargz: str
    zstdchunked: str
    estargz_prefetch: str
    expected: dict[str, oci.Node]
    large: bytes
    total_size: dict[str, int]  # compressed bytes of all layers, per variant


def image_size(cd: Containerd, ref: str) -> int:
    """Sum of the layer sizes of ``ref`` (linux/amd64 manifest) in containerd's content store."""
    raw = cd.ctr("content", "get", _manifest_digest(cd, ref)).stdout
    return sum(layer["size"] for layer in json.loads(raw)["layers"])


def _manifest_digest(cd: Containerd, ref: str) -> str:
    for line in cd.ctr("image", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == ref:
            return next(f for f in fields if f.startswith("sha256:"))
    raise AssertionError(f"{ref} not in ctr image ls")


@pytest.fixture(scope="module")
def lazy_images(registry: Registry) -> Iterator[LazyImages]:
    """The standard image plus a 16 MiB file, as gzip, and converted by ctr-remote to eStargz,
    zstd:chunked, and eStargz with prioritized files (a record file, as `optimize` writes)."""
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    with tmpdir() as workdir, Containerd(workdir / "cd") as cd:
        spec = oci.test_image_layers()
        large = oci.pseudo_random(LARGE_SIZE, b"lazysnap-large")  # incompressible
        layers = (*spec.layers, (oci.Dir("/data"), oci.File("/data/large.bin", large)))
        image = oci.build_layout(workdir / "layout", layers, tag="gzip", cmd=list(spec.cmd))
        host = registry.host
        gzip_ref = oci.push(image.layout_dir, "gzip", host, "lztest/lazy")
        cd.pull(gzip_ref)
        record = workdir / "record.json"
        record.write_text("".join(json.dumps({"path": p}) + "\n" for p in PRIORITIZED))
        variants = {
            "estargz": ["--estargz"],
            "zstdchunked": ["--zstdchunked"],
            "estargz-prefetch": ["--estargz", "--estargz-record-in", str(record)],
        }
        sizes = {"gzip": image_size(cd, gzip_ref)}
        for tag, flags in variants.items():
            target = f"{host}/lztest/lazy:{tag}"
            cd.ctr("image", "convert", "--oci", *flags, gzip_ref, target, binary="ctr-remote", timeout=300)
            cd.ctr("image", "push", "--plain-http", target, timeout=300)
            sizes[tag] = image_size(cd, target)
        yield LazyImages(
            gzip="lztest/lazy:gzip",
            estargz="lztest/lazy:estargz",
            zstdchunked="lztest/lazy:zstdchunked",
            estargz_prefetch="lztest/lazy:estargz-prefetch",
            expected=oci.apply_layers(layers),
            large=large,
            total_size=sizes,
        )


@pytest.mark.parametrize("variant", ["estargz", "zstdchunked"])
def test_rpull_is_lazy_and_the_container_reads_right_bytes(
    lazy_images: LazyImages, proxy: CountingProxy, lazy_stack: tuple[LazysnapDaemon, Containerd], variant: str
) -> None:
    daemon, cd = lazy_stack
    ref = f"{proxy.host}/{getattr(lazy_images, variant)}"
    cd.rpull(ref)
    pulled = proxy.reset()
    st = daemon.stats()
    assert st["lazy_mounts"] == 4, st
    assert len(lazy_layer_mounts(daemon.root)) == 4
    total = lazy_images.total_size[variant]
    # Manifests, configs, footers and TOCs only: a few percent of the image.
    assert pulled < total * 0.05, f"rpull downloaded {pulled} of {total} bytes"

    # Read 1 MiB from the middle of the 16 MiB file inside a container.
    offset_blocks, count = 100, 16  # 64 KiB blocks
    script = f"/bin/busybox dd if=/data/large.bin bs=65536 skip={offset_blocks} count={count} 2>/dev/null"
    out = run_in_container(
        cd, ref, "/bin/sh", "-c", script + " | /bin/busybox sha256sum", snapshotter=SNAPSHOTTER
    )
    piece = lazy_images.large[offset_blocks * 65536 : (offset_blocks + count) * 65536]
    assert out.split()[0] == hashlib.sha256(piece).hexdigest()
    read_cost = proxy.reset()
    # The 4 MiB chunk holding the range, one 4 MiB chunk of readahead, and busybox (~1 MB).
    assert read_cost < 2 * (4 << 20) + (2 << 20), f"reading 1 MiB fetched {read_cost} bytes"
    print(f"{variant}: image {total} B, rpull fetched {pulled} B, reading 1 MiB fetched {read_cost} B")

    # The whole tree, as overlayfs would show the same image pulled normally.
    assert verify_container_fs(cd, ref, lazy_images.expected, snapshotter=SNAPSHOTTER) == []
    layers = daemon.stats()["layers"]
    assert isinstance(layers, dict) and all(layer["verify_failures"] == 0 for layer in layers.values())


def test_gzip_image_falls_back_to_a_normal_pull(
    lazy_images: LazyImages, proxy: CountingProxy, lazy_stack: tuple[LazysnapDaemon, Containerd]
) -> None:
    daemon, cd = lazy_stack
    ref = f"{proxy.host}/{lazy_images.gzip}"
    cd.rpull(ref)
    st = daemon.stats()
    assert st["lazy_mounts"] == 0 and st["not_lazy"] == {"no-toc-digest": 4}, st
    assert proxy.reset() >= lazy_images.total_size["gzip"]  # containerd downloaded every layer
    assert lazy_layer_mounts(daemon.root) == []
    assert verify_container_fs(cd, ref, lazy_images.expected, snapshotter=SNAPSHOTTER) == []


def test_prefetch_caches_prioritized_files_before_the_container_starts(
    lazy_images: LazyImages, proxy: CountingProxy, lazy_stack: tuple[LazysnapDaemon, Containerd]
) -> None:
    daemon, cd = lazy_stack
    ref = f"{proxy.host}/{lazy_images.estargz_prefetch}"
    cd.rpull(ref)
    layers = daemon.stats()["layers"]
    assert isinstance(layers, dict) and len(layers) == 4
    prefetching = [d for d, layer in layers.items() if layer["prefetch_files"] > 0]
    assert prefetching, "ctr-remote wrote no .prefetch.landmark"
    assert wait_until(lambda: all(daemon.stats()["layers"][d]["prefetch_done"] for d in prefetching))  # type: ignore[index]
    layers = daemon.stats()["layers"]
    assert isinstance(layers, dict)
    before = {d: layer["bytes"]["on_demand"] for d, layer in layers.items()}
    out = run_in_container(cd, ref, "/bin/cat", "/data/hello.txt", "/etc/motd", snapshotter=SNAPSHOTTER)
    assert out == "hello from layer 2\nmotd from layer 2\n"
    after = daemon.stats()["layers"]
    assert isinstance(after, dict)
    for digest in prefetching:
        assert after[digest]["bytes"]["prefetch"] > 0
    # Everything the container read came from the prefetched bytes: nothing fetched on demand.
    assert (
        {d: layer["bytes"]["on_demand"] for d, layer in after.items()} == before == dict.fromkeys(before, 0)
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_restart_mounts_lazy_layers_again_and_reuses_the_cache(
    lazy_images: LazyImages, proxy: CountingProxy, lazy_stack: tuple[LazysnapDaemon, Containerd], sig: int
) -> None:
    daemon, cd = lazy_stack
    ref = f"{proxy.host}/{lazy_images.estargz}"
    cd.rpull(ref)
    script = "/bin/busybox sha256sum /data/big.bin /data/hello.txt"
    first = run_in_container(cd, ref, "/bin/sh", "-c", script, snapshotter=SNAPSHOTTER)
    targets = sorted(lazy_layer_mounts(daemon.root))
    assert len(targets) == 4

    daemon.stop(sig)
    if sig == signal.SIGTERM:
        assert lazy_layer_mounts(daemon.root) == []  # a clean stop unmounts what it served
    proxy.stop()  # the registry is gone while the daemon restarts
    daemon.start()  # mounts every lazy layer again, from its stored TOCs, before it serves
    assert sorted(lazy_layer_mounts(daemon.root)) == targets
    assert daemon.stats()["lazy_mounts"] == 4
    assert wait_until(
        lambda: cd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", check=False).returncode == 0
    )
    # What the first container read comes from the chunk cache: no registry needed.
    assert run_in_container(cd, ref, "/bin/sh", "-c", script, snapshotter=SNAPSHOTTER) == first


LARGE_SHA256 = "/bin/busybox sha256sum /data/large.bin"


@pytest.mark.erofs_only
def test_a_complete_layer_is_kept_as_a_local_blob_and_later_mounts_need_no_fetching(
    lazy_images: LazyImages, proxy: CountingProxy, lazysnap_stack: LazysnapStack
) -> None:
    """Once the background fetch has every chunk of a layer, its data blob is written as a local
    file: mounts after a restart read it through the kernel alone, with the registry gone."""
    daemon, cd = lazysnap_stack()
    ref = f"{proxy.host}/{lazy_images.estargz}"
    cd.rpull(ref)
    digests = set(daemon.stats()["layers"])  # type: ignore[arg-type]
    assert len(digests) == 4
    blobs = [daemon.root / "layers" / f"{file_stem(d)}.blob" for d in digests]
    assert wait_until(lambda: all(b.exists() for b in blobs), timeout=120), daemon.stats()
    local_bytes = daemon.stats()["cache"]["local_blob_bytes"]  # type: ignore[index]
    assert local_bytes >= LARGE_SIZE  # the 16 MiB file is in one of them

    daemon.stop(signal.SIGTERM)
    proxy.stop()
    daemon.start()  # mounts the layers again: over their local blobs now
    layers = daemon.stats()["layers"]
    assert isinstance(layers, dict) and set(layers) == digests
    assert all(layer["local_blob"] and layer["background_done"] for layer in layers.values()), layers
    assert wait_until(  # containerd dials the restarted daemon again
        lambda: cd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", check=False).returncode == 0
    )
    out = run_in_container(cd, ref, "/bin/sh", "-c", LARGE_SHA256, snapshotter=SNAPSHOTTER)
    assert out.split()[0] == hashlib.sha256(lazy_images.large).hexdigest()
    assert verify_container_fs(cd, ref, lazy_images.expected, snapshotter=SNAPSHOTTER) == []
    after = daemon.stats()
    assert after["blobs"]["reads"] == 0, after["blobs"]  # type: ignore[index]
    assert all(layer["bytes"]["on_demand"] == 0 for layer in after["layers"].values())  # type: ignore[union-attr]


def test_cache_stays_under_its_limit_while_reads_stay_correct(
    lazy_images: LazyImages, proxy: CountingProxy, lazysnap_stack: LazysnapStack
) -> None:
    limit = 6 << 20  # well under the 16 MiB file the container reads, twice
    daemon, cd = lazysnap_stack(cache={"max_bytes": limit}, fetch={"rest": "off"})
    ref = f"{proxy.host}/{lazy_images.estargz}"
    cd.rpull(ref)
    want = hashlib.sha256(lazy_images.large).hexdigest()
    for _ in range(2):
        out = run_in_container(cd, ref, "/bin/sh", "-c", LARGE_SHA256, snapshotter=SNAPSHOTTER)
        assert out.split()[0] == want
        cache = daemon.stats()["cache"]
        assert isinstance(cache, dict) and cache["bytes"] <= limit * 1.05 and cache["evictions"] > 0


def mount_tiny_cache(workdir: Path) -> None:
    """A 1 MiB tmpfs where the daemon keeps its chunk cache (unmounted with its directory)."""
    cache_dir = workdir / "root" / "cache"
    cache_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "lztiny", str(cache_dir)], check=True)


def test_full_disk_under_the_cache_degrades_to_uncached_reads(
    lazy_images: LazyImages, proxy: CountingProxy, lazysnap_stack: LazysnapStack
) -> None:
    daemon, cd = lazysnap_stack(prepare=mount_tiny_cache, fetch={"rest": "off"})
    ref = f"{proxy.host}/{lazy_images.estargz}"
    cd.rpull(ref)
    out = run_in_container(cd, ref, "/bin/sh", "-c", LARGE_SHA256, snapshotter=SNAPSHOTTER)
    assert out.split()[0] == hashlib.sha256(lazy_images.large).hexdigest()
    layers = daemon.stats()["layers"]
    assert isinstance(layers, dict)
    assert sum(layer["cache_write_failures"] for layer in layers.values()) > 0  # the disk was full
    assert daemon.proc is not None and daemon.proc.poll() is None  # and the daemon lives on


def test_running_container_keeps_reading_across_daemon_restarts(
    lazy_images: LazyImages, proxy: CountingProxy, lazy_stack: tuple[LazysnapDaemon, Containerd]
) -> None:
    """The FUSE manager serves lazy layers, so a SIGTERM or kill -9 of the daemon leaves running
    containers their layers: they read bytes never fetched before, while the daemon is down and
    after it is back, and new containers start from the same image."""
    daemon, cd = lazy_stack
    ref = f"{proxy.host}/{lazy_images.estargz}"
    cd.rpull(ref)
    cid = unique_id("run")
    cd.containers.add((cd.namespace, cid))
    args = ["run", "-d", *run_args(cd, cid), "--snapshotter", SNAPSHOTTER, ref, cid]
    cd.ctr(*args, "/bin/busybox", "sleep", "600")
    execs = iter(range(100))

    def read_mib(mib: int) -> str:
        """sha256 of MiB ``mib`` of the 16 MiB file, read inside the running container."""
        dd = f"/bin/busybox dd if=/data/large.bin bs=1048576 skip={mib} count=1 2>/dev/null"
        script = f"{dd} | /bin/busybox sha256sum"
        out = cd.ctr("task", "exec", "--exec-id", f"read{next(execs)}", cid, "/bin/sh", "-c", script).stdout
        return out.split()[0]

    def want(mib: int) -> str:
        return hashlib.sha256(lazy_images.large[mib << 20 : (mib + 1) << 20]).hexdigest()

    # Backwards through the file (4 MiB chunks): readahead only goes forward, so every read below
    # needs a chunk that no earlier read brought.
    assert read_mib(13) == want(13)
    targets = sorted(lazy_layer_mounts(daemon.root))
    assert len(targets) == 4
    manager = daemon.manager_pid()
    assert manager is not None

    daemon.stop(keep_manager=True)  # SIGTERM: as systemd restarts or upgrades the daemon
    assert sorted(lazy_layer_mounts(daemon.root)) == targets
    proxy.reset()
    assert read_mib(9) == want(9)  # a chunk never fetched before, while the daemon is down
    assert proxy.reset() > 1 << 20
    daemon.start()
    assert daemon.manager_pid() == manager  # found, not started again
    assert daemon.stats()["lazy_mounts"] == 4
    assert read_mib(5) == want(5)

    daemon.kill()
    proxy.reset()
    assert read_mib(0) == want(0)  # fetched from the registry while the daemon is dead
    assert proxy.reset() > 1 << 20
    daemon.start()
    assert daemon.manager_pid() == manager
    assert sorted(lazy_layer_mounts(daemon.root)) == targets

    def new_container_runs() -> bool:  # containerd's channel may back off after the kill
        proc = run_container(cd, ref, "/bin/sh", "-c", LARGE_SHA256, snapshotter=SNAPSHOTTER)
        whole = hashlib.sha256(lazy_images.large).hexdigest()
        return proc.returncode == 0 and proc.stdout.split()[0] == whole

    assert wait_until(new_container_runs, timeout=30)


def test_containerd_restart_while_lazysnap_runs(
    lazy_images: LazyImages, proxy: CountingProxy, lazy_stack: tuple[LazysnapDaemon, Containerd]
) -> None:
    """containerd goes away and comes back (an upgrade of the node's runtime): lazysnap keeps its
    lazy layers mounted, containerd finds the image's snapshots where it left them, and new
    containers start without anything being pulled or mounted again."""
    daemon, cd = lazy_stack
    ref = f"{proxy.host}/{lazy_images.estargz}"
    cd.rpull(ref)
    script = "/bin/busybox sha256sum /data/big.bin /data/hello.txt"
    first = run_in_container(cd, ref, "/bin/sh", "-c", script, snapshotter=SNAPSHOTTER)
    targets = sorted(lazy_layer_mounts(daemon.root))
    mounts_before = daemon.stats()["lazy_mounts"]

    assert cd.stop() == []  # tasks gone, containerd's own mounts gone; lazysnap's stay
    assert sorted(lazy_layer_mounts(daemon.root)) == targets
    cd.start()
    proxy.reset()
    assert run_in_container(cd, ref, "/bin/sh", "-c", script, snapshotter=SNAPSHOTTER) == first
    assert daemon.stats()["lazy_mounts"] == mounts_before  # nothing mounted again
    assert proxy.reset() == 0  # nothing fetched: TOCs and chunks were already here
