"""Admin endpoint: a small HTTP server on a root-only unix socket, for operators and tests.

``GET /stats`` returns JSON: lazy mounts, why layers were not served lazily, cache counters and,
per mounted layer, the bytes fetched on demand, by prefetch and in the background.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web


def admin_socket(root: Path) -> Path:
    """Where the daemon with state directory ``root`` serves its admin endpoint."""
    return root / "admin.sock"


async def start_admin(address: Path, stats: Callable[[], dict[str, Any]]) -> web.AppRunner:
    async def handle_stats(_: web.Request) -> web.Response:
        return web.json_response(stats())

    app = web.Application()
    app.router.add_get("/stats", handle_stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    address.unlink(missing_ok=True)
    old_umask = os.umask(0o177)
    try:
        await web.UnixSite(runner, str(address)).start()
    finally:
        os.umask(old_umask)
    return runner


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def fetch_stats(address: Path, timeout: float = 10.0) -> dict[str, Any]:
    """GET /stats from a running daemon (blocking; for the CLI and tests)."""
    conn = _UnixHTTPConnection(address, timeout)
    try:
        conn.request("GET", "/stats")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"admin endpoint {address} answered {response.status}: {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result
    finally:
        conn.close()
