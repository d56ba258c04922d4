"""Cold-start harness: prepare images in every format, then start containers from a cold state
through a shaped link, with containerd's overlayfs snapshotter, with lazysnap and with peer
snapshotters, and time each phase.

Everything runs on loopback: a local registry (Debian docker-registry), a ShapingProxy in front of
it that models the network, a private containerd per run and, for lazy modes, a private
snapshotter process (lazysnap, or a peer started from a command template). A run starts from
nothing (fresh containerd and snapshotter state, kernel page cache dropped), so each repetition
is cold. Used by ``benchmarks.run`` (``make bench``) and ``benchmarks.demo`` (``make demo``).
Process and registry wrappers come from the test harness (tests/support), so the benchmark drives
exactly what the end-to-end tests drive.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import importlib.util
import inspect
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import grpc

from benchmarks import layout as oci_layout
from benchmarks.images import (
    DEFAULT_CACHE,
    DebianImage,
    ImageSource,
    ModelImage,
    cached_layout,
    locked,
    set_variant_stamp,
    variant_stamps,
)
from benchmarks.shaping_proxy import ShapingProxy, from_profile
from snapshotter.admin import admin_socket, fetch_stats
from snapshotter.contract import manager_pidfile
from snapshotter.image import OciLayout
from tests.support import mounts, oci
from tests.support.daemon import LazysnapDaemon, write_config
from tests.support.scratch import make_tmpdir, remove_tmpdir
from tests.support.services import Containerd, Registry, run_args, terminate_pid, unique_id

SNAPSHOTTER = "lazysnap"
READY = "BENCH-READY"
CTR_REMOTE_FORMATS = {"estargz": ["--estargz"], "zstdchunked": ["--zstdchunked"]}
NYDUS_MODULE = "snapshotter.formats.build_nydus"
NYDUS_CHUNK = 1 << 20
OVERLAY_SNAPSHOTS = Path("io.containerd.snapshotter.v1.overlayfs") / "snapshots"
# eStargz converted with the workload's startup profile: by lazysnap (profile recorded by
# lazysnap, `lazysnap convert --prefetch-files`) and by ctr-remote (`image optimize`); see
# benchmarks.profiled.
PROFILED = "estargz-profiled"
OPTIMIZED = "estargz-optimized"
PER_WORKLOAD_VARIANTS = (PROFILED, OPTIMIZED)
# The gzip image unchanged, with gzip indexes attached as a referrer (`lazysnap index --push`):
# the same manifest under a tag of its own, indexed afresh in every benchmark's registry.
GZIP_INDEX = "gzip-index"
# The plain eStargz image, with the workload's startup profile (recorded by lazysnap, as for
# PROFILED) attached in the registry as a referrer (`lazysnap profile push`), pulled by a lazysnap
# daemon with its default config ([profile] shared = true); see benchmarks.profiled.
SHARED = "lazysnap-estargz-shared"


# --- workloads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """An image and the command whose output line containing ``marker`` means "ready".

    A one-shot command must also exit 0; a ``long_running`` one (a server) is stopped with
    SIGTERM as soon as it is ready."""

    name: str
    source: ImageSource
    command: tuple[str, ...]
    marker: str = READY
    long_running: bool = False
    description: str = ""
    big: bool = False  # the 8 GiB variant: one overlayfs run only


def model_workload(
    name: str,
    shard_mib: int,
    shards: int,
    read_fraction: float | None = None,
    *,
    read_mib: int | None = None,
    big: bool = False,
) -> Workload:
    """busybox plus ``shards`` incompressible weight files, one per layer, and a small config;
    the command reads the config and ``read_mib`` MiB (or ``read_fraction``) of every shard,
    spread out as an inference server touching its first tensors, then prints the marker."""
    block = 1 << 20
    if read_mib is None:
        read_mib = max(1, int(shard_mib * (read_fraction if read_fraction is not None else 1.0)))
    reads = " ".join(
        f"/bin/dd if=/model/shard-{i}.bin of=/dev/null bs={block} count={read_mib} 2>/dev/null;"
        for i in range(shards)
    )
    share = "all" if read_mib >= shard_mib else f"{read_mib} MiB"
    return Workload(
        name=name,
        source=ModelImage(shard_mib, shards),
        command=("/bin/sh", "-c", f"/bin/cat /model/config.json >/dev/null; {reads} echo {READY}"),
        description=f"busybox + {shards} x {shard_mib} MiB incompressible shards; reads {share} of each",
        big=big,
    )


def python_workload() -> Workload:
    modules = "json, re, sqlite3, ssl, decimal, email.parser, http.client, asyncio, argparse, logging"
    return Workload(
        name="python",
        source=DebianImage("python", (("python3",),)),
        command=("/usr/bin/python3", "-c", f"import {modules}; print('{READY}')"),
        description="python3 from Debian; imports 10 stdlib modules",
    )


def gcc_workload() -> Workload:
    script = (
        'printf "#include <stdio.h>\\nint main(void) { puts(\\"%s\\"); return 0; }\\n" '
        f"{READY} > /tmp/hello.c && gcc -O2 -o /tmp/hello /tmp/hello.c && /tmp/hello"
    )
    return Workload(
        name="gcc",
        source=DebianImage("gcc", (("gcc", "libc6-dev"),)),
        command=("/bin/sh", "-c", script),
        description="gcc + libc6-dev from Debian; compiles and runs hello.c",
    )


def redis_workload() -> Workload:
    return Workload(
        name="redis",
        source=DebianImage("redis", (("redis-server",),)),
        command=(
            "/usr/bin/redis-server",
            "--port",
            "0",
            "--unixsocket",
            "/tmp/redis.sock",
            "--save",
            "",
            "--appendonly",
            "no",
        ),
        marker="ready to accept connections",
        long_running=True,
        description="redis-server from Debian; ready at its 'ready to accept connections' log line",
    )


def sympy_workload() -> Workload:
    code = (
        "import sympy; x = sympy.Symbol('x'); print(sympy.integrate(x**2 * sympy.sin(x), x)); "
        f"print('{READY}')"
    )
    return Workload(
        name="sympy",
        source=DebianImage("sympy", (("python3",), ("python3-sympy",))),
        command=("/usr/bin/python3", "-c", code),
        description="python3-sympy from Debian (3 layers); imports sympy, integrates x^2 sin x",
    )


# --- images -----------------------------------------------------------------------------------


def nydus_builder() -> Callable[..., list[Any]] | None:
    """``build_nydus_image`` if this checkout has the Nydus-like format's builder."""
    if importlib.util.find_spec(NYDUS_MODULE) is None:
        return None
    fn: Callable[..., list[Any]] = importlib.import_module(NYDUS_MODULE).build_nydus_image
    return fn


def _nydus_stamp() -> str:
    """Names the builder's code: a changed builder or format module rebuilds the cached variant."""
    spec = importlib.util.find_spec(NYDUS_MODULE)
    if spec is None or spec.origin is None:
        return "nydus-none"
    digest = hashlib.sha256()
    for path in sorted(Path(spec.origin).parent.glob("*nydus*.py")):
        digest.update(path.read_bytes())
    return "nydus-" + digest.hexdigest()[:16]


def ctr_remote_stamp() -> str:
    proc = subprocess.run(["ctr-remote", "--version"], capture_output=True, text=True, check=False)
    return "ctr-remote " + (proc.stdout.strip().split()[-1] if proc.stdout.strip() else "?")


class ImageSet:
    """One image source, cached as an OCI layout with a tag per format and pushed to a registry
    as ``bench/<slug>:<format>``. eStargz and zstd:chunked come from ctr-remote (as a user would
    convert), the Nydus-like format from ``snapshotter.formats.build_nydus``."""

    def __init__(
        self, source: ImageSource, registry: Registry, workdir: Path, cache: Path = DEFAULT_CACHE
    ) -> None:
        self.source = source
        self.registry = registry
        self.workdir = workdir
        self.cache = cache
        self.repo = f"bench/{source.slug}"
        self.sizes: dict[str, int] = {}
        self.layout: Path | None = None
        self.index_summary: list[str] = []  # what `lazysnap index` said (GZIP_INDEX)

    def ref(self, host: str, variant: str) -> str:
        return f"{host}/{self.repo}:{variant}"

    def build(self, formats: Sequence[str] = ("estargz", "zstdchunked")) -> ImageSet:
        """Make sure the ``gzip`` image and ``formats`` are in the cache and in the registry."""
        layout = self.layout = cached_layout(self.source, self.cache)
        wanted = ["gzip", *(f for f in formats if f != "gzip")]
        pushed: set[str] = set()
        with locked(self.cache):
            stamps = variant_stamps(layout)
            have = set(oci_layout.tags(layout))
            todo = [
                v
                for v in wanted
                if v not in ("gzip", GZIP_INDEX) and (v not in have or stamps.get(v) != self._stamp(v))
            ]
            if todo:
                self._push(layout, "gzip")
                pushed.add("gzip")
            ctr_remote = [v for v in todo if v in CTR_REMOTE_FORMATS]
            if ctr_remote:
                self._convert_ctr_remote(layout, ctr_remote)
                pushed.update(ctr_remote)
            if "nydus" in todo:
                self._convert_nydus(layout)
        for variant in wanted:
            if variant == GZIP_INDEX:
                self._push_indexed(layout)
            elif variant not in pushed:
                self._push(layout, variant)
            self.sizes[variant] = oci_layout.image_size(layout, variant)
        return self

    def _push_indexed(self, layout: Path) -> None:
        """The gzip image as ``GZIP_INDEX`` (the same manifest), with its layers' gzip indexes
        pushed by ``lazysnap index`` as a referrer (and the referrers tag: distribution 2.8)."""
        store = OciLayout(layout)
        with locked(self.cache):
            store.tag(store.tagged("gzip"), GZIP_INDEX)
        self._push(layout, GZIP_INDEX)
        ref = self.ref(self.registry.host, GZIP_INDEX)
        proc = subprocess.run(
            [sys.executable, "-m", "snapshotter", "index", ref, "--push", "--hosts-dir", str(self.workdir)],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"lazysnap index {ref} failed: {proc.stderr.strip()[-2000:]}")
        self.index_summary = proc.stdout.strip().splitlines()[-3:]
        print(f"[images] {self.source.slug}: {' / '.join(self.index_summary)}", flush=True)

    @staticmethod
    def _stamp(variant: str) -> str:
        return _nydus_stamp() if variant == "nydus" else ctr_remote_stamp()

    def _push(self, layout: Path, variant: str) -> None:
        oci.push(layout, variant, self.registry.host, self.repo, timeout=3600)

    def _convert_ctr_remote(self, layout: Path, variants: Sequence[str]) -> None:
        gzip_ref = self.ref(self.registry.host, "gzip")
        converter = Containerd(self.workdir / "conv")
        try:
            converter.start()
            converter.ctr("content", "fetch", "--plain-http", gzip_ref, timeout=3600)
            for variant in variants:
                target = self.ref(self.registry.host, variant)
                converter.ctr(
                    "image",
                    "convert",
                    "--oci",
                    *CTR_REMOTE_FORMATS[variant],
                    gzip_ref,
                    target,
                    binary="ctr-remote",
                    timeout=7200,
                )
                converter.ctr("image", "push", "--plain-http", target, timeout=3600)
                # Keep the converted image: later runs push it from the cache.
                copy_to_layout(target, layout, variant)
                set_variant_stamp(layout, variant, self._stamp(variant))
        finally:
            converter.stop()
            remove_tmpdir(self.workdir / "conv")

    def _convert_nydus(self, layout: Path) -> None:
        build = nydus_builder()
        if build is None:
            raise RuntimeError(f"{NYDUS_MODULE} is missing")
        tars = list(oci_layout.layer_tars(layout, "gzip"))
        kwargs: dict[str, Any] = {"chunk_size": NYDUS_CHUNK}
        if "prioritized_files" in inspect.signature(build).parameters:
            kwargs["prioritized_files"] = ()
        blobs = build(tars, **kwargs)
        del tars
        store = oci_layout.open_layout(layout)
        layers = [
            oci_layout.LayerDesc(
                store.write_blob(blob.blob), len(blob.blob), blob.diff_id, blob.media_type, blob.annotations
            )
            for blob in blobs
        ]
        oci_layout.write_image(layout, "nydus", layers, env=oci_layout.env(layout, "gzip"))
        set_variant_stamp(layout, "nydus", self._stamp("nydus"))


def copy_to_layout(ref: str, layout: Path, tag: str) -> None:
    """Copy the image ``ref`` from a plain-HTTP registry into ``layout`` as ``tag``, bytes kept."""
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            f"docker://{ref}",
            f"oci:{layout}:{tag}",
        ],
        check=True,
        capture_output=True,
        timeout=3600,
    )


def image_tag(variant: str, workload: Workload) -> str:
    """The tag a run of ``workload`` pulls for ``variant``: variants converted with a workload's
    startup profile exist per workload (model and model-full share an image, not a profile)."""
    return f"{variant}.{workload.name}" if variant in PER_WORKLOAD_VARIANTS else variant


# --- modes and snapshotter processes ----------------------------------------------------------


@dataclass
class Mode:
    """How a run gets its root filesystem: containerd's ``overlayfs`` (full pull of the gzip
    image), ``lazysnap`` or a ``peer`` proxy snapshotter (lazy pull of ``variant``)."""

    name: str
    variant: str
    kind: Literal["overlayfs", "lazysnap", "peer"]
    command: str = ""  # peer: command template with {address} {root} {config}
    config: str = ""  # peer: text of the file at {config}; lazysnap: unused
    lazysnap_overrides: dict[str, dict[str, object]] = field(default_factory=dict)
    stop_signal: str = "SIGTERM"  # peer: how it is asked to stop (SIGKILL 20 s later)
    # lazysnap: the run must have mounted the image with the startup profile attached to it in
    # the registry (the harness attaches the workload's first; checked in the daemon's stats).
    shared_profile: bool = False

    @property
    def snapshotter(self) -> str | None:
        return None if self.kind == "overlayfs" else (SNAPSHOTTER if self.kind == "lazysnap" else self.name)


OVERLAYFS = Mode("overlayfs", "gzip", "overlayfs")


def lazysnap_mode(variant: str, **overrides: dict[str, object]) -> Mode:
    return Mode(f"lazysnap-{variant}", variant, "lazysnap", lazysnap_overrides=dict(overrides))


EAGER = "lazysnap-eager"


def eager_mode(**overrides: dict[str, object]) -> Mode:
    """lazysnap pulling the plain gzip image with the eager fallback: every layer fetched in
    parallel and unpacked by lazysnap as it arrives. Gzip index discovery is off: the
    ``gzip-index`` mode attaches indexes to this very manifest in the same registry."""
    sections = {
        **overrides,
        "fallback": {**overrides.get("fallback", {}), "mode": "eager"},
        "remote": {**overrides.get("remote", {}), "gzip_index": False},
    }
    return Mode(EAGER, "gzip", "lazysnap", lazysnap_overrides=sections)


def shared_profile_mode(**overrides: dict[str, object]) -> Mode:
    """lazysnap pulling the plain eStargz image whose startup profile is attached in the registry."""
    return Mode(SHARED, "estargz", "lazysnap", lazysnap_overrides=dict(overrides), shared_profile=True)


class SnapshotterProcess(Protocol):
    address: Path
    root: Path
    proc: subprocess.Popen[bytes] | None

    def start(self, timeout: float = ...) -> None: ...

    def stop(self) -> Any: ...

    def stats(self) -> dict[str, Any]: ...


class PeerSnapshotter:
    """Another proxy snapshotter, started from a command template per run.

    ``{address}`` (unix socket to serve), ``{root}`` (an empty state directory) and
    ``{config}`` (a file holding ``config_text``, in which the same placeholders are filled in)
    are substituted in every argument of ``template`` (split like a shell would, not run by
    one). Stopped with ``stop_signal`` (SIGKILL after 20 s) by PID; FUSE or other mounts it left
    under its root are unmounted then."""

    def __init__(
        self, name: str, template: str, config_text: str, workdir: Path, stop_signal: str = "SIGTERM"
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.root = workdir / "root"
        self.address = workdir / "peer.sock"
        self.config = workdir / "peer.conf"
        self.log_path = workdir / "peer.log"
        self.template = template
        self.config_text = config_text
        self.stop_signal = signal.Signals[stop_signal]
        self.proc: subprocess.Popen[bytes] | None = None

    def _fill(self, text: str) -> str:
        for key, value in (("address", self.address), ("root", self.root), ("config", self.config)):
            text = text.replace("{" + key + "}", str(value))
        return text

    def command(self) -> list[str]:
        return [self._fill(arg) for arg in shlex.split(self.template)]

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        self.config.write_text(self._fill(self.config_text))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.address.exists():
                channel = grpc.insecure_channel(f"unix:{self.address}")
                try:
                    grpc.channel_ready_future(channel).result(timeout=1)
                    return
                except grpc.FutureTimeoutError:
                    pass
                finally:
                    channel.close()
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"peer {self.name} did not serve {self.address} in {timeout}s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        code = self.proc.returncode if self.proc else None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                code = self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        # A lazysnap peer leaves its FUSE manager running by design (it outlives daemon restarts);
        # each run must start cold, so stop it too.
        with contextlib.suppress(FileNotFoundError, ValueError):
            terminate_pid(int((self.root / "fuse.pid").read_text()))
        left = mounts.unmount_all(self.root)
        if left:
            targets = [m.target for m in left]
            raise RuntimeError(f"peer {self.name} left mounts that would not unmount: {targets}")
        return code

    def stats(self) -> dict[str, Any]:
        """lazysnap's admin statistics, when the peer is a lazysnap; else empty."""
        try:
            return fetch_stats(admin_socket(self.root), timeout=2)
        except Exception:
            return {}

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start_snapshotter(mode: Mode, workdir: Path) -> SnapshotterProcess:
    workdir.mkdir()
    process: SnapshotterProcess
    if mode.kind == "lazysnap":
        config = write_config(workdir / "lazysnap.toml", mode.lazysnap_overrides)
        # info, not the harness's default debug: a log line per read would be measured too.
        process = LazysnapDaemon(workdir, config=config, extra_args=["--log-level", "info"])
    else:
        process = PeerSnapshotter(mode.name, mode.command, mode.config, workdir, mode.stop_signal)
    process.start()
    return process


# --- runs -------------------------------------------------------------------------------------


@dataclass
class RunResult:
    image: str
    mode: str
    pull_s: float
    run_s: float  # from the end of the pull until the workload is ready
    total_s: float
    bytes_fetched: int  # from the registry, over the shaped link, during the whole run
    bytes_fetched_ready: int  # ... until the workload was ready
    rep: int = 0
    profile: str = ""
    lazy_stats: dict[str, object] = field(default_factory=dict)
    # CPU seconds the snapshotter's processes (lazysnap: daemon and FUSE manager) spent in the run.
    cpu_s: float | None = None


@dataclass
class WarmResult:
    """The workload with its image local (overlayfs): ``warm_s`` from ``ctr run`` to ready with
    the page cache warm, and ``bytes_read``, the image bytes it touched (page-cache residency
    after a run that started with the cache dropped). ``exact`` when the image was on a file
    system without readahead, so that the bytes are the workload's own reads."""

    image: str
    warm_s: list[float]
    bytes_read: list[int]
    exact: bool
    note: str = ""


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass
class Timing:
    started: float
    ready: float
    ended: float
    output: str


def run_workload(
    cd: Containerd,
    ref: str,
    workload: Workload,
    *,
    snapshotter: str | None,
    on_ready: Callable[[], None] = lambda: None,
    timeout: float = 3600,
) -> Timing:
    """``ctr run --rm`` the workload, reading its output as it comes: ready at the first line
    with the marker (``on_ready`` is called then); a long-running workload is then stopped."""
    cid = unique_id("lzb")
    cd.containers.add((cd.namespace, cid))
    cmd = ["ctr", "--address", cd.address, "-n", cd.namespace, "run", "--rm", *run_args(cd, cid)]
    if snapshotter:
        cmd += ["--snapshotter", snapshotter]
    cmd += [ref, cid, *workload.command]
    marker = workload.marker.lower()
    lines: list[str] = []
    ready: float | None = None
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if ready is None and marker in line.lower():
                ready = time.monotonic()
                on_ready()
                if workload.long_running:
                    cd.ctr("task", "kill", "-s", "SIGTERM", cid, check=False, timeout=30)
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ended = time.monotonic()
    output = "".join(lines)
    if ready is None or (rc != 0 and not workload.long_running):
        raise RuntimeError(
            f"{workload.name} in {ref} failed (exit {rc}, marker {'seen' if ready else 'not seen'}):\n"
            f"{output[-3000:]}\n--- containerd ---\n{cd.log_tail(15)}"
        )
    return Timing(started, ready, ended, output)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_PAGE = os.sysconf("SC_PAGE_SIZE")
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` that are in the page cache (mincore)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += _resident(os.path.join(dirpath, name))
    return total


def _resident(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr is None or addr == _MAP_FAILED:
            return 0
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                return 0
            return min(size, (pages - bytes(vec).count(0)) * _PAGE)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (OSError, ValueError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def snapshotter_cpu(process: SnapshotterProcess) -> dict[int, float]:
    """CPU seconds so far of each process of the snapshotter, by pid (lazysnap's FUSE manager too)."""
    pids = [process.proc.pid] if process.proc is not None else []
    with contextlib.suppress(OSError, ValueError):
        pids.append(int(manager_pidfile(process.root).read_text()))
    return {pid: cpu_seconds(pid) for pid in pids}


def _lazy_summary(stats: Mapping[str, Any]) -> dict[str, object]:
    if not stats:
        return {}
    fetched: dict[str, int] = {}
    for layer in (stats.get("layers") or {}).values():
        for reason, n in (layer.get("bytes") or {}).items():
            fetched[reason] = fetched.get(reason, 0) + int(n)
    return {
        "lazy_mounts": stats.get("lazy_mounts"),
        "not_lazy": stats.get("not_lazy"),
        "fetched_by_reason": fetched,
        **({"eager": stats["eager"]} if "eager" in stats else {}),
        **({"profiles": stats["profiles"]} if "profiles" in stats else {}),
        "links": stats.get("links"),
    }


def shared_profile_used(stats: Mapping[str, Any]) -> str | None:
    """None when the daemon found the image's shared startup profile and mounted layers with it;
    else what went wrong (from its ``profiles`` statistics)."""
    profiles = stats.get("profiles")
    if not isinstance(profiles, Mapping):
        return "the daemon's statistics have no 'profiles' section"
    found = int(profiles.get("shared_found") or 0)
    by_source = profiles.get("layers_by_source") or {}
    shared_layers = int(by_source.get("shared", 0)) if isinstance(by_source, Mapping) else 0
    if found >= 1 and shared_layers >= 1:
        return None
    return (
        f"the shared startup profile was not used: shared_found {found}, layers by source {by_source},"
        f" rejected {profiles.get('shared_rejected')}, look-up errors {profiles.get('shared_errors')},"
        f" shared {profiles.get('shared')}"
    )


@contextlib.contextmanager
def containerd_with(mode: Mode, prefix: str) -> Iterator[tuple[Containerd, SnapshotterProcess | None]]:
    """A private containerd in a temp dir of its own, using ``mode``'s snapshotter (started first,
    if the mode has one); both stopped and the directory removed afterwards."""
    workdir = make_tmpdir(prefix)
    process: SnapshotterProcess | None = None
    cd: Containerd | None = None
    try:
        proxy_plugins: dict[str, str] = {}
        if mode.snapshotter is not None:
            process = start_snapshotter(mode, workdir / "s")
            proxy_plugins[mode.snapshotter] = str(process.address)
        cd = Containerd(workdir / "cd", proxy_plugins)
        cd.start()
        yield cd, process
    finally:
        if cd is not None:
            cd.stop()
        if process is not None:
            process.stop()
        remove_tmpdir(workdir)


def pull(cd: Containerd, mode: Mode, ref: str, *, timeout: float) -> None:
    """Pull ``ref`` as ``mode`` does: normally (overlayfs) or with its remote snapshotter."""
    if mode.snapshotter is None:
        cd.pull(ref, timeout=timeout)
    else:
        cd.rpull(ref, snapshotter=mode.snapshotter, timeout=timeout)


def cold_run(
    images: ImageSet,
    workload: Workload,
    proxy: ShapingProxy,
    mode: Mode,
    *,
    rep: int = 0,
    profile: str = "",
    timeout: float = 3600,
) -> RunResult:
    """Pull and run ``workload`` once from nothing, in ``mode``."""
    with containerd_with(mode, "lzb") as (cd, process):
        ref = images.ref(proxy.host, image_tag(mode.variant, workload))
        drop_page_cache()
        proxy.reset_counters()
        cpu_before = snapshotter_cpu(process) if process is not None else {}
        started = time.monotonic()
        pull(cd, mode, ref, timeout=timeout)
        pulled = time.monotonic()
        at_ready: list[int] = []
        timing = run_workload(
            cd,
            ref,
            workload,
            snapshotter=mode.snapshotter,
            on_ready=lambda: at_ready.append(proxy.bytes_down),
            timeout=timeout,
        )
        down, _ = proxy.reset_counters()
        cpu = None
        if process is not None:
            cpu = sum(t - cpu_before.get(pid, 0.0) for pid, t in snapshotter_cpu(process).items())
        stats = process.stats() if process is not None else {}
        if mode.shared_profile:
            problem = shared_profile_used(stats)
            if problem is not None:
                raise RuntimeError(f"{workload.name} in {mode.name}: {problem}")
        return RunResult(
            image=workload.name,
            mode=mode.name,
            pull_s=pulled - started,
            run_s=timing.ready - pulled,
            total_s=timing.ready - started,
            bytes_fetched=down,
            bytes_fetched_ready=at_ready[0] if at_ready else down,
            rep=rep,
            profile=profile,
            lazy_stats=_lazy_summary(stats),
            cpu_s=cpu,
        )


@contextlib.contextmanager
def loop_fs(image: Path, size: int, mountpoint: Path) -> Iterator[None]:
    """An ext4 file system on a sparse file of ``size`` bytes, through a loop device whose
    readahead is off, mounted at ``mountpoint``: what a workload reads from it is what enters
    the page cache (this VM's disk reads ahead 8 MiB, which would count as "read")."""
    with open(image, "wb") as fh:
        fh.truncate(size)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        Path(f"/sys/block/{Path(dev).name}/queue/read_ahead_kb").write_text("0\n")
        inodes = str(max(65536, size // (64 << 10)))
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-N", inodes, dev],
            check=True,
            capture_output=True,
        )
        mountpoint.mkdir(parents=True, exist_ok=True)
        # noinit_itable: no background zeroing of inode tables while we measure.
        subprocess.run(
            ["mount", "-o", "noinit_itable", dev, str(mountpoint)], check=True, capture_output=True
        )
        try:
            yield
        finally:
            mounts.unmount_all(mountpoint)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


def warm_runs(
    images: ImageSet, workload: Workload, registry: Registry, *, reps: int = 3, timeout: float = 3600
) -> WarmResult:
    """Pull the gzip image (unshaped) into a private containerd whose root is a ``loop_fs``, then
    ``reps`` times: drop the page cache, run (bytes read), run again (warm time)."""
    workdir = make_tmpdir("lzw")
    cd = Containerd(workdir / "cd")
    result = WarmResult(workload.name, [], [], exact=True)
    try:
        with contextlib.ExitStack() as stack:
            size = (2 << 30) + 8 * max(images.sizes.values(), default=0)
            try:
                stack.enter_context(loop_fs(workdir / "disk.img", size, cd.root))
            except (OSError, subprocess.CalledProcessError) as exc:
                detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
                result.exact = False
                result.note = f"no loop device file system ({detail!r}); bytes read include readahead"
            stack.callback(cd.stop)
            cd.start()
            ref = images.ref(registry.host, "gzip")
            cd.pull(ref, timeout=timeout)
            for _ in range(reps):
                drop_page_cache()
                run_workload(cd, ref, workload, snapshotter=None, timeout=timeout)
                result.bytes_read.append(resident_bytes(cd.root / OVERLAY_SNAPSHOTS))
                hot = run_workload(cd, ref, workload, snapshotter=None, timeout=timeout)
                result.warm_s.append(hot.ready - hot.started)
        return result
    finally:
        remove_tmpdir(workdir)


# --- registry and link ------------------------------------------------------------------------


@contextlib.contextmanager
def serve_registry() -> Iterator[Registry]:
    workdir = make_tmpdir("lzreg")
    registry = Registry(workdir)
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()
        remove_tmpdir(workdir)


@contextlib.contextmanager
def shaped(registry: Registry, profile: str) -> Iterator[ShapingProxy]:
    host, port = registry.host.split(":")
    proxy = from_profile(profile, host, int(port)).start_in_thread()
    try:
        yield proxy
    finally:
        proxy.stop_thread()


@contextlib.contextmanager
def registry_and_proxy(profile: str) -> Iterator[tuple[Registry, ShapingProxy]]:
    with serve_registry() as registry, shaped(registry, profile) as proxy:
        yield registry, proxy


def disk_shortfall(paths: Sequence[Path], need: int) -> str | None:
    """None if the filesystem(s) holding ``paths`` have ``need`` bytes free in total per
    device; else what is missing."""
    by_dev: dict[int, Path] = {}
    for path in paths:
        probe = path
        while not probe.exists():
            probe = probe.parent
        by_dev.setdefault(probe.stat().st_dev, probe)
    short = []
    for probe in by_dev.values():
        free = shutil.disk_usage(probe).free
        if free < need:
            short.append(f"{probe}: {free / 2**30:.1f} GiB free, need {need / 2**30:.1f} GiB")
    return "; ".join(short) or None


def as_json(results: Sequence[RunResult]) -> list[dict[str, object]]:
    return [asdict(r) for r in results]
