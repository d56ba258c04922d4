"""Admin endpoint: a small HTTP server on a root-only unix socket, for operators and tests.

The daemon serves it on ``ROOT/admin.sock``; the FUSE manager serves the same routes (plus its
mount routes) on ``ROOT/fuse.sock``, and the daemon's answers come from the manager's.

``GET /stats`` returns JSON: lazy mounts, why layers were not served lazily, cache counters and,
per mounted layer, the bytes fetched on demand, by prefetch and in the background.
``GET /profile?image=REF`` returns the image's startup profile (files in first-read order) when
profile recording is on. ``GET /metrics`` serves Prometheus metrics, ``POST /cache/prune?
keep_bytes=N`` shrinks the chunk cache, and ``POST /log-level?level=debug`` changes the log level
of the running processes.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from snapshotter.config import LOG_LEVELS
from snapshotter.logsetup import set_level
from snapshotter.metrics import CONTENT_TYPE, Metrics
from snapshotter.ownership import private_umask

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.Response]]


def admin_socket(root: Path) -> Path:
    """Where the daemon with state directory ``root`` serves its admin endpoint."""
    return root / "admin.sock"


class AdminError(OSError):
    """The endpoint answered with an error; ``str()`` is its message, ``status`` its HTTP status."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0])


class LazyBackend(Protocol):
    """Where the lazy-layer answers come from: the FUSE manager (in-process, or over its socket)."""

    def stats(self) -> dict[str, Any]: ...
    # {"image", "manifest" (digest or ""), "files"}; AdminError(404) when none was recorded
    def profile(self, image: str) -> dict[str, Any]: ...
    def prune(self, keep_bytes: int) -> dict[str, Any]: ...
    def set_log_level(self, level: str) -> None: ...
    def metrics_text(self) -> str: ...


def admin_app(backend: LazyBackend | None, metrics: Metrics | None) -> web.Application:
    async def call(fn: Callable[[], Any]) -> web.Response:
        try:
            return web.json_response(await asyncio.to_thread(fn))
        except AdminError as exc:  # the FUSE manager answered with an error: pass it on
            return web.json_response({"error": str(exc)}, status=exc.status)
        except OSError as exc:
            return web.json_response({"error": f"the FUSE manager is unreachable: {exc}"}, status=503)

    def lazy_off() -> web.Response:
        return web.json_response({"error": "lazy pulling is off (remote.enabled = false)"}, status=409)

    async def stats(_: web.Request) -> web.Response:
        return await call(backend.stats) if backend is not None else web.json_response({})

    async def profile(request: web.Request) -> web.Response:
        if backend is None:
            return lazy_off()
        image = request.query.get("image", "")
        return await call(lambda: backend.profile(image))

    async def prune(request: web.Request) -> web.Response:
        if backend is None:
            return lazy_off()
        raw = request.query.get("keep_bytes", "0")
        if not raw.isdigit():
            return web.json_response({"error": f"keep_bytes {raw!r} is not a number of bytes"}, status=400)
        return await call(lambda: backend.prune(int(raw)))

    async def log_level(request: web.Request) -> web.Response:
        level = request.query.get("level", "")
        if level not in LOG_LEVELS:
            return web.json_response(
                {"error": f"level {level!r} is not one of {', '.join(LOG_LEVELS)}"}, status=400
            )
        set_level(level)
        log.warning("log level changed", extra={"level": level})
        if backend is None:
            return web.json_response({"level": level})

        def both() -> dict[str, str]:
            backend.set_log_level(level)
            return {"level": level}

        return await call(both)

    async def render(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(render_metrics, metrics, backend)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app = web.Application(client_max_size=16 << 20)
    app.router.add_get("/stats", stats)
    app.router.add_get("/profile", profile)
    app.router.add_post("/cache/prune", prune)
    app.router.add_post("/log-level", log_level)
    app.router.add_get("/metrics", render)
    return app


def render_metrics(metrics: Metrics | None, backend: LazyBackend | None) -> bytes:
    """This process's metrics, then the FUSE manager's; without the manager, ours alone."""
    own = metrics.render() if metrics is not None else b""
    if backend is None:
        return own
    try:
        return own + backend.metrics_text().encode()
    except OSError as exc:
        log.warning("FUSE manager metrics unavailable", extra={"error": str(exc)})
        return own


async def serve_unix(app: web.Application, address: Path) -> web.AppRunner:
    """Serve ``app`` on a unix socket that is root-only (0600) from its first instant."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    address.unlink(missing_ok=True)
    with private_umask():
        await web.UnixSite(runner, str(address)).start()
    return runner


async def start_admin(address: Path, backend: LazyBackend | None, metrics: Metrics | None) -> web.AppRunner:
    return await serve_unix(admin_app(backend, metrics), address)


async def start_metrics(address: str, metrics: Metrics, backend: LazyBackend | None) -> web.AppRunner:
    """Serve /metrics on ``HOST:PORT`` or ``unix:/path`` (config ``metrics.address``)."""

    async def handle(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(render_metrics, metrics, backend)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if address.startswith("unix:"):
        path = Path(address.removeprefix("unix:"))
        path.unlink(missing_ok=True)
        site = web.UnixSite(runner, str(path))
    else:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if not _is_loopback(host):
            log.warning(
                "metrics are served beyond this node with no authentication; they name images and "
                "layers. Prefer 127.0.0.1 or a unix socket behind an authenticating proxy",
                extra={"address": address},
            )
        site = web.TCPSite(runner, host, int(port))
    await site.start()
    return runner


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the client side (CLI, tests, the daemon talking to the FUSE manager) -------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def unix_request(
    address: Path, method: str, path: str, body: object = None, *, timeout: float = 10.0
) -> tuple[int, bytes]:
    """One HTTP request over a unix socket (blocking): (status, body). OSError when the endpoint
    is unreachable or its answer is not HTTP."""
    conn = _UnixHTTPConnection(address, timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {} if payload is None else {"Content-Type": "application/json"}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except http.client.HTTPException as exc:  # a peer that died mid-answer, or is not ours
        raise OSError(f"{address}: broken answer to {method} {path}: {exc!r}") from None
    finally:
        conn.close()


def admin_get(
    address: Path, path: str, timeout: float = 10.0, *, method: str = "GET", body: object = None
) -> dict[str, Any]:
    """Ask an admin endpoint for ``path`` and decode its JSON; AdminError carries its error."""
    status, raw = unix_request(address, method, path, body, timeout=timeout)
    if status != 200:
        try:
            message = str(json.loads(raw)["error"])
        except (ValueError, KeyError, TypeError):
            message = f"{address} answered {status}: {raw[:200]!r}"
        raise AdminError(message, status)
    try:
        result = json.loads(raw)
    except ValueError:
        raise OSError(f"{address}: {method} {path} answered with something other than JSON") from None
    if not isinstance(result, dict):
        raise OSError(f"{address}: {method} {path} answered with {type(result).__name__}, not an object")
    return result


def fetch_stats(address: Path, timeout: float = 10.0) -> dict[str, Any]:
    """GET /stats from a running daemon (blocking; for the CLI and tests)."""
    return admin_get(address, "/stats", timeout)


def fetch_profile(address: Path, image: str, timeout: float = 10.0) -> list[str]:
    """The startup profile of ``image`` from a running daemon; AdminError says why not."""
    return [str(f) for f in fetch_profile_doc(address, image, timeout)["files"]]


def fetch_profile_doc(address: Path, image: str, timeout: float = 10.0) -> dict[str, Any]:
    """The startup profile of ``image`` as the daemon answers it: ``image``, ``manifest`` (the
    digest it was recorded with, "" when unknown) and ``files``; AdminError says why not."""
    return admin_get(address, "/profile?" + urllib.parse.urlencode({"image": image}), timeout)


def set_log_level(address: Path, level: str, timeout: float = 10.0) -> None:
    """Change a running daemon's log level; AdminError says why not."""
    admin_get(address, "/log-level?" + urllib.parse.urlencode({"level": level}), timeout, method="POST")


def fetch_metrics(address: Path, timeout: float = 10.0) -> str:
    """The Prometheus text exposition from an admin socket."""
    status, raw = unix_request(address, "GET", "/metrics", timeout=timeout)
    if status != 200:
        raise AdminError(f"{address} answered {status} for /metrics: {raw[:200]!r}", status)
    return raw.decode()


def prune_cache(address: Path, keep_bytes: int = 0, timeout: float = 60.0) -> dict[str, Any]:
    """Ask a running daemon to shrink its chunk cache to ``keep_bytes``."""
    return admin_get(address, f"/cache/prune?keep_bytes={keep_bytes}", timeout, method="POST")
