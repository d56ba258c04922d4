"""Cold-start harness: build and convert images, then start containers from a cold state through a
shaped link, with containerd's overlayfs snapshotter and with lazysnap, and time each phase.

Everything runs on loopback: a local registry (Debian docker-registry), a ShapingProxy in front of
it that models the network, a private containerd per run and, for lazy modes, a private lazysnap.
A run starts from nothing (fresh containerd and lazysnap state, kernel page cache dropped), so each
repetition is cold. Used by ``benchmarks.run`` (``make bench``) and ``benchmarks.demo``
(``make demo``). Process and registry wrappers come from the test harness (tests/support), so the
benchmark drives exactly what the end-to-end tests drive.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.shaping_proxy import ShapingProxy, from_profile
from tests.support import mounts, oci
from tests.support.daemon import LazysnapDaemon, write_config
from tests.support.services import Containerd, Registry, run_container

SNAPSHOTTER = "lazysnap"
LAZY_FORMATS = {"estargz": ["--estargz"], "zstdchunked": ["--zstdchunked"]}


@dataclass(frozen=True)
class Workload:
    """An image (layers) and the command whose exit means "ready"."""

    name: str
    layers: tuple[oci.Layer, ...]
    command: tuple[str, ...]
    bytes_read: int  # bytes of the image the command reads (for T_ideal)


@dataclass
class RunResult:
    image: str
    mode: str
    pull_s: float
    run_s: float
    total_s: float
    bytes_fetched: int
    bytes_read: int
    lazy_stats: dict[str, object] = field(default_factory=dict)


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_workdir(prefix: str = "lzb") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def remove_workdir(path: Path) -> None:
    left = mounts.unmount_all(path)
    if left:
        raise RuntimeError(f"could not unmount {[m.target for m in left]}; leaving {path}")
    shutil.rmtree(path, ignore_errors=True)


def model_workload(name: str, shard_mib: int, shards: int, read_fraction: float) -> Workload:
    """busybox plus ``shards`` incompressible weight files, one per layer, and a small config; the
    command reads the config and ``read_fraction`` of every shard (spread out, as an inference
    server touching its first tensors), then exits."""
    spec = oci.test_image_layers()
    base = spec.layers[0]
    layers: list[oci.Layer] = [
        base,
        (oci.Dir("/model"), oci.File("/model/config.json", b'{"shards": %d}\n' % shards)),
    ]
    shard_bytes = shard_mib << 20
    for i in range(shards):
        data = oci._pseudo_random(shard_bytes, f"shard-{i}".encode())
        layers.append((oci.Dir("/model"), oci.File(f"/model/shard-{i}.bin", data)))
    block = 1 << 20
    count = max(1, int(shard_mib * read_fraction))
    reads = " ".join(
        f"/bin/busybox dd if=/model/shard-{i}.bin of=/dev/null bs={block} count={count} 2>/dev/null;"
        for i in range(shards)
    )
    script = f"/bin/cat /model/config.json >/dev/null; {reads} echo ready"
    return Workload(
        name=name,
        layers=tuple(layers),
        command=("/bin/sh", "-c", script),
        bytes_read=shards * count * block,
    )


class ImageSet:
    """One workload pushed to the registry as gzip and converted by ctr-remote to lazy formats."""

    def __init__(self, workload: Workload, registry: Registry, workdir: Path) -> None:
        self.workload = workload
        self.registry = registry
        self.workdir = workdir
        self.repo = f"bench/{workload.name}"
        self.sizes: dict[str, int] = {}

    def ref(self, host: str, variant: str) -> str:
        return f"{host}/{self.repo}:{variant}"

    def build(self, formats: Sequence[str] = tuple(LAZY_FORMATS)) -> ImageSet:
        image = oci.build_layout(self.workdir / "layout", self.workload.layers, tag="gzip")
        gzip_ref = oci.push(image.layout_dir, "gzip", self.registry.host, self.repo, timeout=900)
        self.sizes["gzip"] = sum(layer.size for layer in image.layers)
        shutil.rmtree(self.workdir / "layout", ignore_errors=True)
        converter = Containerd(self.workdir / "converter")
        try:
            converter.start()
            converter.pull(gzip_ref, timeout=900)
            for variant in formats:
                target = self.ref(self.registry.host, variant)
                converter.ctr(
                    "image", "convert", "--oci", *LAZY_FORMATS[variant], gzip_ref, target,
                    binary="ctr-remote", timeout=1800,
                )  # fmt: skip
                converter.ctr("image", "push", "--plain-http", target, timeout=1800)
                manifest = _manifest(converter, target)
                self.sizes[variant] = sum(layer["size"] for layer in manifest["layers"])
        finally:
            converter.stop()
            remove_workdir(self.workdir / "converter")
        return self


def _manifest(cd: Containerd, ref: str) -> dict[str, list[dict[str, int]]]:
    for line in cd.ctr("image", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == ref:
            digest = next(f for f in fields if f.startswith("sha256:"))
            manifest: dict[str, list[dict[str, int]]] = json.loads(cd.ctr("content", "get", digest).stdout)
            return manifest
    raise RuntimeError(f"{ref} not found in the converter's image list")


@contextmanager
def registry_and_proxy(profile: str) -> Iterator[tuple[Registry, ShapingProxy]]:
    workdir = make_workdir("lzreg")
    registry = Registry(workdir)
    proxy: ShapingProxy | None = None
    try:
        registry.start()
        host, port = registry.host.split(":")
        proxy = from_profile(profile, host, int(port)).start_in_thread()
        yield registry, proxy
    finally:
        if proxy is not None:
            proxy.stop_thread()
        registry.stop()
        remove_workdir(workdir)


def cold_run(
    images: ImageSet,
    proxy: ShapingProxy,
    mode: str,
    *,
    lazysnap_overrides: dict[str, dict[str, object]] | None = None,
) -> RunResult:
    """Pull and run ``images.workload`` once from nothing. ``mode`` is "overlayfs" or a lazy
    format name ("estargz", "zstdchunked"); ``lazysnap_overrides`` are config sections."""
    workdir = make_workdir()
    daemon: LazysnapDaemon | None = None
    cd: Containerd | None = None
    try:
        proxy_plugins = {}
        if mode != "overlayfs":
            lzdir = workdir / "lz"
            lzdir.mkdir()
            daemon = LazysnapDaemon(
                lzdir, config=write_config(lzdir / "lazysnap.toml", lazysnap_overrides or {})
            )
            daemon.start()
            proxy_plugins[SNAPSHOTTER] = str(daemon.address)
        cd = Containerd(workdir / "cd", proxy_plugins)
        cd.start()
        variant = "gzip" if mode == "overlayfs" else mode
        ref = images.ref(proxy.host, variant)
        drop_page_cache()
        proxy.reset_counters()
        started = time.monotonic()
        if mode == "overlayfs":
            cd.pull(ref, timeout=3600)
        else:
            cd.rpull(ref, snapshotter=SNAPSHOTTER, timeout=3600)
        pulled = time.monotonic()
        snapshotter = None if mode == "overlayfs" else SNAPSHOTTER
        proc = run_container(cd, ref, *images.workload.command, snapshotter=snapshotter, timeout=3600)
        ready = time.monotonic()
        if proc.returncode != 0 or "ready" not in proc.stdout:
            raise RuntimeError(f"{mode} workload failed ({proc.returncode}): {proc.stdout} {proc.stderr}")
        down, _ = proxy.reset_counters()
        lazy = daemon.stats() if daemon is not None else {}
        return RunResult(
            image=images.workload.name,
            mode=mode,
            pull_s=pulled - started,
            run_s=ready - pulled,
            total_s=ready - started,
            bytes_fetched=down,
            bytes_read=images.workload.bytes_read,
            lazy_stats={k: lazy[k] for k in ("lazy_mounts", "not_lazy") if k in lazy},
        )
    finally:
        if cd is not None:
            cd.stop()
        if daemon is not None:
            daemon.stop()
        remove_workdir(workdir)


def as_json(results: Sequence[RunResult]) -> list[dict[str, object]]:
    return [asdict(r) for r in results]
