"""The FUSE manager: the process that serves lazy layers, so that they outlive the daemon.

A FUSE mount lives as long as the process that answers its requests. If ``lazysnap serve`` served
the lazy layers itself, every restart or upgrade of it would pull the lower layers from under the
running containers. So the daemon starts this process (``lazysnap fuse-manager``) in a session of
its own and asks it, over the root-only unix socket ``ROOT/fuse.sock``, to mount, check and
unmount layers. The daemon can then stop, crash or be upgraded while the manager keeps serving;
a new daemon finds the manager and its mounts still there. (stargz-snapshotter's fusemanager
follows the same design.) Stopping the manager (SIGTERM) unmounts every lazy layer. With the
EROFS backend, SIGUSR2 stops it for a successor instead (``lazysnap restart-manager``): the lazy
layers stay mounted, their blob connection stays with the fd holder, and the next manager (which
waits for this one's lock) resumes serving them; the FUSE backend refuses SIGUSR2.

The manager holds everything a mounted layer needs: the registry client, the chunk cache, the
readers, the FUSE servers, the startup profiles, the metrics of FUSE operations and, when
configured, the CRI image-service proxy whose pull secrets the registry client uses.

Endpoints (JSON), besides the admin routes of ``snapshotter.admin``: ``POST /mount`` {labels,
mountpoint, lowerdirs} → {served: "mounted" | "filled"} or {not_lazy: {reason, detail,
required}}; ``POST /unmount`` {mountpoint}; ``GET /check?mountpoint=``; ``POST /forget-unused``
{digests}; ``GET /version``.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from snapshotter import __version__
from snapshotter.admin import AdminError, admin_app, serve_unix
from snapshotter.cache import ChunkCache
from snapshotter.config import Config, manager_fingerprint
from snapshotter.contract import NotLazyError, manager_pidfile, manager_socket, parse_mount_request
from snapshotter.cri import ImageServiceProxy, PullSecrets
from snapshotter.eager import EagerConfig
from snapshotter.erofs.mount import kernel_support
from snapshotter.erofslayers import ErofsLayers
from snapshotter.fetcher import CredentialStore, HostsConfig, RegistryClient, default_docker_config
from snapshotter.fetcher.credentials import CredentialSource
from snapshotter.logsetup import set_level
from snapshotter.metrics import Metrics
from snapshotter.ownership import (
    STOP_GRACE_SECONDS,
    StartupError,
    claim_socket_path,
    private_umask,
    root_is_locked,
)
from snapshotter.profile import ProfileNotFoundError, StartupRecorder
from snapshotter.reader import ReaderConfig
from snapshotter.remote import RemoteLayers
from snapshotter.scheduler import RestPolicy, SchedulerConfig
from snapshotter.tocstore import TocStore

log = logging.getLogger(__name__)


class ManagerRunningError(Exception):
    """Another FUSE manager already serves this root."""


# How long a new manager waits for the lock of a predecessor that no longer serves: one handing
# over answers the reads it has taken first (a blob server's stop waits up to 30 s for them).
LOCK_WAIT_SECONDS = 60.0


_HELD_UNTIL_EXIT: list[IO[str]] = []  # the root's lock after serve_manager returned


def _lock(root: Path, wait: float = LOCK_WAIT_SECONDS) -> IO[str]:
    """One manager per root: an flock on ROOT/fuse.lock, held for the process's life.

    While another process holds it and no manager answers on ROOT/fuse.sock, that process is a
    predecessor on its way out (after SIGUSR2 it answers the reads it has taken, then exits) or a
    manager still starting: wait for the lock, up to ``wait`` seconds, and give up as soon as a
    manager serves. (A successor that gave up at once would leave the mounts unserved until its
    starter tried again.)"""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fh = open(root / "fuse.lock", "a+")  # noqa: SIM115 - held until exit
    deadline = time.monotonic() + wait
    waiting = False
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            pass
        if _answers(manager_socket(root)):
            fh.close()
            raise ManagerRunningError(f"a FUSE manager already serves {root}")
        if time.monotonic() >= deadline:
            fh.close()
            raise ManagerRunningError(f"the FUSE manager holding {root} did not stop within {wait:.0f}s")
        if not waiting:
            log.info("waiting for the FUSE manager that holds this root to stop", extra={"root": str(root)})
            waiting = True
        time.sleep(0.05)


def _answers(address: Path) -> bool:
    """Whether a process listens on the unix socket ``address``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(str(address))
        except OSError:
            return False
    return True


class LocalBackend:
    """The admin answers of this process's RemoteLayers (the manager's side of LazyBackend)."""

    def __init__(self, remote: RemoteLayers) -> None:
        self.remote = remote

    def stats(self) -> dict[str, Any]:
        return self.remote.stats()

    def profile(self, image: str) -> dict[str, Any]:
        recorder = self.remote.recorder
        if recorder is None:
            raise AdminError("profile recording is off: set [profile] record = true and restart", 409)
        try:
            files = recorder.export(image)
            return {"image": image, "manifest": recorder.manifest_of(image), "files": files}
        except ProfileNotFoundError:
            known = ", ".join(recorder.images()) or "none"
            raise AdminError(f"no startup profile for {image!r} (profiles: {known})", 404) from None

    def prune(self, keep_bytes: int) -> dict[str, Any]:
        cache = self.remote.cache
        chunks, freed = cache.prune(keep_bytes)
        log.info("cache pruned", extra={"chunks": chunks, "bytes": freed})
        return {"chunks": chunks, "bytes": freed, "remaining_bytes": cache.total_bytes}

    def set_log_level(self, level: str) -> None:
        set_level(level)

    def metrics_text(self) -> str:
        return ""  # this process's metrics are the app's own


def manager_app(
    remote: RemoteLayers,
    metrics: Metrics,
    calls: Executor,
    fingerprint: str = "",
    stop: asyncio.Event | None = None,
) -> web.Application:
    """The admin routes, plus what the daemon asks of lazy layers. The daemon's calls block (a
    mount waits for the registry) and run in ``calls``, a pool of their own: the loop's default
    pool serves name lookups and hashing that those very mounts wait for."""
    loop = asyncio.get_running_loop()

    async def mount(request: web.Request) -> web.Response:
        try:
            labels, mountpoint, lowerdirs = parse_mount_request(await request.json())
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        try:
            served = await loop.run_in_executor(calls, remote.mount, labels, mountpoint, lowerdirs)
        except NotLazyError as exc:
            return web.json_response({"not_lazy": exc.to_wire()})
        return web.json_response({"served": served.value})

    async def unmount(request: web.Request) -> web.Response:
        body = await request.json()
        await loop.run_in_executor(calls, remote.unmount, Path(body["mountpoint"]))
        return web.json_response({})

    async def check(request: web.Request) -> web.Response:
        alive = await loop.run_in_executor(calls, remote.check, Path(request.query["mountpoint"]))
        return web.json_response({"alive": alive})

    async def forget_unused(request: web.Request) -> web.Response:
        body = await request.json()
        await loop.run_in_executor(calls, remote.forget_unused, {str(d) for d in body["digests"]})
        return web.json_response({})

    async def version(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "version": __version__,
                "pid": os.getpid(),
                "config": fingerprint,
                "backend": "fuse" if remote.erofs is None else "erofs",
                # Whether SIGUSR2 hands the lazy layers over to a successor (`restart-manager`).
                "handover": remote.can_hand_over(),
            }
        )

    async def stop_if_idle(_: web.Request) -> web.Response:
        # A stopping daemon asks: with no lazy layer mounted, nothing needs this process.
        mounted = remote.mounted()
        if mounted == 0 and stop is not None:
            log.info("FUSE manager stopping: the daemon stopped and no lazy layer is mounted")
            loop.call_soon(stop.set)
        return web.json_response({"stopping": mounted == 0 and stop is not None, "mounted": mounted})

    app = admin_app(LocalBackend(remote), metrics)
    app.router.add_post("/mount", mount)
    app.router.add_post("/unmount", unmount)
    app.router.add_get("/check", check)
    app.router.add_post("/forget-unused", forget_unused)
    app.router.add_get("/version", version)
    app.router.add_post("/stop-if-idle", stop_if_idle)
    return app


def build_remote(
    config: Config, loop: asyncio.AbstractEventLoop, credential_sources: Sequence[CredentialSource] = ()
) -> RemoteLayers:
    hosts = HostsConfig(config.fetch.hosts_dir, plain_http_hosts=config.fetch.plain_http_hosts)
    for endpoint in hosts.insecure_hosts():  # TLS is verified unless a hosts.toml says otherwise
        log.warning(
            "TLS certificate verification is off for a registry endpoint", extra={"endpoint": endpoint}
        )
    docker_config = (
        Path(config.fetch.docker_config) if config.fetch.docker_config else default_docker_config()
    )
    credentials = CredentialStore(docker_config if docker_config.exists() else None)
    for source in credential_sources:  # e.g. the CRI proxy's pull secrets, asked first
        credentials.add_source(source)
    client = RegistryClient(
        hosts,
        credentials,
        timeout=config.fetch.timeout_seconds,
        max_retries=config.fetch.max_retries,
        # A range read gives up when no byte of it arrived for as long as a read may wait.
        progress_timeout=config.read.timeout_seconds,
    )
    reader_config = ReaderConfig(
        read_timeout=config.read.timeout_seconds,
        readahead_bytes=config.read.readahead_bytes,
        merge_gap_bytes=config.read.merge_gap_bytes,
        max_request_bytes=config.read.max_request_bytes,
        prefetch=config.prefetch.enabled,
    )
    scheduler_config = SchedulerConfig(
        rest=RestPolicy(config.fetch.rest),
        rate_bytes=config.fetch.rate_bytes,
        max_connections=config.fetch.connections,
        reserved_for_on_demand=min(4, config.fetch.connections // 2),
        idle_seconds=config.fetch.idle_seconds,
    )
    cache = ChunkCache(config.root / "cache", config.cache.max_bytes)
    remote = RemoteLayers(
        client,
        cache,
        loop,
        TocStore(config.root / "layers"),
        reader_config=reader_config,
        max_toc_bytes=config.remote.max_toc_bytes,
        mount_timeout=config.remote.mount_timeout_seconds,
        gzip_index=config.remote.gzip_index,
        shared_profiles=config.profile.shared,
        recorder=(
            StartupRecorder(config.root / "profiles", config.profile.window_seconds)
            if config.profile.record
            else None
        ),
        erofs=choose_backend(config),
        scheduler_config=scheduler_config,
    )
    if config.fallback.mode == "eager":
        remote.enable_eager(config.root, eager_config(config))
    return remote


def eager_config(config: Config) -> EagerConfig:
    fallback = config.fallback
    return EagerConfig(
        layers_at_once=fallback.layers_at_once,
        window_bytes=fallback.window_bytes,
        min_free_bytes=fallback.min_free_bytes,
        timeout_seconds=fallback.timeout_seconds,
        unclaimed_seconds=fallback.unclaimed_seconds,
    )


def choose_backend(config: Config) -> ErofsLayers | None:
    """The EROFS backend when configured and the kernel can mount it, else None (per-file FUSE);
    one log line says which and why."""
    if config.fs.backend == "fuse":
        log.info("lazy layers are served by FUSE", extra={"why": "fs.backend = fuse"})
        return None
    supported, why = kernel_support(loop=config.fs.loop_devices)
    if not supported:
        log.warning(
            "lazy layers are served by FUSE: this kernel cannot serve them with EROFS", extra={"why": why}
        )
        return None
    log.info("lazy layers are served by the kernel (EROFS)", extra={"why": why})
    return ErofsLayers(config.root, loop_devices=config.fs.loop_devices, workers=config.fs.blob_workers)


def start_cri_proxy(config: Config, secrets: PullSecrets) -> ImageServiceProxy:
    """Bind the CRI image-service proxy's socket ``cri.listen`` (born 0600: root only)."""
    claim_socket_path(config.cri.listen)
    proxy = ImageServiceProxy(config.cri.containerd_socket, secrets)
    with private_umask():
        proxy.bind(config.cri.listen)
    return proxy


async def serve_manager(config: Config) -> None:
    """Serve lazy layers until SIGTERM/SIGINT, then unmount them all, or until SIGUSR2, then leave
    them to a successor. Everything that can fail is set up before the socket answers, so a daemon
    never adopts a manager that is dying."""
    lock = await asyncio.to_thread(_lock, config.root)
    pidfile = manager_pidfile(config.root)
    address = manager_socket(config.root)
    loop = asyncio.get_running_loop()
    calls = ThreadPoolExecutor(32, thread_name_prefix="lazysnap-manager")
    remote: RemoteLayers | None = None
    cri: ImageServiceProxy | None = None
    runner: web.AppRunner | None = None
    tasks: set[asyncio.Task[None]] = set()
    handover = False
    try:
        secrets = None
        if config.cri.enable:
            persist = config.root / "cri" / "credentials.json" if config.cri.persist_credentials else None
            secrets = await asyncio.to_thread(
                functools.partial(PullSecrets, persist, host_fallback=config.cri.secret_host_fallback)
            )
        sources = [secrets.lookup] if secrets is not None else []
        remote = await asyncio.to_thread(build_remote, config, loop, sources)
        await remote.start()  # take over the layers a previous manager left mounted
        metrics = Metrics()
        metrics.watch(remote.stats)
        remote.fs_observer = metrics.observe_fs
        if secrets is not None:
            try:
                cri = start_cri_proxy(config, secrets)
            except StartupError as exc:
                raise StartupError(f"cri.listen: {exc}") from None
            await cri.start()
        stop = asyncio.Event()

        async def hand_over() -> None:
            nonlocal handover
            # The mounts outlive this process only if the fd holder keeps the blob connection: make
            # sure it runs and has the fd (it may have been restarted), or refuse.
            if await asyncio.to_thread(remote.prepare_handover):
                handover = True
                stop.set()
            else:
                log.error(
                    "refusing to stop for a successor: lazy layers would not survive it; still serving",
                    extra={"backend": "fuse" if remote.erofs is None else "erofs"},
                )

        def on_sigusr2() -> None:
            if not stop.is_set():
                tasks.add(loop.create_task(hand_over()))

        # Installed before the pid file and the socket announce this process, so that no signal
        # sent to it finds the default action (for SIGUSR2: exit without handing anything over).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGUSR2: stop for a successor (an upgrade, a restart): EROFS-served layers stay mounted and
        # their blob connection stays with the fd holder; the next manager takes them over.
        loop.add_signal_handler(signal.SIGUSR2, on_sigusr2)
        # The daemon that started us may die; its terminal's SIGHUP must not take the mounts along.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        pidfile.write_text(f"{os.getpid()}\n")
        app = manager_app(remote, metrics, calls, manager_fingerprint(config), stop)
        runner = await serve_unix(app, address)
        log.info("FUSE manager serving", extra={"version": __version__, "address": str(address)})
        watchdog = loop.create_task(_watch(config, remote, stop))
        tasks.add(watchdog)
        await stop.wait()
        if handover:
            log.info("FUSE manager stopping for a successor: lazy layers stay mounted")
        else:
            log.info("FUSE manager stopping: unmounting every lazy layer")
    finally:
        for task in tasks:
            task.cancel()
        if runner is not None:
            await runner.cleanup()
        address.unlink(missing_ok=True)
        if cri is not None:
            await cri.stop(STOP_GRACE_SECONDS)
        if remote is not None:
            await remote.close(handover=handover)
        calls.shutdown(wait=False, cancel_futures=True)
        pidfile.unlink(missing_ok=True)
        # The lock stays held until this process has exited (cli exits at once after this): a
        # successor waiting for it must not start while threads of this one may still be ending.
        _HELD_UNTIL_EXIT.append(lock)
    log.info("FUSE manager stopped")


WATCH_INTERVAL_SECONDS = 1.0


async def _watch(config: Config, remote: RemoteLayers, stop: asyncio.Event) -> None:
    """Stop when nothing needs this process any more: its root was deleted (a test's or a node's
    state wiped), or no lazy layer has been mounted while no daemon ran for the configured time.
    A manager is only ever started by a daemon, so nothing else would stop it."""
    root = config.root
    identity = _root_identity(root)
    idle_since: float | None = None
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        await asyncio.sleep(WATCH_INTERVAL_SECONDS)
        gone = _root_identity(root) != identity
        if gone:
            log.warning("FUSE manager stopping: its root directory was removed", extra={"root": str(root)})
            stop.set()
            return
        idle = remote.mounted() == 0 and not await asyncio.to_thread(root_is_locked, root)
        if not idle:
            idle_since = None
            continue
        if idle_since is None:
            idle_since = loop.time()
        elif loop.time() - idle_since >= config.remote.manager_idle_exit_seconds:
            log.info("FUSE manager stopping: no lazy layer mounted and no daemon running")
            stop.set()
            return


def _root_identity(root: Path) -> tuple[int, int] | None:
    """The inodes of the root and of the manager's lock file in it. A wiped root changes them: a
    ``rm -rf`` that cannot remove the blob server's mount point inside it leaves the root itself
    in place, but not the lock file."""
    try:
        return os.stat(root).st_ino, os.stat(root / "fuse.lock").st_ino
    except OSError:
        return None
