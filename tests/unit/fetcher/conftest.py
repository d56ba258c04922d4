"""A fake OCI registry (with token server) and a fake object store, served by aiohttp on 127.0.0.1.

Tests flip the registry's knobs (auth mode, range support, injected failures, redirects) and read
back what it received (``requests``), so each test states the server behaviour it exercises.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from snapshotter.fetcher import CredentialStore, HostsConfig, RegistryClient

Intercept = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_range_header(value: str, size: int) -> list[tuple[int, int]]:
    """Inclusive HTTP ranges → half-open pairs (the fake server only needs the a-b form)."""
    unit, _, spec = value.partition("=")
    assert unit.strip() == "bytes"
    out = []
    for item in spec.split(","):
        a, _, b = item.strip().partition("-")
        out.append((int(a), min(int(b), size - 1) + 1))
    return out


def multipart_body(
    data: bytes, ranges: list[tuple[int, int]], boundary: str, *, newline: bytes = b"\r\n"
) -> bytes:
    nl = newline
    chunks = []
    for start, end in ranges:
        chunks.append(
            b"--"
            + boundary.encode()
            + nl
            + b"Content-Type: application/octet-stream"
            + nl
            + f"Content-Range: bytes {start}-{end - 1}/{len(data)}".encode()
            + nl
            + nl
            + data[start:end]
            + nl
        )
    return b"".join(chunks) + b"--" + boundary.encode() + b"--" + nl


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, Any]
    headers: dict[str, str]


@dataclass
class FakeRegistry:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    token_requests: list[Seen] = field(default_factory=list)
    # auth: None, "bearer" or "basic"
    auth: str | None = None
    basic_user: tuple[str, str] | None = None  # required credentials (token realm or Basic)
    token_lifetime: int | None = 300
    tokens_issued: list[str] = field(default_factory=list)
    token_expired: set[str] = field(default_factory=set)
    # range behaviour: "multi", "reject400", "reject416", "first_only", "ignore", "single_only"
    ranges: str = "multi"
    boundary: str = "THIS_IS_THE_BOUNDARY"
    redirect_base: str | None = None  # blob GETs answer 307 to f"{redirect_base}/obj/{digest}?sig=N"
    redirects_issued: int = 0
    fail_statuses: list[int] = field(default_factory=list)  # consumed one per blob/manifest request
    intercept: Intercept | None = None
    base_url: str = ""

    @property
    def host(self) -> str:
        return self.base_url.removeprefix("http://")

    def add_blob(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, repo: str, media_type: str, doc: dict[str, Any], tag: str | None = None) -> str:
        body = json.dumps(doc).encode()
        digest = sha256(body)
        self.manifests[(repo, digest)] = (media_type, body)
        if tag:
            self.manifests[(repo, tag)] = (media_type, body)
        return digest

    def blob_requests(self) -> list[Seen]:
        return [r for r in self.requests if "/blobs/" in r.path]

    # -- handlers --------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            Seen(
                request.method, request.path, dict(request.query), {k: v for k, v in request.headers.items()}
            )
        )
        if self.intercept is not None:
            answer = await self.intercept(request)
            if answer is not None:
                return answer
        if request.path == "/v2/":
            return web.Response(status=200)
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        if self.fail_statuses:
            return web.Response(status=self.fail_statuses.pop(0), text="injected failure")
        m = re.fullmatch(r"/v2/(.+)/(blobs|manifests)/([^/]+)", request.path)
        if not m:
            return web.Response(status=404)
        repo, kind, obj = m.groups()
        if kind == "manifests":
            found = self.manifests.get((repo, obj))
            if found is None:
                return web.Response(status=404)
            return web.Response(body=found[1], headers={"Content-Type": found[0]})
        data = self.blobs.get(obj)
        if data is None:
            return web.Response(status=404)
        if self.redirect_base is not None and request.method == "GET":
            self.redirects_issued += 1
            return web.Response(
                status=307,
                headers={"Location": f"{self.redirect_base}/obj/{obj}?sig={self.redirects_issued}"},
            )
        return serve_ranges(request, data, self.ranges, self.boundary)

    def _check_auth(self, request: web.Request) -> web.Response | None:
        if self.auth is None:
            return None
        got = request.headers.get("Authorization", "")
        if self.auth == "basic":
            assert self.basic_user is not None
            want = "Basic " + base64.b64encode(":".join(self.basic_user).encode()).decode()
            if got == want:
                return None
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        token = got.removeprefix("Bearer ")
        if got.startswith("Bearer ") and token in self.tokens_issued and token not in self.token_expired:
            return None
        m = re.fullmatch(r"/v2/(.+)/(blobs|manifests)/.*", request.path)
        scope = f"repository:{m.group(1)}:pull" if m else ""
        challenge = f'Bearer realm="{self.base_url}/token",service="fake-registry",scope="{scope}"'
        if token in self.token_expired:
            challenge += ',error="invalid_token"'
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})

    async def handle_token(self, request: web.Request) -> web.Response:
        self.token_requests.append(
            Seen(
                request.method, request.path, dict(request.query), {k: v for k, v in request.headers.items()}
            )
        )
        if self.basic_user is not None:
            want = "Basic " + base64.b64encode(":".join(self.basic_user).encode()).decode()
            if request.headers.get("Authorization") != want:
                return web.Response(status=401)
        token = f"tok-{len(self.tokens_issued) + 1}"
        self.tokens_issued.append(token)
        answer: dict[str, Any] = {"access_token" if len(self.tokens_issued) % 2 else "token": token}
        if self.token_lifetime is not None:
            answer["expires_in"] = self.token_lifetime
        return web.json_response(answer)


def serve_ranges(request: web.Request, data: bytes, mode: str, boundary: str) -> web.Response:
    header = request.headers.get("Range")
    if header is None or mode == "ignore" or request.method == "HEAD":
        return web.Response(body=data, content_type="application/octet-stream")
    ranges = parse_range_header(header, len(data))
    if len(ranges) > 1:
        if mode == "reject400":
            return web.Response(status=400, text="multi-range not supported")
        if mode == "reject416":
            return web.Response(status=416)
        if mode == "first_only":
            ranges = ranges[:1]
        if mode == "ignore_multi":
            return web.Response(body=data, content_type="application/octet-stream")
    if len(ranges) == 1:
        start, end = ranges[0]
        if start >= len(data):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        return web.Response(
            status=206,
            body=data[start:end],
            headers={
                "Content-Range": f"bytes {start}-{end - 1}/{len(data)}",
                "Content-Type": "application/octet-stream",
            },
        )
    return web.Response(
        status=206,
        body=multipart_body(data, ranges, boundary),
        headers={"Content-Type": f"multipart/byteranges; boundary={boundary}"},
    )


@dataclass
class ObjectStore:
    """A presigned-URL store: ``sig`` values below ``valid_from`` are expired (403)."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    valid_from: int = 0
    ranges: str = "multi"

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Seen(
                request.method, request.path, dict(request.query), {k: v for k, v in request.headers.items()}
            )
        )
        if "Authorization" in request.headers:
            return web.Response(status=400, text="Authorization must not reach the object store")
        if int(request.query.get("sig", "0")) < self.valid_from:
            return web.Response(status=403, text="Request has expired")
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return web.Response(status=404)
        return serve_ranges(request, data, self.ranges, "S3BOUNDARY")


async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    reg = FakeRegistry()
    app = web.Application()
    app.router.add_route("GET", "/token", reg.handle_token)
    app.router.add_route("POST", "/token", reg.handle_token)
    app.router.add_route("*", "/{tail:.*}", reg.handle)
    async for host in _serve(app):
        reg.base_url = f"http://{host}"
        yield reg


@pytest.fixture
async def object_store() -> AsyncIterator[tuple[ObjectStore, str]]:
    store = ObjectStore()
    app = web.Application()
    app.router.add_route("GET", "/obj/{digest}", store.handle)
    async for host in _serve(app):
        yield store, f"http://{host}"


def make_client(
    hosts: HostsConfig | None = None, credentials: CredentialStore | None = None, **options: Any
) -> RegistryClient:
    """A client with no certs.d directory, no credentials and near-zero backoff, for fast tests."""
    options.setdefault("retry_base_delay", 0.001)
    options.setdefault("retry_max_delay", 0.01)
    options.setdefault("timeout", 5.0)
    return RegistryClient(hosts or HostsConfig(None), credentials or CredentialStore(), **options)
