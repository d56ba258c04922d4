"""Registry faults for e2e tests: an HTTP reverse proxy that breaks some blob requests on purpose,
and a lazily pullable test image with many files and chunks to read through it.

``FaultProxy`` listens on 127.0.0.1 (aiohttp's low-level server, in its own event loop in a thread,
like ``CountingProxy`` and ``benchmarks/shaping_proxy.py``) and forwards to the real registry.
Each *eligible* request (a blob GET; manifest GETs too with ``include_manifests``; only from
clients whose User-Agent contains ``target_user_agent`` when that is set, so that containerd's own
pulls are left alone) may be answered with a fault instead:

=================  ==================================================================================
``http_5xx``       500, 502 or 503
``reset``          the headers and part of the body, then a TCP reset (SO_LINGER 0)
``stall``          nothing at all: the response is held until the client gives up (or the proxy stops)
``ignore_range``   200 with the whole blob, as a server that ignores ``Range`` does
``wrong_range``    206 for other bytes than asked for: every range shifted, and ``Content-Range`` says
                   so (the honest answer of a confused server or cache)
``short_body``     ``Content-Length`` announces the whole body, part of it is sent, then the
                   connection is closed cleanly
``unauthorized``   401 with a Bearer challenge whose realm is this proxy's ``/token``, as a registry
                   does when a token expired; never for a token younger than ``min_credential_age``
``forbidden``      403 from a redirect target, as an expired presigned URL does (``redirect`` mode
                   only); never for a URL younger than ``min_credential_age``
``mislabeled``     opt-in, not a transport fault: 206 whose ``Content-Range`` claims the requested
                   range over the bytes of a shifted one (a lying server: only digests can tell)
=================  ==================================================================================

``unauthorized`` and ``forbidden`` respect ``min_credential_age`` because a credential that was just
renewed cannot have expired: a client that renews and retries must not be refused again by chance.

With ``redirect=True`` a blob GET to the registry path is answered ``307`` to
``/_store/<repository>/blobs/<digest>?sig=N`` on this proxy (like an object store's presigned URL),
which serves the bytes. Faults then hit the data requests (``/_store``) and the registry requests
that resolve them. ``unauthorized`` applies to registry requests only, ``forbidden`` to
``/_store`` only.

Which requests fail is deterministic for a given ``seed`` and request order: with
``stratified=True`` (the default) exactly one request in each window of ``round(1 / rate)``
eligible requests is faulted, at a position drawn from the seeded RNG; with ``stratified=False``
each request is faulted with probability ``rate``. The kind is chosen by smooth weighted
round-robin over the enabled kinds that apply to the request (weights = the per-kind rates), one
rotation for registry requests and one for ``/_store`` requests, so that every kind of a mix comes
up once per rotation. ``enable(kind, False)`` switches one kind off at runtime.

``path_contains``, when set, makes only requests whose path contains it eligible (say, one blob's
digest: a registry that fails for one layer).

``away(seconds)`` refuses every connection (stops listening and aborts open connections) for a
while, then listens again on the same port; ``go_away()`` / ``come_back()`` do it by hand.

``lossy(p)`` models a lossy path instead of whole-request faults: every eligible response that is
served normally is sent in pieces of ``piece_bytes`` (64 KiB) of body, each once the one before
has left the proxy's socket, and for each piece, with chance ``p``, the proxy sends a random part
of it (possibly none) and resets the connection. The
draws come from an RNG of their own, seeded from ``seed``, so a run is reproducible for a given
request order. ``counts()["piece_resets"]`` says how many connections it cut. Bytes still queued
in the proxy's socket when it resets a connection are dropped by the reset and are not counted as
served: what is counted is what reached the client.

Everything is counted (``counts()``) and every request is recorded (``events``) and logged on the
``tests.faults`` logger.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import random
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from snapshotter.formats import build_estargz
from tests.support import mounts, oci

log = logging.getLogger("tests.faults")

HTTP_5XX = "http_5xx"
RESET = "reset"
STALL = "stall"
IGNORE_RANGE = "ignore_range"
WRONG_RANGE = "wrong_range"
SHORT_BODY = "short_body"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
MISLABELED = "mislabeled"
#: The transport faults a registry or CDN produces (``away`` is separate: see ``FaultProxy.away``).
TRANSPORT_KINDS = (HTTP_5XX, RESET, STALL, IGNORE_RANGE, WRONG_RANGE, SHORT_BODY, UNAUTHORIZED, FORBIDDEN)
ALL_KINDS = (*TRANSPORT_KINDS, MISLABELED)

_BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_STORE_PATH = re.compile(r"^/_store/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_MANIFEST_PATH = re.compile(r"^/v2/(?P<name>.+)/manifests/[^/]+$")
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Authorization",
    )
)
_REALM_SERVICE = "lazysnap-fault-proxy"
_SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes in a socket's send queue not yet sent


@dataclass(frozen=True)
class ProxyEvent:
    """One request the proxy answered."""

    t: float  # time.monotonic() when it arrived
    method: str
    path: str
    range: str  # the Range header as received ("" if none)
    user_agent: str
    eligible: bool
    fault: str  # the fault kind, "" if served normally
    status: int  # what the client was told (0: nothing, stalled or reset before headers)


@dataclass
class _Plan:
    rates: dict[str, float] = field(default_factory=dict)
    enabled: set[str] = field(default_factory=set)
    stratified: bool = True

    @property
    def rate(self) -> float:
        return min(1.0, sum(self.rates[k] for k in self.enabled if k in self.rates))


def _parse_ranges(header: str) -> list[tuple[int, int]] | None:
    """``bytes=a-b,c-d`` as inclusive (a, b) pairs; None if absent or not of that simple form."""
    if not header.startswith("bytes="):
        return None
    out = []
    for part in header[len("bytes=") :].split(","):
        first, sep, last = part.strip().partition("-")
        if not sep or not first.isdigit() or not last.isdigit():
            return None
        out.append((int(first), int(last)))
    return out or None


def _range_header(ranges: Iterable[tuple[int, int]]) -> str:
    return "bytes=" + ",".join(f"{a}-{b}" for a, b in ranges)


class FaultProxy:
    """See the module docstring. ``upstream`` is the registry's ``127.0.0.1:PORT``."""

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        target_user_agent: str | None = None,
        include_manifests: bool = False,
        redirect: bool = False,
        stall_seconds: float = 600.0,
        min_credential_age: float = 1.0,
    ) -> None:
        self.upstream = upstream
        self.target_user_agent = target_user_agent
        self.include_manifests = include_manifests
        self.redirect = redirect
        self.stall_seconds = stall_seconds
        self.path_contains = ""  # when set, only requests whose path contains it are eligible
        self.min_credential_age = min_credential_age
        self.codes_5xx: tuple[int, ...] = (500, 502, 503)  # what ``http_5xx`` answers, drawn by the RNG
        self.port = 0
        self.events: list[ProxyEvent] = []
        self._lock = threading.Lock()  # plan and counters: set from the test thread, used on the loop
        self._random = random.Random(seed)
        self._loss_random = random.Random(f"loss-{seed}")
        self.piece_loss = 0.0  # see lossy()
        self.piece_bytes = 64 << 10
        self._plan = _Plan()
        self._window: list[bool] = []  # stratified: the remaining verdicts of the current window
        self._current: dict[str, dict[str, float]] = {"registry": {}, "store": {}}  # round-robin state
        self._counts: collections.Counter[str] = collections.Counter()
        self._faults: collections.Counter[str] = collections.Counter()
        self._tokens: dict[str, float] = {}  # token -> when issued
        self._urls: dict[str, float] = {}  # redirect sig -> when issued
        self._serial = 0
        self._away = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._web: web.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stalls: set[asyncio.Event] = set()
        self._come_back: asyncio.TimerHandle | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        """Stop listening, release stalls, close every connection (idempotent)."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._stop(), timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=120),
        )
        self._web = web.Server(self._handle, access_log=None)
        await self._listen()

    async def _listen(self) -> None:
        assert self._web is not None
        self._server = await self._loop.create_server(self._web, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._come_back is not None:
            self._come_back.cancel()
        await self._unlisten()
        if self._web is not None:
            await self._web.shutdown(2)
        if self._session is not None:
            await self._session.close()

    async def _unlisten(self) -> None:
        """Stop accepting and abort every open connection (and what it is stalled on)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for ev in list(self._stalls):
            ev.set()
        if self._web is not None:
            for handler in list(self._web.connections):
                if handler.transport is not None:
                    _reset(handler.transport)
        if server is not None:  # (Python >= 3.12 waits for the connections here too)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    # -- configuration (thread-safe) -------------------------------------------------------------

    def configure(self, rates: Mapping[str, float], *, stratified: bool = True) -> None:
        """Fault eligible requests at these per-kind rates (their sum is the overall rate)."""
        unknown = set(rates) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {ALL_KINDS}")
        with self._lock:
            self._plan = _Plan({k: v for k, v in rates.items() if v > 0}, set(rates), stratified)
            self._window = []
            self._current = {"registry": {}, "store": {}}

    def mix(self, rate: float, kinds: Sequence[str] = TRANSPORT_KINDS, *, stratified: bool = True) -> None:
        """Fault ``rate`` of eligible requests, the kinds taking equal turns."""
        self.configure({k: rate / len(kinds) for k in kinds}, stratified=stratified)

    def fail_all(self, kind: str) -> None:
        """Every eligible request (that the kind applies to) gets ``kind``."""
        self.configure({kind: 1.0})

    def lossy(self, p: float, piece_bytes: int = 64 << 10) -> None:
        """Cut responses as a lossy path does (see the module docstring); ``lossy(0)`` stops."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"loss rate {p} is not in [0, 1)")
        with self._lock:
            self.piece_loss, self.piece_bytes = p, piece_bytes

    def clear(self) -> None:
        """No more faults; stalled responses stay held until their client gives up."""
        self.configure({})

    def enable(self, kind: str, on: bool = True) -> None:
        """The runtime switch of one kind of the current plan."""
        with self._lock:
            (self._plan.enabled.add if on else self._plan.enabled.discard)(kind)
            self._window = []

    def release_stalls(self) -> None:
        """Reset the connections of every response held by a ``stall`` now."""
        self._loop.call_soon_threadsafe(lambda: [ev.set() for ev in list(self._stalls)])

    def go_away(self) -> None:
        """The registry is gone: connections are refused, open ones reset, until ``come_back``."""
        self._away = True
        self._call(self._unlisten())
        log.info("fault proxy away: refusing connections on %s", self.host)

    def come_back(self) -> None:
        self._call(self._back())

    async def _back(self) -> None:
        if self._come_back is not None:
            self._come_back.cancel()
            self._come_back = None
        if self._server is None:
            await self._listen()
        self._away = False
        log.info("fault proxy back on %s", self.host)

    def away(self, seconds: float) -> None:
        """Go away now and come back by itself after ``seconds``."""
        self.go_away()

        def back() -> None:
            self._come_back = None
            self._loop.create_task(self._back())

        def schedule() -> None:
            self._come_back = self._loop.call_later(seconds, back)

        self._loop.call_soon_threadsafe(schedule)

    @property
    def is_away(self) -> bool:
        return self._away

    # -- observations (thread-safe) --------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """``requests``, ``eligible``, ``redirects``, ``tokens``, ``bytes_served`` (body bytes sent,
        all requests), ``blob_bytes_served``, ``piece_resets`` and ``faults`` (by kind)."""
        with self._lock:
            return {**self._counts, "faults": dict(self._faults)}

    def reset_counts(self) -> dict[str, Any]:
        with self._lock:
            counts = {**self._counts, "faults": dict(self._faults)}
            self._counts.clear()
            self._faults.clear()
            self.events = []
        return counts

    def faulted(self) -> list[ProxyEvent]:
        with self._lock:
            return [e for e in self.events if e.fault]

    # -- request handling ------------------------------------------------------------------------

    def _eligible(self, request: web.BaseRequest) -> bool:
        if request.method != "GET":
            return False
        path = request.path
        if not (
            _BLOB_PATH.match(path)
            or _STORE_PATH.match(path)
            or (self.include_manifests and _MANIFEST_PATH.match(path))
        ):
            return False
        if self.path_contains and self.path_contains not in path:
            return False
        ua = request.headers.get("User-Agent", "")
        return self.target_user_agent is None or self.target_user_agent in ua

    def _applies(self, kind: str, request: web.BaseRequest, store: bool) -> bool:
        ranges = _parse_ranges(request.headers.get("Range", ""))
        if kind == UNAUTHORIZED:
            if store:
                return False
            auth = request.headers.get("Authorization", "")
            issued = self._tokens.get(auth.removeprefix("Bearer "))
            return issued is None or time.monotonic() - issued >= self.min_credential_age
        if kind == FORBIDDEN:
            issued = self._urls.get(request.query.get("sig", ""))
            return store and issued is not None and time.monotonic() - issued >= self.min_credential_age
        if kind in (IGNORE_RANGE, WRONG_RANGE):
            return ranges is not None
        if kind == MISLABELED:
            return ranges is not None and len(ranges) == 1
        return True

    def _decide(self, request: web.BaseRequest, store: bool) -> str:
        """The fault for this eligible request, or ""; called under the lock."""
        plan = self._plan
        rate = plan.rate
        if rate <= 0:
            return ""
        if plan.stratified:
            if not self._window:
                size = max(1, round(1 / rate))
                hit = self._random.randrange(size)
                self._window = [i == hit for i in range(size)]
            if not self._window.pop(0):
                return ""
        elif self._random.random() >= rate:
            return ""
        kinds = [k for k in ALL_KINDS if k in plan.enabled and k in plan.rates]
        candidates = [k for k in kinds if self._applies(k, request, store)]
        if not candidates:
            return ""
        # Smooth weighted round-robin (nginx): every kind gets its turn, in proportion to its rate.
        current = self._current["store" if store else "registry"]
        total = 0.0
        for k in candidates:
            current[k] = current.get(k, 0.0) + plan.rates[k]
            total += plan.rates[k]
        chosen = max(candidates, key=lambda k: current[k])
        current[chosen] -= total
        return chosen

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        eligible = self._eligible(request)
        store = _STORE_PATH.match(request.path) is not None
        with self._lock:
            self._counts["requests"] += 1
            if eligible:
                self._counts["eligible"] += 1
            fault = self._decide(request, store) if eligible else ""
            if fault:
                self._faults[fault] += 1
        status = 0
        try:
            if request.path == "/token":
                resp = self._token(request)
            elif fault:
                log.info(
                    "fault %s for %s %s (Range: %s)",
                    fault,
                    request.method,
                    request.path,
                    request.headers.get("Range", "-"),
                )
                resp = await self._fault(fault, request, store)
            elif self.redirect and eligible and not store and _BLOB_PATH.match(request.path):
                resp = self._redirect(request)
            elif eligible and self.piece_loss > 0:
                resp = await self._lossy(request, store)
            else:
                resp = await self._forward(request, store)
            status = resp.status
            return resp
        finally:
            with self._lock:
                self.events.append(
                    ProxyEvent(
                        started,
                        request.method,
                        request.path,
                        request.headers.get("Range", ""),
                        request.headers.get("User-Agent", ""),
                        eligible,
                        fault,
                        status if fault not in (STALL, RESET) else 0,
                    )
                )

    def _token(self, request: web.BaseRequest) -> web.Response:
        with self._lock:
            self._serial += 1
            token = f"tok-{self._serial}-{self._random.getrandbits(32):08x}"
            self._tokens[token] = time.monotonic()
            self._counts["tokens"] += 1
        return web.json_response({"token": token, "expires_in": 3600})

    def _redirect(self, request: web.BaseRequest) -> web.Response:
        m = _BLOB_PATH.match(request.path)
        assert m is not None
        with self._lock:
            self._serial += 1
            sig = f"{self._serial}-{self._random.getrandbits(32):08x}"
            self._urls[sig] = time.monotonic()
            self._counts["redirects"] += 1
        location = f"http://{self.host}/_store/{m['name']}/blobs/{m['digest']}?sig={sig}"
        return web.Response(status=307, headers={"Location": location})

    def _upstream_path(self, request: web.BaseRequest, store: bool) -> str:
        if store:
            m = _STORE_PATH.match(request.path)
            assert m is not None
            return f"/v2/{m['name']}/blobs/{m['digest']}"
        return request.raw_path

    async def _fetch(
        self, request: web.BaseRequest, store: bool, range_header: str | None
    ) -> tuple[int, list[tuple[str, str]], bytes, str | None]:
        """Ask the registry: status, end-to-end headers, body, Content-Length. ``range_header``
        None drops the client's Range, "" keeps it, anything else replaces it."""
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers.pop("Range", None)
        wanted = request.headers.get("Range") if range_header == "" else range_header
        if wanted:
            headers["Range"] = wanted
        body = await request.read()
        url = f"http://{self.upstream}{self._upstream_path(request, store)}"
        async with self._session.request(
            request.method, url, headers=headers, data=body or None, allow_redirects=False
        ) as up:
            data = await up.read()
            out = [(k, v) for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP]
            return up.status, out, data, up.headers.get("Content-Length")

    def _count_body(self, request: web.BaseRequest, n: int) -> None:
        with self._lock:
            self._counts["bytes_served"] += n
            if _BLOB_PATH.match(request.path) or _STORE_PATH.match(request.path):
                self._counts["blob_bytes_served"] += n

    async def _forward(self, request: web.BaseRequest, store: bool) -> web.StreamResponse:
        status, headers, data, length = await self._fetch(request, store, "")
        if request.method == "HEAD":
            # No body, but the registry's Content-Length (clients read sizes from HEAD).
            head = web.StreamResponse(status=status)
            for k, v in headers:
                head.headers.add(k, v)
            if length is not None:
                head.headers["Content-Length"] = length
            return head
        self._count_body(request, len(data))
        resp = web.Response(status=status, body=data)
        for k, v in headers:
            resp.headers.add(k, v)
        return resp

    async def _lossy(self, request: web.BaseRequest, store: bool) -> web.StreamResponse:
        """Forward, sending the body piece by piece; cut the connection inside a piece with
        chance ``piece_loss`` per piece."""
        status, headers, data, _ = await self._fetch(request, store, "")
        resp = web.StreamResponse(status=status)
        for k, v in headers:
            resp.headers.add(k, v)
        resp.content_length = len(data)
        await resp.prepare(request)
        size = self.piece_bytes
        for at in range(0, len(data), size):
            piece = data[at : at + size]
            with self._lock:
                cut = self._loss_random.random() < self.piece_loss
                part = self._loss_random.randrange(len(piece)) if cut else len(piece)
                self._counts["piece_resets"] += cut
            if part:
                await resp.write(piece[:part])
                self._count_body(request, part)
            transport = request.transport
            if transport is not None:
                # A piece is cut while it is on the way, not while it waits in our socket: send
                # the next one only when this one has left.
                await _sent(transport)
                if cut:
                    # A reset drops what is still queued (if the client stopped reading): it never
                    # reached the client, so it does not count as served.
                    self._count_body(request, -_unsent(transport))
                    _reset(transport)
            if cut:
                log.debug("piece reset for %s after %d body bytes", request.path, at + part)
                return resp
        return resp

    async def _fault(self, kind: str, request: web.BaseRequest, store: bool) -> web.StreamResponse:
        if kind == HTTP_5XX:
            with self._lock:
                code = self._random.choice(self.codes_5xx)
            return web.Response(status=code, text=f"injected {code}\n")
        if kind == UNAUTHORIZED:
            m = _BLOB_PATH.match(request.path) or _MANIFEST_PATH.match(request.path)
            scope = f"repository:{m['name']}:pull" if m else ""
            challenge = f'Bearer realm="http://{self.host}/token",service="{_REALM_SERVICE}",scope="{scope}"'
            return web.Response(status=401, text="token expired\n", headers={"WWW-Authenticate": challenge})
        if kind == FORBIDDEN:
            return web.Response(
                status=403, text="<Error><Code>AccessDenied</Code>Request has expired</Error>"
            )
        if kind == STALL:
            return await self._stall(request)
        if kind == IGNORE_RANGE:
            status, headers, data, _ = await self._fetch(request, store, None)
            self._count_body(request, len(data))
            resp = web.Response(status=status, body=data)
            for k, v in headers:
                resp.headers.add(k, v)
            return resp
        if kind in (WRONG_RANGE, MISLABELED):
            return await self._shifted(kind, request, store)
        if kind in (RESET, SHORT_BODY):
            return await self._cut(kind, request, store)
        raise AssertionError(kind)

    async def _stall(self, request: web.BaseRequest) -> web.StreamResponse:
        released = asyncio.Event()
        self._stalls.add(released)
        try:
            deadline = self._loop.time() + self.stall_seconds
            transport = request.transport
            # Held until the client hangs up (aiohttp does not cancel handlers for that), the
            # proxy is released or stopped, or stall_seconds pass.
            while self._loop.time() < deadline and not released.is_set():
                if transport is None or transport.is_closing():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(released.wait(), 0.05)
        finally:
            self._stalls.discard(released)
        if request.transport is not None:
            _reset(request.transport)
        return web.Response(status=504)  # never reaches the client: its connection is gone

    async def _shifted(self, kind: str, request: web.BaseRequest, store: bool) -> web.StreamResponse:
        ranges = _parse_ranges(request.headers.get("Range", ""))
        assert ranges is not None
        with self._lock:
            k = self._random.randint(1, 4096)
        first = ranges[0][0]
        delta = -min(first, k) if first > 0 else 1
        shifted = [(a + delta, b + delta) for a, b in ranges]
        status, headers, data, _ = await self._fetch(request, store, _range_header(shifted))
        resp = web.Response(status=status, body=data)
        for name, value in headers:
            if kind == MISLABELED and name.lower() == "content-range" and len(ranges) == 1:
                # Claim the range that was asked for, over the bytes of the shifted one.
                total = value.rpartition("/")[2]
                value = f"bytes {ranges[0][0]}-{ranges[0][0] + len(data) - 1}/{total}"
            resp.headers.add(name, value)
        self._count_body(request, len(data))
        return resp

    async def _cut(self, kind: str, request: web.BaseRequest, store: bool) -> web.StreamResponse:
        status, headers, data, _ = await self._fetch(request, store, "")
        resp = web.StreamResponse(status=status)
        for k, v in headers:
            resp.headers.add(k, v)
        resp.content_length = len(data)
        await resp.prepare(request)
        part = data[: max(1, len(data) // 2)] if len(data) > 1 else b""
        if part:
            await resp.write(part)
        self._count_body(request, len(part))
        transport = request.transport
        if transport is not None:
            await _flushed(transport)
            if kind == RESET:
                _reset(transport)
            else:
                transport.close()
        return resp


async def _flushed(transport: asyncio.Transport) -> None:
    """Let what was written reach the socket first, so that the client really sees part of a body
    (gives up after a second: a client that stopped reading must not hold the proxy)."""
    for _ in range(100):
        if transport.get_write_buffer_size() == 0:
            return
        await asyncio.sleep(0.01)


async def _sent(transport: asyncio.Transport) -> None:
    """Wait until what was written has left the socket (gives up after about a second)."""
    await _flushed(transport)
    for _ in range(200):
        if not _unsent(transport):
            return
        await asyncio.sleep(0.005)


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes written to the socket and not sent yet (Linux's SIOCOUTQNSD; 0 where unsupported)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    queued = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, queued)
    except OSError:
        return 0
    return queued[0]


def _reset(transport: asyncio.BaseTransport) -> None:
    """Abort with a TCP RST rather than a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        transport.abort()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# A test image with many files over several layers and chunks
# --------------------------------------------------------------------------------------------------

FAULT_REPO = "lztest/faults"
FAULT_TAG = "esgz"
CHUNK_SIZE = 512 << 10
SMALL_FILES = 100  # per layer: each is one chunk, so one range request when read


@dataclass(frozen=True)
class FaultImage:
    """An eStargz image in the session registry: ``ref`` is ``repo:tag`` (prefix a host).

    ``layers[i]`` lists the data files of layer i (layer 0 is busybox), ``sha256`` maps every data
    file to its content hash, ``layer_digests[i]`` is layer i's blob digest and
    ``blob_sizes[digest]`` its size."""

    ref: str
    layers: tuple[tuple[str, ...], ...]
    sha256: dict[str, str]
    sizes: dict[str, int]
    layer_digests: tuple[str, ...]
    blob_sizes: dict[str, int]
    tocs: dict[str, bytes]  # layer digest -> TOC JSON
    toc_offsets: dict[str, int]  # layer digest -> where its TOC starts (the end of its chunks)

    def chunk_extents(self, files: Iterable[str]) -> dict[tuple[str, int], int]:
        """The compressed streams (layer digest, offset) -> size holding these files' bytes: what a
        lazy reader must fetch to read them whole, each once."""
        wanted = {f.lstrip("/") for f in files}
        out: dict[tuple[str, int], int] = {}
        for digest, raw in self.tocs.items():
            entries = json.loads(raw)["entries"]
            offsets = sorted({e["offset"] for e in entries if e.get("offset")})
            ends = dict(zip(offsets, [*offsets[1:], self.toc_offsets[digest]], strict=True))
            for e in entries:
                if e["name"] in wanted and e["type"] in ("reg", "chunk") and e.get("offset"):
                    out[(digest, e["offset"])] = ends[e["offset"]] - e["offset"]
        return out


_cache: dict[str, FaultImage] = {}
_cache_lock = threading.Lock()


def fault_image(registry_host: str) -> FaultImage:
    """Build and push (once per registry) the image the fault tests read: busybox, then three layers
    of 100 small files (4-40 KiB) and one file of several 512 KiB chunks each, all incompressible."""
    with _cache_lock:
        if registry_host not in _cache:
            _cache[registry_host] = _build(registry_host)
        return _cache[registry_host]


def _build(registry_host: str) -> FaultImage:
    base: list[oci.Entry] = [
        *oci.busybox_entries(("sh", "cat", "sha256sum", "dd", "ls", "time")),
        oci.Dir("/etc"),
        oci.Dir("/tmp", mode=0o1777),
    ]
    layers: list[list[oci.Entry]] = [base]
    names: list[tuple[str, ...]] = [()]
    contents: dict[str, bytes] = {}
    big_sizes = {1: 3 << 20, 2: (5 << 20) // 2, 3: (3 << 20) // 2}
    for n in (1, 2, 3):
        layer: list[oci.Entry] = [oci.Dir(f"/l{n}")]
        files = []
        for i in range(SMALL_FILES):
            path = f"/l{n}/s{i:03d}"
            size = 4096 + (i * 7919 + n * 104729) % (36 << 10)
            contents[path] = oci.pseudo_random(size, path.encode())
            files.append(path)
        big = f"/l{n}/big.bin"
        contents[big] = oci.pseudo_random(big_sizes[n], big.encode())
        files.append(big)
        layer += [oci.File(p, contents[p]) for p in files]
        layers.append(layer)
        names.append(tuple(files))

    built_layers = []

    def encode(raw: bytes) -> oci.EncodedLayer:
        built = build_estargz(raw, chunk_size=CHUNK_SIZE, compression_level=1)
        built_layers.append(built)
        return oci.EncodedLayer(built.blob, built.media_type, built.annotations, built.diff_id)

    workdir = Path(tempfile.mkdtemp(prefix="lzf", dir="/tmp"))
    try:
        image = oci.build_layout(workdir / "layout", layers, tag=FAULT_TAG, cmd=["/bin/sh"], encode=encode)
        oci.push(image.layout_dir, FAULT_TAG, registry_host, FAULT_REPO)
    finally:
        if not mounts.unmount_all(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    digests = tuple(b.digest for b in image.layers)
    return FaultImage(
        ref=f"{FAULT_REPO}:{FAULT_TAG}",
        layers=tuple(names),
        sha256={p: hashlib.sha256(d).hexdigest() for p, d in contents.items()},
        sizes={p: len(d) for p, d in contents.items()},
        layer_digests=digests,
        blob_sizes={b.digest: b.size for b in image.layers},
        tocs={d: b.toc_json for d, b in zip(digests, built_layers, strict=True)},
        toc_offsets={d: b.toc_offset for d, b in zip(digests, built_layers, strict=True)},
    )


LOSSY_REPO = "lztest/lossy"
LOSSY_FILE = "/data/big.bin"
LOSSY_SIZE = 48 << 20
_lossy_cache: dict[str, FaultImage] = {}


def lossy_content() -> bytes:
    """The bytes of ``LOSSY_FILE``: incompressible, every byte a function of its position."""
    return hashlib.shake_256(b"lazysnap-lossy-link").digest(LOSSY_SIZE)


def lossy_image(registry_host: str) -> FaultImage:
    """Build and push (once per registry) an eStargz image with busybox and one layer holding
    ``LOSSY_FILE`` (48 MiB in 512 KiB chunks), for reading over a lossy link."""
    with _cache_lock:
        if registry_host not in _lossy_cache:
            _lossy_cache[registry_host] = _build_lossy(registry_host)
        return _lossy_cache[registry_host]


def _build_lossy(registry_host: str) -> FaultImage:
    base: list[oci.Entry] = [
        *oci.busybox_entries(("sh",)),
        oci.Dir("/tmp", mode=0o1777),
    ]
    content = lossy_content()
    data: list[oci.Entry] = [oci.Dir("/data"), oci.File(LOSSY_FILE, content)]
    built_layers = []

    def encode(raw: bytes) -> oci.EncodedLayer:
        built = build_estargz(raw, chunk_size=CHUNK_SIZE, compression_level=1)
        built_layers.append(built)
        return oci.EncodedLayer(built.blob, built.media_type, built.annotations, built.diff_id)

    workdir = Path(tempfile.mkdtemp(prefix="lzl", dir="/tmp"))
    try:
        layout = workdir / "layout"
        image = oci.build_layout(layout, [base, data], tag=FAULT_TAG, cmd=["/bin/sh"], encode=encode)
        oci.push(image.layout_dir, FAULT_TAG, registry_host, LOSSY_REPO)
    finally:
        if not mounts.unmount_all(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    digests = tuple(b.digest for b in image.layers)
    return FaultImage(
        ref=f"{LOSSY_REPO}:{FAULT_TAG}",
        layers=((), (LOSSY_FILE,)),
        sha256={LOSSY_FILE: hashlib.sha256(content).hexdigest()},
        sizes={LOSSY_FILE: len(content)},
        layer_digests=digests,
        blob_sizes={b.digest: b.size for b in image.layers},
        tocs={d: b.toc_json for d, b in zip(digests, built_layers, strict=True)},
        toc_offsets={d: b.toc_offset for d, b in zip(digests, built_layers, strict=True)},
    )


def parse_sha256sum(output: str) -> dict[str, str]:
    """``sha256sum`` output as {path: hex}."""
    out = {}
    for line in output.splitlines():
        digest, _, path = line.partition("  ")
        if path:
            out[path] = digest
    return out
