"""Registry credentials from a docker ``config.json``: ``auths``, ``credHelpers`` and ``credsStore``.

Lookup order per host: a ``credHelpers`` entry, then an ``auths`` entry carrying credentials, then
the ``credsStore`` helper. Helpers run as ``docker-credential-NAME get`` with the server on stdin,
bounded by a timeout; their answers are cached for a while, since each run may take a keychain
round trip. Docker Hub is looked up under all its names, ``https://index.docker.io/v1/`` first.
Sources added with ``add_source`` (the CRI proxy's pull secrets) are asked first, uncached.
Secrets never appear in reprs, logs or error messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.fetcher.errors import AuthError, CredentialsConfigError

_HUB_NAMES = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")
_HELPER_NOT_FOUND = "credentials not found"


@dataclass(frozen=True)
class Credentials:
    """What we present to a registry: a user and password, or an identity (refresh) token."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)


# Asked ``(host, repository)`` (repository "" when the caller does not know it); None: no opinion.
CredentialSource = Callable[[str, str], Credentials | None]


def default_docker_config() -> Path:
    """Where the docker CLI keeps config.json: ``$DOCKER_CONFIG`` or ``~/.docker``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _server_key(name: str) -> str:
    """Reduce an ``auths`` key such as ``https://host:5000/v1/`` to ``host:5000``."""
    name = name.split("://", 1)[-1]
    return name.split("/", 1)[0].lower()


def _candidates(host: str) -> tuple[str, ...]:
    return _HUB_NAMES if host.lower() in _HUB_NAMES else (host.lower(),)


class CredentialStore:
    """Looks up credentials per registry host; with no config file, everything is anonymous."""

    def __init__(
        self,
        config_path: str | Path | None = None,
        *,
        helper_timeout: float = 10.0,
        helper_search_path: str | None = None,
        cache_ttl: float = 300.0,
    ) -> None:
        self._path = Path(config_path) if config_path is not None else None
        self._helper_timeout = helper_timeout
        self._search_path = helper_search_path  # PATH for finding helpers; None means $PATH
        self._ttl = cache_ttl
        self._auths: dict[str, Credentials] = {}
        self._helpers: dict[str, str] = {}
        self._store = ""
        self._cache: dict[str, tuple[float, Credentials | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._sources: list[CredentialSource] = []
        if self._path is not None:
            self._load(self._path)

    def add_source(self, source: CredentialSource) -> None:
        """Ask ``source`` before the docker config; the first source with an answer wins. Sources
        are called on every lookup (not cached here) and must be quick and non-blocking."""
        self._sources.append(source)

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return  # like docker: no config file means no credentials
        except OSError as e:
            raise CredentialsConfigError(f"{path}: cannot read: {e.strerror}") from e
        try:
            data = json.loads(text)
        except ValueError as e:
            raise CredentialsConfigError(
                f"{path}: not valid JSON (line {getattr(e, 'lineno', '?')})"
            ) from None
        if not isinstance(data, dict):
            raise CredentialsConfigError(f"{path}: top level must be an object")
        auths = data.get("auths") or {}
        helpers = data.get("credHelpers") or {}
        store = data.get("credsStore") or ""
        if not isinstance(auths, dict) or not isinstance(helpers, dict) or not isinstance(store, str):
            raise CredentialsConfigError(
                f"{path}: 'auths'/'credHelpers' must be objects, 'credsStore' a string"
            )
        for server, entry in auths.items():
            creds = _parse_auth_entry(path, server, entry)
            if creds is not None:
                self._auths[_server_key(server)] = creds
        for server, name in helpers.items():
            if not isinstance(name, str) or not name:
                raise CredentialsConfigError(f"{path}: credHelpers[{server!r}] must be a helper name")
            self._helpers[_server_key(server)] = name
        self._store = store

    async def get(self, host: str, repository: str = "") -> Credentials | None:
        """Credentials for ``host`` (host[:port] as contacted), or None to go anonymous."""
        for source in self._sources:
            found = source(host, repository)
            if found is not None:
                return found
        cached = self._cache.get(host)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        lock = self._locks.setdefault(host, asyncio.Lock())
        async with lock:  # one helper run per host at a time; the others reuse its answer
            cached = self._cache.get(host)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            creds = await self._lookup(host)
            self._cache[host] = (time.monotonic() + self._ttl, creds)
            return creds

    async def _lookup(self, host: str) -> Credentials | None:
        names = _candidates(host)
        for name in names:
            helper = self._helpers.get(_server_key(name))
            if helper:
                return await self._run_helper(helper, names[0], host)
        for name in names:
            creds = self._auths.get(_server_key(name))
            if creds is not None:
                return creds
        if self._store:
            return await self._run_helper(self._store, names[0], host)
        return None

    async def _run_helper(self, name: str, server: str, host: str) -> Credentials | None:
        program = f"docker-credential-{name}"
        executable = shutil.which(program, path=self._search_path)
        if executable is None:
            raise AuthError(f"credential helper {program} not found", host=host)
        proc = await asyncio.create_subprocess_exec(
            executable,
            "get",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills its children too
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(server.encode()), self._helper_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise AuthError(
                f"credential helper {program} timed out after {self._helper_timeout}s", host=host
            ) from None
        if proc.returncode != 0:
            if _HELPER_NOT_FOUND in (out + err).decode(errors="replace").lower():
                return None
            # The helper's output is not echoed: it may contain secrets.
            raise AuthError(
                f"credential helper {program} failed with exit status {proc.returncode}", host=host
            )
        try:
            answer = json.loads(out)
            username, secret = answer["Username"], answer["Secret"]
        except (ValueError, KeyError, TypeError):
            raise AuthError(f"credential helper {program} printed an invalid answer", host=host) from None
        if not isinstance(username, str) or not isinstance(secret, str):
            raise AuthError(f"credential helper {program} printed an invalid answer", host=host)
        if username == "<token>":  # docker's convention for an identity token
            return Credentials(identity_token=secret)
        return Credentials(username=username, password=secret)


def _parse_auth_entry(path: Path, server: str, entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        raise CredentialsConfigError(f"{path}: auths[{server!r}] must be an object")
    identity = entry.get("identitytoken") or ""
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    encoded = entry.get("auth") or ""
    if not all(isinstance(v, str) for v in (identity, username, password, encoded)):
        raise CredentialsConfigError(f"{path}: auths[{server!r}] fields must be strings")
    if encoded:
        try:
            username, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise CredentialsConfigError(f"{path}: auths[{server!r}].auth is not base64 of user:password")
    if identity:
        return Credentials(username=username, identity_token=identity)
    if username or password:
        return Credentials(username=username, password=password)
    return None  # an empty entry, as docker writes when a credsStore holds the secret
