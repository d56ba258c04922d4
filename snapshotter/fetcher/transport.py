"""The HTTP transport under the registry client: one aiohttp session, auth, retries, endpoint health.

Every request goes through ``Transport.request``, which
- never follows redirects (callers decide, so credentials never follow a redirect off-host),
- adds the endpoint's hosts.toml headers and Authorization only for registry endpoints,
- answers 401 challenges once per attempt (see auth.py),
- retries transient failures (connection errors, timeouts, 429/5xx, short or malformed bodies)
  with capped exponential backoff and jitter, and turns the last one into a FetchError.

It also remembers per-endpoint health (a failing mirror is tried last for a while) and per-host
range support (multi-range, single-range only, or Range ignored), both shared by all blobs.
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
)
from snapshotter.fetcher.hosts import HostsConfig, RegistryHost

log = logging.getLogger(__name__)
T = TypeVar("T")
Handler = Callable[[aiohttp.ClientResponse], Awaitable[T]]


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
    ) -> None:
        self.hosts = hosts
        self.auth = Authenticator(credentials, self._fetch_token)
        self.max_retries = max_retries
        # Requests sent (retries included), retries, and requests given up on: for metrics.
        self.counters = {"requests": 0, "retries": 0, "failures": 0}
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
        self._ssl: dict[RegistryHost, ssl.SSLContext | None] = {}
        self._ssl_by_host: dict[str, ssl.SSLContext] = {}
        self._sick_until: dict[str, float] = {}
        self._range_modes: dict[str, RangeMode] = {}
        self._random = random.Random()

    # -- lifecycle -------------------------------------------------------------------------------

    def session(self) -> aiohttp.ClientSession:
        # Created on first use because aiohttp binds a session to the running loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=self._connections_per_host),
                auto_decompress=False,  # byte offsets must be the blob's, never a re-encoding's
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": self._user_agent, "Accept-Encoding": "identity"},
                trust_env=self._trust_env,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        headers: Mapping[str, str] | None = None,
        fetch: bool = False,
        data: bytes | None = None,
    ) -> T:
        """Send with retries; ``endpoint`` None means a foreign URL (redirect target): no auth.

        ``data`` is the request body (uploads); it is bytes so that a retry can send it again.
        """
        session = self.session()
        timeout = self._fetch_timeout if fetch else self._timeout
        target = yarl.URL(url, encoded=True)  # keep presigned query strings byte-exact

        async def attempt() -> T:
            if endpoint is None:
                async with session.request(
                    method, target, headers=headers, data=data, allow_redirects=False, timeout=timeout
                ) as resp:
                    return await handler(resp)
            ssl_ctx = self._ssl_for(endpoint)
            for challenged in (False, True):
                sent = await self.auth.authorization(endpoint.host, scope)
                merged: CIMultiDict[str] = CIMultiDict(endpoint.header)
                merged.update(headers or {})
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
                await self.auth.challenged(endpoint.host, scope, challenges, sent)
            raise where.error(AuthError, "registry refused our credentials (HTTP 401)")

        try:
            return await self._retrying(where, attempt)
        except AuthError as e:
            if e.repository or not where.repository:
                raise
            raise where.error(AuthError, e.reason) from None  # add the repository to auth.py's errors

    async def _retrying(self, where: Where, attempt: Callable[[], Awaitable[T]]) -> T:
        reason, retry_after = "", 0.0
        kind: type[FetchError] = UnreachableError
        tries = self.max_retries + 1
        for n in range(tries):
            self.counters["requests"] += 1
            if n:
                self.counters["retries"] += 1
                delay = min(self._max_delay, self._base_delay * 2 ** (n - 1))
                delay = max(delay * (1 + self._random.random()), min(retry_after, self._max_delay))
                log.debug("retrying request", extra={"host": where.host, "reason": reason, "delay": delay})
                await asyncio.sleep(delay)
            try:
                return await attempt()
            except Retry as e:
                reason, kind, retry_after = e.reason, e.kind, e.retry_after
            except aiohttp.ClientPayloadError as e:
                reason, kind, retry_after = f"body cut short ({type(e).__name__})", InvalidResponseError, 0.0
            except (aiohttp.ClientError, TimeoutError) as e:
                reason, kind, retry_after = _describe(e), UnreachableError, 0.0
        self.counters["failures"] += 1
        raise where.error(kind, f"{reason}; gave up after {tries} attempts")

    async def _fetch_token(self, req: TokenRequest) -> Token:
        """Ask a Bearer realm for a token (GET with Basic credentials, or OAuth POST for identity tokens)."""
        session = self.session()
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
            body = await resp.read()
            status = resp.status
        if status == 200:
            try:
                return parse_token_response(body, time.monotonic())
            except ValueError as e:
                raise AuthError(f"token server {realm_host}: {e}", host=req.host) from None
        if status == 429 or status >= 500:
            raise Retry(f"token server {realm_host} answered HTTP {status}")
        raise AuthError(f"token server {realm_host} refused the token request (HTTP {status})", host=req.host)
