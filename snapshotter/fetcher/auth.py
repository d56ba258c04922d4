"""Registry authentication: WWW-Authenticate challenges, Basic auth and the Bearer token flow.

We start anonymous. A 401 carries a challenge: ``Basic`` means send credentials directly;
``Bearer realm=…,service=…,scope=…`` means get a token from the realm (with Basic credentials, or
an identity token exchanged by OAuth POST, if we have them) and send that. Tokens are cached per
(host, scope) until their ``expires_in`` runs out; once a host has challenged us, later requests
for other scopes fetch a token up front instead of taking another 401. Only one token fetch per
(host, scope) runs at a time; requests that were refused meanwhile reuse its result.

The HTTP side is injected (``TokenFetcher``) so this module owns the protocol, not the transport.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from snapshotter.fetcher.credentials import Credentials, CredentialStore
from snapshotter.fetcher.errors import AuthError
from snapshotter.fetcher.hosts import RegistryHost

DEFAULT_TOKEN_LIFETIME = 60.0  # seconds; the distribution token spec's default for expires_in
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class Challenge:
    """One WWW-Authenticate challenge: a lower-case scheme and its lower-case-keyed parameters."""

    scheme: str
    params: dict[str, str]


@dataclass(frozen=True)
class TokenRequest:
    """What the transport must send to a token realm. Secrets are kept out of the repr."""

    host: str  # the registry host the token is for (used in error messages)
    realm: str
    service: str
    scopes: tuple[str, ...]
    credentials: Credentials | None = field(default=None, repr=False)
    origin: RegistryHost | None = None  # the endpoint that challenged us (the realm must be safe from there)


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # time.monotonic() deadline


TokenFetcher = Callable[[TokenRequest], Awaitable[Token]]


def parse_challenges(values: Sequence[str]) -> list[Challenge]:
    """Parse WWW-Authenticate header values; Bearer challenges sort before Basic ones.

    Each header value is taken as one challenge with comma-separated ``key=value`` parameters
    (quoted strings with backslash escapes allowed), which is how registries send them.
    """
    found = []
    for value in values:
        scheme, rest = _token(value.lstrip())
        scheme = scheme.lower()
        if scheme not in ("basic", "bearer"):
            continue
        params: dict[str, str] = {}
        while True:
            key, rest = _token(rest.lstrip())
            if not key or not rest.startswith("="):
                break
            val, rest = _token_or_quoted(rest[1:])
            params[key.lower()] = val
            rest = rest.lstrip()
            if not rest.startswith(","):
                break
            rest = rest[1:]
        found.append(Challenge(scheme, params))
    found.sort(key=lambda c: c.scheme != "bearer")
    return found


def _token(s: str) -> tuple[str, str]:
    i = 0
    while i < len(s) and s[i] in _TOKEN_CHARS:
        i += 1
    return s[:i], s[i:]


def _token_or_quoted(s: str) -> tuple[str, str]:
    if not s.startswith('"'):
        # Lenient: an unquoted value runs to the next comma, so "scope=repository:a/b:pull" works.
        end = len(s)
        for i, c in enumerate(s):
            if c == "," or c.isspace():
                end = i
                break
        return s[:end], s[end:]
    out = []
    i = 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), s[i + 1 :]
        out.append(c)
        i += 1
    return "".join(out), ""  # unterminated: take what there is


def parse_token_response(body: bytes, now: float) -> Token:
    """Read a token endpoint's JSON answer (``token`` or ``access_token``, ``expires_in``)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise ValueError("token response is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("token response is not a JSON object")
    value = data.get("token") or data.get("access_token")
    if not isinstance(value, str) or not value:
        raise ValueError("token response carries no token")
    lifetime = data.get("expires_in")
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    # Renew a little early so a token does not expire between our check and the registry's.
    return Token(value, now + lifetime - min(10.0, lifetime * 0.1))


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass
class _HostScheme:
    scheme: str  # "basic" or "bearer"
    realm: str = ""
    service: str = ""
    origin: RegistryHost | None = None


class Authenticator:
    """Decides the Authorization header for each (host, scope), learning from 401 challenges."""

    def __init__(
        self,
        credentials: CredentialStore,
        fetch_token: TokenFetcher,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._credentials = credentials
        self._fetch_token = fetch_token
        self._clock = clock
        self._schemes: dict[str, _HostScheme] = {}
        self._tokens: dict[tuple[str, str], Token] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def authorization(self, host: str, scope: str) -> str | None:
        """The Authorization header to send, or None while the host has not asked for one."""
        known = self._schemes.get(host)
        if known is None:
            return None
        if known.scheme == "basic":
            creds = await self._credentials.get(host, _repository(scope))
            return basic_header(creds) if creds is not None else None
        token = self._tokens.get((host, scope))
        if token is not None and token.expires_at > self._clock():
            return f"Bearer {token.value}"
        async with self._lock(host, scope):
            token = self._tokens.get((host, scope))
            if token is None or token.expires_at <= self._clock():
                token = await self._new_token(host, scope, known, extra_scope="")
            return f"Bearer {token.value}"

    async def challenged(
        self,
        host: str,
        scope: str,
        headers: Sequence[str],
        sent: str | None,
        *,
        origin: RegistryHost | None = None,
    ) -> None:
        """Learn from a 401 that answered a request sent with ``sent``; raise AuthError if hopeless.
        ``origin`` is the endpoint that answered, passed on to the token fetcher with the realm."""
        challenges = parse_challenges(headers)
        if not challenges:
            raise AuthError("registry answered 401 without a Basic or Bearer challenge", host=host)
        async with self._lock(host, scope):
            current = self._current(host, scope)
            if current is not None and current != sent:
                return  # another request already renewed it while we waited for the lock
            challenge = challenges[0]
            if challenge.scheme == "basic":
                creds = await self._credentials.get(host, _repository(scope))
                if creds is None or not (creds.username or creds.password):
                    what = "rejected our credentials" if sent else "requires credentials and we have none"
                    raise AuthError(f"registry {what} (Basic)", host=host)
                if sent is not None and sent == basic_header(creds):
                    raise AuthError("registry rejected our credentials (Basic)", host=host)
                self._schemes[host] = _HostScheme("basic")
                return
            realm = challenge.params.get("realm", "")
            if not realm.startswith(("https://", "http://")):
                raise AuthError("Bearer challenge has no usable realm", host=host)
            known = _HostScheme("bearer", realm, challenge.params.get("service", ""), origin)
            self._schemes[host] = known
            await self._new_token(host, scope, known, extra_scope=challenge.params.get("scope", ""))

    def _current(self, host: str, scope: str) -> str | None:
        token = self._tokens.get((host, scope))
        return f"Bearer {token.value}" if token is not None else None

    async def _new_token(self, host: str, scope: str, known: _HostScheme, *, extra_scope: str) -> Token:
        # A scope may name several resources separated by spaces (a cross-repository mount needs
        # push on the target and pull on the source); each goes to the token server on its own.
        scopes = [s for s in scope.split(" ") if s]
        scopes += [s for s in extra_scope.split(" ") if s and s not in scopes]
        creds = await self._credentials.get(host, _repository(scope))
        request = TokenRequest(host, known.realm, known.service, tuple(scopes), creds, known.origin)
        token = await self._fetch_token(request)
        self._tokens[(host, scope)] = token
        return token

    def _lock(self, host: str, scope: str) -> asyncio.Lock:
        return self._locks.setdefault((host, scope), asyncio.Lock())


def _repository(scope: str) -> str:
    """The repository a request's scope names ("repository:NAME:ACTIONS"), for credential sources
    that hold secrets per repository (the CRI proxy's pull secrets); "" when it names none."""
    for part in scope.split(" "):
        kind, _, rest = part.partition(":")
        if kind == "repository" and rest:
            return rest.rpartition(":")[0] or rest
    return ""
