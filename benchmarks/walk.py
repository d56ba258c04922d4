"""Small-file walk micro-benchmark (issue 11): ``find | sort | xargs cat`` over 5,000 files of
0.2-4 KiB in 50 directories, with the page cache (and dentry/inode caches) dropped before each
pass, through

* ``overlayfs``: containerd's own snapshotter, the gzip image pulled and unpacked on local disk;
* ``lazysnap``: the eStargz image pulled lazily by a lazysnap daemon (with ``[fs] backend`` set
  when a backend is chosen), after one unmeasured pass read every file, so that every chunk is
  in lazysnap's chunk cache and nothing is fetched while measuring;
* ``lazysnap (complete, local blobs)``: the same daemon restarted once its background fetch
  completed every layer, so that it mounts them over local data blobs (EROFS backend);
* ``stargz`` (when the peer is built): the same for the stargz-snapshotter.

Each snapshotter's view of the image (``ctr snapshots view`` of its top layer, mounted with the
mount ``ctr snapshots mounts`` gives: the overlayfs a container's root would have, minus the
upper directory) is walked from the host, timed around the pipeline. The same mounts also get
the metadata passes of ``benchmarks.micro`` (stat / open+close per second). Reported: seconds
per walk (median of ``reps``) and the ratio to overlayfs; a 256 MiB file read front to back, page
cache dropped and warm. Needs root, containerd, a registry
binary and ctr-remote, like ``make bench``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import statistics
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    OVERLAYFS,
    ImageSet,
    Mode,
    containerd_with,
    drop_page_cache,
    lazysnap_mode,
    pull,
    serve_registry,
)
from benchmarks.images import BUILDER_VERSION, DEFAULT_CACHE, LayerBuilder
from benchmarks.layout import write_image
from tests.support import mounts
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon
from tests.support.scratch import make_tmpdir, remove_tmpdir
from tests.support.services import Containerd

WALK = "find data -type f | sort | xargs cat > /dev/null"
SEQUENTIAL = "big/seq.bin"  # read front to back after the walk: cached sequential throughput
SEQUENTIAL_MIB = 256
# lazysnap again after a restart, its layers complete: EROFS over local data blobs, no FUSE.
LOCAL = "lazysnap (complete, local blobs)"
MIN_BYTES, MAX_BYTES = 200, 4096


@dataclass(frozen=True)
class SmallFilesImage:
    """A small base layer and one layer of ``files`` files of 200-4096 bytes (sizes and
    contents fixed by their index) spread evenly over ``dirs`` directories under /data."""

    files: int = 5_000
    dirs: int = 50

    @property
    def slug(self) -> str:
        return f"smallfiles-{self.files}x{self.dirs}-seq{SEQUENTIAL_MIB}"

    def key(self, cache: Path) -> str:
        return f"{self.slug}-v{BUILDER_VERSION}"

    def approx_bytes(self) -> int:
        return self.files * (MIN_BYTES + MAX_BYTES) // 2 + (SEQUENTIAL_MIB << 20)

    def names(self) -> list[str]:
        per_dir = -(-self.files // self.dirs)
        return [f"data/d{i // per_dir:03d}/f{i % per_dir:05d}" for i in range(self.files)]

    def build(self, layout: Path, scratch: Path, cache: Path) -> None:
        layers = LayerBuilder(layout, scratch)

        def base(tar: tarfile.TarFile) -> None:
            layers.add_dir(tar, "etc")
            layers.add_bytes(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")

        def data(tar: tarfile.TarFile) -> None:
            made: set[str] = set()
            for i, name in enumerate(self.names()):
                for parent in (Path(name).parent.parent, Path(name).parent):
                    if str(parent) not in made:
                        layers.add_dir(tar, str(parent))
                        made.add(str(parent))
                seed = hashlib.sha256(b"smallfile-%d" % i).digest()
                size = MIN_BYTES + int.from_bytes(seed[:4], "big") % (MAX_BYTES - MIN_BYTES + 1)
                layers.add_bytes(tar, name, hashlib.shake_128(seed).digest(size))

        def big(tar: tarfile.TarFile) -> None:
            layers.add_dir(tar, "big")
            layers.add_bytes(tar, SEQUENTIAL, hashlib.shake_128(b"sequential").digest(SEQUENTIAL_MIB << 20))

        layers.layer("base", base)
        layers.layer("data", data)
        layers.layer("big", big)
        write_image(layout, "gzip", layers.layers, created_by="lazysnap benchmarks: small-file walk")


def _timed(fn: Callable[[], None]) -> float:
    drop_page_cache()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def walk_once(root: Path) -> None:
    subprocess.run(["sh", "-c", WALK], cwd=root, check=True, timeout=600)


def read_once(path: Path) -> None:
    with open(path, "rb", buffering=0) as fh:
        while fh.read(1 << 20):
            pass


def top_snapshot(cd: Containerd, snapshotter: str) -> str:
    """The committed snapshot no other snapshot has as its parent: the image's top layer."""
    lines = cd.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout.splitlines()[1:]
    rows = [ln.split() for ln in lines if ln.strip()]
    committed = [r for r in rows if r[-1] == "Committed"]
    parents = {r[1] for r in committed if len(r) == 3}
    tops = [r[0] for r in committed if r[0] not in parents]
    if len(tops) != 1:
        raise RuntimeError(f"expected one top snapshot in {snapshotter}, found {tops}: {lines}")
    return tops[0]


@contextlib.contextmanager
def mounted_view(cd: Containerd, snapshotter: str, target: Path) -> Iterator[Path]:
    """The image's root file system as ``snapshotter`` serves it, read-only, at ``target``."""
    key = f"walk-view-{time.monotonic_ns()}"
    top = top_snapshot(cd, snapshotter)
    printed = cd.ctr("snapshots", "--snapshotter", snapshotter, "view", "--mounts", key, top).stdout
    target.mkdir(parents=True, exist_ok=True)
    for mount in json.loads(printed):
        kind, options = str(mount["Type"]), ",".join(mount.get("Options") or [])
        command = ["mount", *(["-t", kind] if kind != "bind" else []), "-o", options]
        subprocess.run([*command, str(mount["Source"]), str(target)], check=True, capture_output=True)
    try:
        yield target
    finally:
        left = mounts.unmount_all(target)
        if left:
            raise RuntimeError(f"could not unmount {target}")


def measure(
    images: ImageSet,
    name: str,
    mode: Mode,
    names: list[str],
    reps: int,
    passes: Callable[[Path, list[str]], Any],
) -> dict[str, dict[str, Any]]:
    """Walk times (and metadata ops/s) of the image's view through ``mode``'s snapshotter, by
    name: ``name``, and for lazysnap also ``LOCAL`` (after a restart, once every layer was
    complete: EROFS directly over local data blobs)."""
    results: dict[str, dict[str, Any]] = {}
    with containerd_with(mode, "lzwk") as (cd, process):
        ref = images.ref(images.registry.host, mode.variant)
        pull(cd, mode, ref, timeout=600)
        snapshotter = mode.snapshotter or "overlayfs"
        with mounted_view(cd, snapshotter, cd.workdir / "view") as root:
            missing = [n for n in names if not (root / n).is_file()]
            if missing:
                raise RuntimeError(f"{mode.name}: {len(missing)} files not in the view, e.g. {missing[:3]}")
            walk_once(root)  # unmeasured: a lazy layer fetches every chunk into its cache
            read_once(root / SEQUENTIAL)
            results[name] = measure_view(root, names, reps, passes)
        if isinstance(process, LazysnapDaemon):
            restart_complete(process, cd)
            with mounted_view(cd, snapshotter, cd.workdir / "view") as root:
                results[LOCAL] = measure_view(root, names, reps, passes)
    return results


def restart_complete(daemon: LazysnapDaemon, cd: Containerd, timeout: float = 300) -> None:
    """Once every lazy layer is complete and kept as a local data blob, restart lazysnap: it
    mounts the layers again, over those blobs."""

    def complete() -> bool:
        layers = daemon.stats().get("layers") or {}
        return bool(layers) and all(layer["background_done"] for layer in layers.values())

    deadline = time.monotonic() + timeout
    while not complete():
        if time.monotonic() > deadline:
            raise RuntimeError(f"lazy layers not complete after {timeout}s: {daemon.stats().get('layers')}")
        time.sleep(0.2)
    time.sleep(2)  # the blobs are written once complete
    daemon.stop()
    daemon.start()
    layers = daemon.stats().get("layers") or {}
    if not layers or not all(layer.get("local_blob") for layer in layers.values()):
        raise RuntimeError(f"lazy layers not mounted over local blobs after a restart: {layers}")
    while cd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("containerd did not reconnect to the restarted lazysnap")
        time.sleep(0.2)


def measure_view(
    root: Path, names: list[str], reps: int, passes: Callable[[Path, list[str]], Any]
) -> dict[str, Any]:
    seconds = [_timed(lambda: walk_once(root)) for _ in range(reps)]
    ops = passes(root, names)
    cold = [_timed(lambda: read_once(root / SEQUENTIAL)) for _ in range(reps)]
    started = time.perf_counter()
    read_once(root / SEQUENTIAL)  # again, without dropping the page cache
    warm = time.perf_counter() - started
    mb = (SEQUENTIAL_MIB << 20) / 1e6
    return {
        "walk_s": [round(s, 3) for s in seconds],
        "ops_per_s": ops,
        "sequential_mb_s": round(mb / statistics.median(cold), 1),
        "sequential_warm_mb_s": round(mb / warm, 1),
    }


def run(
    files: int = 5_000,
    dirs: int = 50,
    *,
    reps: int = 3,
    backend: str | None = None,
    stargz: Mode | None = None,
    passes: Callable[[Path, list[str]], Any],
    cache: Path = DEFAULT_CACHE,
) -> dict[str, Any]:
    """The walk through overlayfs, lazysnap (``[fs] backend = backend`` if given) and the
    ``stargz`` peer mode if given; medians and ratios to overlayfs."""
    source = SmallFilesImage(files, dirs)
    overrides: dict[str, dict[str, object]] = {"fs": {"backend": backend}} if backend else {}
    lazysnap = lazysnap_mode("estargz", **overrides)
    modes = {"overlayfs": OVERLAYFS, "lazysnap": lazysnap}
    if stargz is not None:
        modes["stargz"] = dataclasses.replace(stargz, variant="estargz")
    workdir = make_tmpdir("lzwi")
    try:
        with serve_registry() as registry:
            images = ImageSet(source, registry, workdir / source.slug, cache).build(["estargz"])
            names = source.names()
            results: dict[str, dict[str, Any]] = {}
            for name, mode in modes.items():
                results.update(measure(images, name, mode, names, reps, passes))
    finally:
        remove_tmpdir(workdir)
    median = {name: statistics.median(r["walk_s"]) for name, r in results.items()}
    return {
        "files": files,
        "dirs": dirs,
        "file_bytes": [MIN_BYTES, MAX_BYTES],
        "command": WALK,
        "reps": reps,
        "backend": backend,
        "walk_s": {name: round(s, 3) for name, s in median.items()},
        "ratio_to_overlayfs": {name: round(s / median["overlayfs"], 2) for name, s in median.items()},
        "sequential_mb_s": {name: r["sequential_mb_s"] for name, r in results.items()},
        "sequential_warm_mb_s": {name: r["sequential_warm_mb_s"] for name, r in results.items()},
        "runs": results,
    }
