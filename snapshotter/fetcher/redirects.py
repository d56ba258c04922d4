"""Where a registry may send us: redirect targets (blobs, manifests, uploads) and token realms.

A registry reached over https may not send us to plain http: a redirect there would carry a
presigned URL or our data, and a token realm our credentials, past anyone on the path. Nor may
it send us to a loopback or link-local address (127.0.0.0/8, ::1, the unspecified 0.0.0.0 and ::,
169.254.0.0/16 where cloud metadata services answer, fe80::/10) unless the registry itself is on
an address of that kind: a remote registry must not make the node call its own services.

IP literals and ``localhost`` names are judged from the URL (``refusal``). Other names are judged
where they are resolved: requests sent on a registry's behalf go through a session whose resolver
is a ``GuardedResolver``, so DNS cannot point a public-looking name at a local address either.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.request
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

LOOPBACK = "loopback"
LINK_LOCAL = "link-local"


class LocalAddressError(OSError):
    """A name resolved to a loopback or link-local address where none is allowed."""


def address_kind(host: str) -> str | None:
    """``LOOPBACK``, ``LINK_LOCAL`` or None for an IP address or a host name; of names only
    ``localhost`` (and ``*.localhost``) can be told without resolving them."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return LOOPBACK
    try:
        ip = ipaddress.ip_address(name.partition("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return LOOPBACK
    if ip.is_link_local:
        return LINK_LOCAL
    return None


async def resolved_kind(host: str) -> str | None:
    """``address_kind`` of a ``host[:port]``, resolving a name: the kind of any of its addresses
    (None if it has none that is local, or cannot be resolved)."""
    hostname = urlsplit(f"//{host}").hostname or host
    kind = address_kind(hostname)
    if kind is not None or _is_ip(hostname):
        return kind
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(hostname, None)
    except OSError:
        return None
    kinds = sorted({k for info in infos if (k := address_kind(str(info[4][0]))) is not None})
    return kinds[0] if kinds else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return False
    return True


def refusal(origin_scheme: str, origin_kind: str | None, target: str, what: str) -> str | None:
    """Why a registry reached by ``origin_scheme`` on an address of ``origin_kind`` may not send us
    to the URL ``target`` (a ``what``: "blob redirect", "token realm"...), or None if it may.
    The reason names the target's host, never its path or query (a presigned URL's query is a
    credential)."""
    parts = urlsplit(target)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        return f"{what} is not an http(s) URL with a host; refused"
    if origin_scheme == "https" and parts.scheme == "http":
        return f"{what} to {parts.netloc} is plain http while the registry uses https; refused"
    kind = address_kind(host)
    if kind is not None and kind != origin_kind:
        return f"{what} to {parts.netloc} is on a {kind} address and the registry is not; refused"
    return None


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, but fails for a name with a loopback or link-local
    address. ``allowed`` names (the configured HTTP proxies) are exempt."""

    def __init__(self, allowed: frozenset[str] = frozenset()) -> None:
        self._inner = DefaultResolver()
        self._allowed = allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower() not in self._allowed:
            for result in results:
                kind = address_kind(result["host"])
                if kind is not None:
                    raise LocalAddressError(f"{host} resolves to a {kind} address; refused")
        return results

    async def close(self) -> None:
        await self._inner.close()


def proxy_hosts() -> frozenset[str]:
    """The host names of the HTTP proxies the environment configures (they may well be local)."""
    names = set()
    for url in urllib.request.getproxies().values():
        host = urlsplit(url if "://" in url else f"http://{url}").hostname
        if host:
            names.add(host.lower())
    return frozenset(names)
