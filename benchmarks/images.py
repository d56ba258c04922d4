"""The benchmark images, built reproducibly and cached as OCI layouts.

Two kinds of image source:

* :class:`ModelImage` — busybox, a small config and ``shards`` incompressible weight files of
  ``shard_mib`` MiB, one layer each (a model server's image);
* :class:`DebianImage` — a busybox + libc base layer and layers of Debian packages with their
  dependencies (see ``benchmarks.debian``).

Each source builds the ``gzip`` tag of an OCI layout under the cache directory (default
``/var/tmp/lazysnap-bench``, or ``$LAZYSNAP_BENCH_CACHE``), in a directory named by a key of
everything that determines its bytes (package versions, sizes, the builder's version), so a
repeated run reuses it and a changed package rebuilds it. The harness adds the converted tags
(``estargz``, ``zstdchunked``, ``nydus``) to the same layout.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from benchmarks import debian
from benchmarks.layout import LayerDesc, gzip_layer, tags, write_image

BUILDER_VERSION = 1  # bump when a builder's output changes for the same inputs
DEFAULT_CACHE = Path(os.environ.get("LAZYSNAP_BENCH_CACHE", "/var/tmp/lazysnap-bench"))
BUSYBOX = Path("/bin/busybox")
MIB = 1 << 20


class ImageSource(Protocol):
    @property
    def slug(self) -> str:
        """Short name, used as the registry repository ``bench/<slug>``."""
        ...

    def key(self, cache: Path) -> str:
        """Names the built image: equal keys, equal bytes."""
        ...

    def approx_bytes(self) -> int:
        """Rough compressed size (for disk-space checks before building)."""
        ...

    def build(self, layout: Path, scratch: Path, cache: Path) -> None:
        """Write the image into ``layout`` under the tag ``gzip``."""
        ...


def _fixed(info: tarfile.TarInfo, mode: int) -> tarfile.TarInfo:
    info.mode = mode
    info.mtime = debian.FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    tar.addfile(_fixed(info, mode))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(_fixed(info, mode), _Reader(iter([data])))


class _Reader:
    """A file-like ``read`` over an iterator of byte blocks (for tarfile.addfile)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._buf = b""
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        want = n
        while want != 0:
            if self._pos >= len(self._buf):
                block = next(self._blocks, None)
                if block is None:
                    break
                self._buf, self._pos = block, 0
            take = len(self._buf) - self._pos if want < 0 else min(want, len(self._buf) - self._pos)
            parts.append(self._buf[self._pos : self._pos + take])
            self._pos += take
            if want > 0:
                want -= take
        return b"".join(parts)


class LayerBuilder:
    """Gzip layers of ``layout`` written from functions that fill a tar (entries with fixed
    owners, modes and times: see ``add_dir`` and ``add_bytes``); ``layers`` in order."""

    add_dir = staticmethod(_add_dir)
    add_bytes = staticmethod(_add_bytes)

    def __init__(self, layout: Path, scratch: Path) -> None:
        self.layout = layout
        self.scratch = scratch
        self.layers: list[LayerDesc] = []

    def layer(self, name: str, fill: Callable[[tarfile.TarFile], None], level: int = 6) -> None:
        path = self.scratch / f"{name}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            fill(tar)
        self.layers.append(gzip_layer(self.layout, path, level))
        path.unlink()


def pseudo_random_blocks(size: int, seed: bytes, block: int = MIB) -> Iterator[bytes]:
    """Deterministic incompressible bytes (SHAKE-128 per MiB, ~0.5 GB/s), in blocks."""
    for i in range(0, size, block):
        yield hashlib.shake_128(seed + i.to_bytes(8, "big")).digest(min(block, size - i))


@dataclass(frozen=True)
class ModelImage:
    """busybox, ``/model/config.json`` and ``shards`` weight files of ``shard_mib`` MiB."""

    shard_mib: int
    shards: int

    @property
    def slug(self) -> str:
        return f"model-{self.shards}x{self.shard_mib}m"

    def key(self, cache: Path) -> str:
        busybox = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()[:12]
        return f"{self.slug}-bb{busybox}-v{BUILDER_VERSION}"

    def approx_bytes(self) -> int:
        return self.shards * self.shard_mib * MIB

    def build(self, layout: Path, scratch: Path, cache: Path) -> None:
        builder = LayerBuilder(layout, scratch)
        layer = builder.layer

        def base(tar: tarfile.TarFile) -> None:
            _add_dir(tar, "bin")
            _add_bytes(tar, "bin/busybox", BUSYBOX.read_bytes(), 0o755)
            for applet in debian.BUSYBOX_APPLETS:
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type = tarfile.SYMTYPE
                info.linkname = "busybox"
                tar.addfile(_fixed(info, 0o777))
            _add_dir(tar, "etc")
            _add_bytes(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
            _add_dir(tar, "tmp", 0o1777)

        def config(tar: tarfile.TarFile) -> None:
            _add_dir(tar, "model")
            _add_bytes(tar, "model/config.json", b'{"shards": %d}\n' % self.shards)

        layer("base", base)
        layer("config", config)
        for i in range(self.shards):

            def shard(tar: tarfile.TarFile, i: int = i) -> None:
                _add_dir(tar, "model")
                info = tarfile.TarInfo(f"model/shard-{i}.bin")
                info.size = self.shard_mib * MIB
                blocks = pseudo_random_blocks(info.size, f"shard-{i}".encode())
                tar.addfile(_fixed(info, 0o644), _Reader(blocks))

            # Incompressible: gzip's level changes nothing but the time it takes.
            layer(f"shard-{i}", shard, level=1)
        write_image(layout, "gzip", builder.layers)


@dataclass(frozen=True)
class DebianImage:
    """A base layer (busybox-static, libc6) and one layer per group of Debian packages."""

    name: str
    layers: tuple[tuple[str, ...], ...]
    _plans: dict[str, list[list[debian.Package]]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @property
    def slug(self) -> str:
        return f"debian-{self.name}"

    def plan(self, cache: Path) -> list[list[debian.Package]]:
        key = str(cache)
        if key not in self._plans:
            self._plans[key] = debian.plan_layers(self.layers, cache / "apt")
        return self._plans[key]

    def key(self, cache: Path) -> str:
        plan = [[str(p) for p in layer] for layer in self.plan(cache)]
        recipe = {"plan": plan, "applets": debian.BUSYBOX_APPLETS, "dropped": debian.DROPPED}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.slug}-{digest}-v{BUILDER_VERSION}"

    def approx_bytes(self) -> int:
        return 200 * MIB

    def build(self, layout: Path, scratch: Path, cache: Path) -> None:
        plan = self.plan(cache)
        debs = debian.download([p for layer in plan for p in layer], cache / "apt")
        by_name = {d.name: d for d in debs}
        layers: list[LayerDesc] = []
        for i, packages in enumerate(plan):
            rootfs = scratch / f"rootfs-{i}"
            debian.extract([by_name[p.filename] for p in packages], rootfs)
            if i == 0:
                debian.add_base_files(rootfs)
            debian.compile_python(rootfs)
            tar = scratch / f"layer-{i}.tar"
            debian.write_tar(rootfs, tar)
            shutil.rmtree(rootfs)
            layers.append(gzip_layer(layout, tar))
            tar.unlink()
        write_image(layout, "gzip", layers, created_by=f"lazysnap benchmarks: {self.layers}")


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """One builder at a time per cache directory (two bench runs may share it)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_layout(source: ImageSource, cache: Path = DEFAULT_CACHE) -> Path:
    """The cached layout of ``source`` with its ``gzip`` tag, built first if it is missing.
    Other tags are added by the caller while holding :func:`locked`."""
    with locked(cache):
        key = source.key(cache)
        home = cache / "images" / key
        layout = home / "layout"
        if (home / "built.json").exists():
            return layout
        scratch = cache / "images" / f"{key}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            source.build(scratch / "layout", scratch, cache)
            (scratch / "built.json").write_text(json.dumps({"key": key, "variants": {}}) + "\n")
            for leftover in scratch.iterdir():
                if leftover.name not in ("layout", "built.json"):
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            scratch.rename(home)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return layout


def cached_tags(source: ImageSource, cache: Path = DEFAULT_CACHE) -> set[str]:
    """Tags already in the cached layout of ``source`` (empty if it was never built)."""
    layout = cache / "images" / source.key(cache) / "layout"
    return set(tags(layout)) if (layout.parent / "built.json").exists() else set()


def variant_stamps(layout: Path) -> dict[str, str]:
    """Which converter (version) made each converted tag of a cached layout."""
    data = json.loads((layout.parent / "built.json").read_text())
    return {str(k): str(v) for k, v in data.get("variants", {}).items()}


def set_variant_stamp(layout: Path, variant: str, stamp: str) -> None:
    path = layout.parent / "built.json"
    data = json.loads(path.read_text())
    data.setdefault("variants", {})[variant] = stamp
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
