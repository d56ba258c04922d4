"""The HTTP transport under the registry client: one aiohttp session, auth, retries, endpoint health.

Every request goes through ``Transport.request``, which
- never follows redirects (callers decide, so credentials never follow a redirect off-host),
- adds the endpoint's hosts.toml headers and Authorization only for registry endpoints,
- answers 401 challenges once per attempt (see auth.py),
- retries transient failures (connection errors, timeouts, 429/5xx, short or malformed bodies)
  with capped exponential backoff and jitter, and turns the last one into a FetchError,
- sends requests on a registry's behalf (redirect targets, token realms) only where
  redirects.py allows, through a session whose resolver refuses local addresses when the
  registry is not on one itself.

A resumable request (a range read) carries a ``Progress``: the bytes it has kept across attempts.
Its retry budget counts attempts *without progress*: an attempt that kept bytes (a response cut
after part of its body) is followed at once by one that asks for the rest, and the budget starts
over. It gives up after ``max_retries + 1`` attempts in a row that kept nothing, when nothing has
arrived for ``progress_timeout`` seconds, or at once on a permanent error (404, 401/403, 416...).

It also remembers per-endpoint health (a failing mirror is tried last for a while), per-host
range support (multi-range, single-range only, or Range ignored) and per-host request sizes
(sizing.py), all shared by all blobs.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import yarl
from multidict import CIMultiDict

from snapshotter.fetcher.auth import Authenticator, Token, TokenRequest, basic_header, parse_token_response
from snapshotter.fetcher.credentials import CredentialStore
from snapshotter.fetcher.errors import (
    AuthError,
    FetchError,
    InvalidResponseError,
    RangeNotSatisfiableError,
    UnreachableError,
    UnsafeTargetError,
)
from snapshotter.fetcher.hosts import HostsConfig, RegistryHost
from snapshotter.fetcher.redirects import (
    GuardedResolver,
    LocalAddressError,
    proxy_hosts,
    refusal,
    resolved_kind,
)
from snapshotter.fetcher.sizing import RequestSizing

log = logging.getLogger(__name__)
T = TypeVar("T")
Handler = Callable[[aiohttp.ClientResponse], Awaitable[T]]
Headers = Mapping[str, str] | Callable[[], Mapping[str, str] | None] | None
MAX_TOKEN_RESPONSE_BYTES = 256 << 10  # real token responses are a few KiB


class Progress:
    """The bytes a resumable request has kept, over all its attempts; its handler reports them
    with ``add`` as they arrive (and ``drop`` if it withdraws them). The retry loop reads it."""

    def __init__(self) -> None:
        self.kept = 0
        self.last = time.monotonic()  # when a byte last arrived (or the request began)
        self._watchdog: asyncio.Timeout | None = None
        self._window = 0.0

    def add(self, n: int) -> None:
        if n > 0:
            self.kept += n
            self.last = time.monotonic()
            if self._watchdog is not None:
                self._watchdog.reschedule(asyncio.get_running_loop().time() + self._window)

    def drop(self, n: int) -> None:
        self.kept -= n

    def watch(self, watchdog: asyncio.Timeout | None, window: float) -> None:
        """Push ``watchdog`` back by ``window`` seconds whenever a byte arrives."""
        self._watchdog, self._window = watchdog, window


@dataclass(frozen=True)
class Where:
    """What a request is about, for error messages and logs (never a URL: it may be presigned)."""

    host: str
    repository: str
    digest: str = ""

    def error(self, cls: type[FetchError], message: str) -> FetchError:
        return cls(message, host=self.host, repository=self.repository, digest=self.digest)


class Retry(Exception):  # noqa: N818 - a signal to the retry loop, not an error a caller sees
    """Raised by a response handler for a transient failure; ``kind`` is raised once retries run out."""

    def __init__(
        self, reason: str, kind: type[FetchError] = UnreachableError, retry_after: float = 0.0
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.retry_after = retry_after


class _Failed(Exception):  # noqa: N818 - an attempt's transient failure, inside the retry loop
    def __init__(
        self,
        reason: str,
        kind: type[FetchError] = UnreachableError,
        retry_after: float = 0.0,
        *,
        silent: bool = False,  # no byte arrived for the whole no-progress window
    ) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.retry_after, self.silent = reason, kind, retry_after, silent


class RangeMode(enum.Enum):
    MULTI = "multi"  # multi-range requests work (the default until shown otherwise)
    SINGLE = "single"  # only one range per request
    NONE = "none"  # the server ignores Range and sends the whole blob


def check_status(resp: aiohttp.ClientResponse, where: Where, not_found: type[FetchError]) -> None:
    """Raise the error (or Retry) a non-2xx registry status means."""
    status = resp.status
    if 200 <= status < 300:
        return
    if status in (401, 403):
        raise where.error(AuthError, f"registry refused access (HTTP {status})")
    if status == 404:
        raise where.error(not_found, "not found (HTTP 404)")
    if status == 416:
        raise where.error(RangeNotSatisfiableError, "range not satisfiable (HTTP 416)")
    if status == 429 or (status >= 500 and status != 501):
        raise Retry(f"HTTP {status}", retry_after=_retry_after(resp))
    raise where.error(FetchError, f"unexpected HTTP status {status}")


def _retry_after(resp: aiohttp.ClientResponse) -> float:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else 0.0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


class Transport:
    """Shared HTTP machinery for one RegistryClient; see the module docstring."""

    def __init__(
        self,
        hosts: HostsConfig,
        credentials: CredentialStore,
        *,
        timeout: float,
        fetch_timeout: float,
        max_retries: int,
        retry_base_delay: float,
        retry_max_delay: float,
        connections_per_host: int,
        host_cooldown: float,
        user_agent: str,
        trust_env: bool,
        progress_timeout: float | None = None,
        sizing: RequestSizing | None = None,
    ) -> None:
        self.hosts = hosts
        self.auth = Authenticator(credentials, self._fetch_token)
        self.max_retries = max_retries
        self.progress_timeout = progress_timeout
        self.sizing = sizing or RequestSizing()
        # Requests sent (retries included), retries, requests given up on; retries that resumed a
        # cut response, and the bytes those did not ask for again because they had arrived: for metrics.
        self.counters = {"requests": 0, "retries": 0, "failures": 0, "resumed": 0, "resumed_bytes": 0}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # Range reads may be big: allow fetch_timeout in total, but a stall of `timeout` fails them.
        self._fetch_timeout = aiohttp.ClientTimeout(
            total=fetch_timeout, sock_connect=timeout, sock_read=timeout
        )
        self._base_delay = retry_base_delay
        self._max_delay = retry_max_delay
        self._connections_per_host = connections_per_host
        self._cooldown = host_cooldown
        self._user_agent = user_agent
        self._trust_env = trust_env
        self._session: aiohttp.ClientSession | None = None
        self._guarded: aiohttp.ClientSession | None = None  # for requests on a public registry's behalf
        self._origin_kinds: dict[str, str | None] = {}
        self._ssl: dict[RegistryHost, ssl.SSLContext | None] = {}
        self._ssl_by_host: dict[str, ssl.SSLContext] = {}
        self._sick_until: dict[str, float] = {}
        self._range_modes: dict[str, RangeMode] = {}
        self._random = random.Random()

    # -- lifecycle -------------------------------------------------------------------------------

    def session(self) -> aiohttp.ClientSession:
        # Created on first use because aiohttp binds a session to the running loop.
        if self._session is None or self._session.closed:
            self._session = self._new_session(None)
        return self._session

    def _guarded_session(self) -> aiohttp.ClientSession:
        if self._guarded is None or self._guarded.closed:
            allowed = proxy_hosts() if self._trust_env else frozenset()
            self._guarded = self._new_session(GuardedResolver(allowed))
        return self._guarded

    def _new_session(self, resolver: GuardedResolver | None) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=self._connections_per_host, resolver=resolver
            ),
            auto_decompress=False,  # byte offsets must be the blob's, never a re-encoding's
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": self._user_agent, "Accept-Encoding": "identity"},
            trust_env=self._trust_env,
        )

    async def close(self) -> None:
        for session in (self._session, self._guarded):
            if session is not None:
                await session.close()
        self._session = self._guarded = None

    # -- where a registry may send us ------------------------------------------------------------

    async def _origin_kind(self, host: str) -> str | None:
        """Whether a registry host is on a loopback or link-local address (remembered per host)."""
        if host not in self._origin_kinds:
            self._origin_kinds[host] = await resolved_kind(host)
        return self._origin_kinds[host]

    async def foreign_session(
        self, origin: RegistryHost, url: str, what: str, where: Where
    ) -> aiohttp.ClientSession:
        """The session for a request to ``url`` that the registry at ``origin`` sent us to (a
        ``what``), or UnsafeTargetError if it may not send us there (see redirects.py)."""
        kind = await self._origin_kind(origin.host)
        reason = refusal(origin.scheme, kind, url, what)
        if reason is not None:
            raise where.error(UnsafeTargetError, reason)
        return self.session() if kind is not None else self._guarded_session()

    # -- endpoints -------------------------------------------------------------------------------

    def endpoints(self, registry: str, capability: str, where: Where) -> list[RegistryHost]:
        """Endpoints with ``capability``, configured order, those recently failing moved last."""
        candidates = [e for e in self.hosts.endpoints(registry) if capability in e.capabilities]
        if not candidates:
            raise where.error(FetchError, f"no endpoint configured with the {capability!r} capability")
        now = time.monotonic()
        healthy = [e for e in candidates if self._sick_until.get(e.base_url, 0.0) <= now]
        return healthy + [e for e in candidates if e not in healthy]

    def mark(self, endpoint: RegistryHost, healthy: bool) -> None:
        if healthy:
            self._sick_until.pop(endpoint.base_url, None)
        else:
            self._sick_until[endpoint.base_url] = time.monotonic() + self._cooldown

    async def across(
        self, endpoints: list[RegistryHost], where: Where, attempt: Callable[[RegistryHost], Awaitable[T]]
    ) -> T:
        """Run ``attempt`` on each endpoint in turn until one succeeds; raise the last error."""
        last: FetchError | None = None
        for endpoint in endpoints:
            try:
                result = await attempt(endpoint)
            except FetchError as e:
                last = e
                if isinstance(e, UnreachableError):
                    self.mark(endpoint, healthy=False)
                if endpoint is not endpoints[-1]:
                    log.warning(
                        "registry endpoint failed, trying the next",
                        extra={"endpoint": endpoint.host, "repository": where.repository, "error": e.reason},
                    )
                continue
            self.mark(endpoint, healthy=True)
            return result
        assert last is not None  # endpoints() never returns an empty list
        raise last

    def range_mode(self, host: str) -> RangeMode:
        return self._range_modes.get(host, RangeMode.MULTI)

    def set_range_mode(self, host: str, mode: RangeMode) -> None:
        if self._range_modes.get(host) != mode:
            log.info("server range support downgraded", extra={"server": host, "mode": mode.value})
        self._range_modes[host] = mode

    def _ssl_for(self, endpoint: RegistryHost) -> ssl.SSLContext | bool:
        if endpoint not in self._ssl:
            ctx = self._ssl[endpoint] = endpoint.ssl_context()
            if ctx is not None:
                self._ssl_by_host[endpoint.host] = ctx
        return self._ssl[endpoint] or True

    # -- requests --------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: str,
        handler: Handler[T],
        *,
        where: Where,
        endpoint: RegistryHost | None = None,
        scope: str = "",
        headers: Headers = None,
        fetch: bool = False,
        data: bytes | None = None,
        via: RegistryHost | None = None,
        what: str = "redirect",
        progress: Progress | None = None,
    ) -> T:
        """Send with retries; ``endpoint`` None means a foreign URL (redirect target): no auth.

        ``via`` is the registry endpoint that sent us to a foreign URL (a ``what``), which is then
        checked and sent as redirects.py says. ``headers`` may be a function, called for each
        attempt (a resumed range read asks for less each time); returning None sends no extra
        headers. ``progress`` makes the request resumable (see the module docstring). ``data`` is
        the request body (uploads); it is bytes so that a retry can send it again.
        """
        session = self.session()
        if endpoint is None and via is not None:
            session = await self.foreign_session(via, url, what, where)
        timeout = self._fetch_timeout if fetch else self._timeout
        target = yarl.URL(url, encoded=True)  # keep presigned query strings byte-exact

        async def attempt() -> T:
            extra = headers() if callable(headers) else headers
            if endpoint is None:
                async with session.request(
                    method, target, headers=extra, data=data, allow_redirects=False, timeout=timeout
                ) as resp:
                    return await handler(resp)
            ssl_ctx = self._ssl_for(endpoint)
            for challenged in (False, True):
                sent = await self.auth.authorization(endpoint.host, scope)
                merged: CIMultiDict[str] = CIMultiDict(endpoint.header)
                merged.update(extra or {})
                if sent is not None:
                    merged["Authorization"] = sent
                async with session.request(
                    method,
                    target,
                    headers=merged,
                    data=data,
                    allow_redirects=False,
                    ssl=ssl_ctx,
                    timeout=timeout,
                ) as resp:
                    if resp.status != 401:
                        return await handler(resp)
                    challenges = resp.headers.getall("WWW-Authenticate", [])
                if challenged:
                    break
                await self.auth.challenged(endpoint.host, scope, challenges, sent, origin=endpoint)
            raise where.error(AuthError, "registry refused our credentials (HTTP 401)")

        try:
            return await self._retrying(where, attempt, progress)
        except AuthError as e:
            if e.repository or not where.repository:
                raise
            raise where.error(AuthError, e.reason) from None  # add the repository to auth.py's errors

    async def _retrying(
        self, where: Where, attempt: Callable[[], Awaitable[T]], progress: Progress | None = None
    ) -> T:
        """Run ``attempt`` until it succeeds, retrying transient failures as the module docstring says."""
        window = self.progress_timeout if progress is not None else None
        attempts = stalled = 0  # attempts sent; the last ones in a row that kept no byte
        while True:
            self.counters["requests"] += 1
            if attempts:
                self.counters["retries"] += 1
                if progress is not None and progress.kept:
                    self.counters["resumed"] += 1
                    self.counters["resumed_bytes"] += progress.kept
            attempts += 1
            kept_before = progress.kept if progress is not None else 0
            try:
                return await self._attempt(attempt, where, progress, window)
            except _Failed as e:
                failure = e
            progressed = progress is not None and progress.kept > kept_before
            stalled = 0 if progressed else stalled + 1
            silent = failure.silent or (
                window is not None and progress is not None and time.monotonic() - progress.last >= window
            )
            if stalled > self.max_retries or silent:
                self.counters["failures"] += 1
                reason = failure.reason
                if silent and not failure.silent:
                    reason += f"; no data for {window:g}s"
                gave_up = f"gave up after {attempts} attempts"
                if stalled != attempts:
                    gave_up += f", the last {stalled} without progress"
                raise where.error(failure.kind, f"{reason}; {gave_up}")
            # A cut after progress is resumed at once; only attempts that got nowhere back off.
            delay = 0.0 if progressed else self._backoff(stalled, failure.retry_after, progress, window)
            log.debug(
                "retrying request",
                extra={"host": where.host, "reason": failure.reason, "delay": delay, "resumed": progressed},
            )
            if delay:
                await asyncio.sleep(delay)

    async def _attempt(
        self,
        attempt: Callable[[], Awaitable[T]],
        where: Where,
        progress: Progress | None,
        window: float | None,
    ) -> T:
        """One attempt, stopped if no byte arrives for ``window`` seconds; a transient failure
        comes out as ``_Failed``, a permanent one as it is."""
        watchdog: asyncio.Timeout | None = None
        try:
            if window is None or progress is None:
                return await attempt()
            async with asyncio.timeout(progress.last + window - time.monotonic()) as watchdog:
                progress.watch(watchdog, window)
                return await attempt()
        except Retry as e:
            raise _Failed(e.reason, e.kind, e.retry_after) from None
        except aiohttp.ClientPayloadError as e:
            raise _Failed(f"body cut short ({type(e).__name__})", InvalidResponseError) from None
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, LocalAddressError):
                raise where.error(UnsafeTargetError, str(e.os_error)) from None
            raise _Failed(_describe(e)) from None
        except (aiohttp.ClientError, TimeoutError) as e:
            if watchdog is not None and watchdog.expired():
                raise _Failed(f"no data for {window:g}s", silent=True) from None
            raise _Failed(_describe(e)) from None
        finally:
            if progress is not None:
                progress.watch(None, 0.0)

    def _backoff(
        self, stalled: int, retry_after: float, progress: Progress | None, window: float | None
    ) -> float:
        """Exponential backoff with jitter for the ``stalled``-th attempt in a row without
        progress, honouring Retry-After, never past the no-progress deadline."""
        delay = min(self._max_delay, self._base_delay * 2.0 ** (stalled - 1))
        delay = max(delay * (1 + self._random.random()), min(retry_after, self._max_delay))
        if window is not None and progress is not None:
            delay = min(delay, max(0.0, progress.last + window - time.monotonic()))
        return delay

    async def _fetch_token(self, req: TokenRequest) -> Token:
        """Ask a Bearer realm for a token (GET with Basic credentials, or OAuth POST for identity tokens)."""
        session = self.session()
        if req.origin is not None:
            where = Where(req.host, "")
            session = await self.foreign_session(req.origin, req.realm, "token realm", where)
        creds = req.credentials
        realm_host = urlsplit(req.realm).netloc
        ssl_ctx: ssl.SSLContext | bool = self._ssl_by_host.get(realm_host) or True
        if creds is not None and creds.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "client_id": "lazysnap",
            }
            form |= {"service": req.service, "scope": " ".join(req.scopes)}
            call = session.post(
                req.realm, data=form, ssl=ssl_ctx, timeout=self._timeout, allow_redirects=False
            )
        else:
            params = [("service", req.service)] if req.service else []
            params += [("scope", s) for s in req.scopes]
            headers = {"Authorization": basic_header(creds)} if creds and creds.username else {}
            call = session.get(
                req.realm,
                params=params,
                headers=headers,
                ssl=ssl_ctx,
                timeout=self._timeout,
                allow_redirects=False,
            )
        async with call as resp:
            status = resp.status
            body = await read_at_most(resp, MAX_TOKEN_RESPONSE_BYTES) if status == 200 else b""
        if body is None:
            too_long = f"token server {realm_host} answered more than {MAX_TOKEN_RESPONSE_BYTES} bytes"
            raise AuthError(too_long, host=req.host)
        if status == 200:
            try:
                return parse_token_response(body, time.monotonic())
            except ValueError as e:
                raise AuthError(f"token server {realm_host}: {e}", host=req.host) from None
        if status == 429 or status >= 500:
            raise Retry(f"token server {realm_host} answered HTTP {status}")
        raise AuthError(f"token server {realm_host} refused the token request (HTTP {status})", host=req.host)


async def read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body if it has at most ``limit`` bytes; None (having read no more than
    ``limit`` + one network read) if it has more."""
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > limit:
        return None
    chunks, total = [], 0
    async for chunk in resp.content.iter_any():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
