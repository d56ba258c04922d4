"""Pull secrets seen by the CRI proxy, handed to lazysnap's registry client.

The kubelet sends an image's pull secret in ``PullImageRequest.auth``; containerd uses it for its
own requests but never tells a snapshotter. The proxy records it here, keyed by the image's
registry host and repository, *before* forwarding the pull (containerd prepares the layers while
the pull is in flight, and lazysnap needs the credentials then), and takes it back if the pull
fails. ``lookup(host, repository)`` is a ``CredentialStore`` source: the secret of exactly that
repository on that host. A secret is one tenant's: it never fetches another repository's layers,
unless the operator turns ``host_fallback`` on (``cri.secret_host_fallback``), which then lends the
most recently used secret of the host to repositories that have none.

With a ``persist_path`` the secrets are also written to that file (mode 0600, root's directory
0700) so that a restarted daemon can keep fetching lazily mounted layers of private images. Secrets
never appear in reprs, logs or error messages.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from snapshotter.fetcher import Credentials, InvalidReferenceError, parse_reference
from snapshotter.fetcher.reference import DOCKER_HUB

log = logging.getLogger(__name__)

MAX_ENTRIES = 1024  # least recently used secrets are dropped beyond this
FILE_VERSION = 1
_HUB_HOSTS = frozenset({DOCKER_HUB, "index.docker.io", "registry-1.docker.io"})


class AuthConfigLike(Protocol):
    """The fields of CRI's ``runtime.v1.AuthConfig`` that we read."""

    username: str
    password: str
    auth: str
    server_address: str
    identity_token: str
    registry_token: str


def normalize_host(host: str) -> str:
    """Lower-case ``host[:port]``; Docker Hub's names become ``docker.io``."""
    host = host.lower()
    return DOCKER_HUB if host in _HUB_HOSTS else host


def server_host(server_address: str) -> str:
    """The host of a CRI ``server_address`` such as ``https://host:5000/v1/``. Like containerd
    (``url.Parse(...).Host``), an address without a scheme names no host: ""."""
    scheme, sep, rest = server_address.partition("://")
    if not sep or not scheme:
        return ""
    return normalize_host(rest.split("/", 1)[0])


def credentials_from_auth(auth: AuthConfigLike) -> Credentials | None:
    """Credentials from a CRI AuthConfig, in containerd's order (pkg/cri ParseAuth): a username
    (with its password), else an identity token, else ``auth`` (base64 of ``user:password``).
    None when there is nothing usable: anonymous, or only a ``registry_token``, which containerd
    1.6 ignores as well."""
    if auth.username:
        return Credentials(username=auth.username, password=auth.password)
    if auth.identity_token:
        return Credentials(identity_token=auth.identity_token)
    if auth.auth:
        try:
            decoded = base64.b64decode(auth.auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        return Credentials(username=user, password=password.strip("\x00"))
    return None


def auth_kind(auth: AuthConfigLike) -> str:
    """What kind of secret a request carried, for logs (never the secret itself)."""
    if auth.username:
        return "username"
    if auth.identity_token:
        return "identity-token"
    if auth.auth:
        return "auth"
    if auth.registry_token:
        return "registry-token"
    return "none"


@dataclass(frozen=True)
class _Key:
    host: str
    repository: str


@dataclass(frozen=True)
class Remembered:
    """What ``remember`` changed, so that ``forget`` can put it back if the pull fails."""

    key: _Key
    entry: Credentials
    previous: Credentials | None


class PullSecrets:
    """Registry credentials per (registry host, repository), learnt from CRI pulls.

    Thread-safe; ``lookup`` is cheap and never blocks on I/O (it runs on the daemon's event loop).
    """

    def __init__(self, persist_path: Path | None = None, *, host_fallback: bool = False) -> None:
        self._persist = persist_path
        self.host_fallback = host_fallback
        self._lock = threading.Lock()
        # Most recently used last: lookups by host prefer the newest secret.
        self._entries: OrderedDict[_Key, Credentials] = OrderedDict()
        if persist_path is not None:
            self._load(persist_path)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def remember(self, image: str, auth: AuthConfigLike) -> Remembered | None:
        """Record the credentials of a pull of ``image``; None if there are none to record (no
        usable secret, an unparsable reference, or a ``server_address`` naming another host, for
        which containerd would not use them either)."""
        creds = credentials_from_auth(auth)
        if creds is None:
            return None
        try:
            ref = parse_reference(image)
        except InvalidReferenceError:
            return None
        key = _Key(normalize_host(ref.host), ref.repository)
        if auth.server_address and server_host(auth.server_address) != key.host:
            return None
        with self._lock:
            previous = self._entries.pop(key, None)
            self._entries[key] = creds
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)
            self._save_locked()
        return Remembered(key, creds, previous)

    def forget(self, remembered: Remembered) -> None:
        """Undo ``remember`` (the pull failed), unless a later pull replaced the secret since."""
        with self._lock:
            if self._entries.get(remembered.key) is not remembered.entry:
                return
            del self._entries[remembered.key]
            if remembered.previous is not None:
                self._entries[remembered.key] = remembered.previous
            self._save_locked()

    def lookup(self, host: str, repository: str = "") -> Credentials | None:
        """A ``CredentialStore`` source: the secret for ``repository`` on ``host`` if known; with
        ``host_fallback``, else the most recently remembered one for ``host``; else None."""
        host = normalize_host(host)
        with self._lock:
            if repository:
                found = self._entries.get(_Key(host, repository))
                if found is not None:
                    return found
            if not self.host_fallback:
                return None
            for key in reversed(self._entries):
                if key.host == host:
                    return self._entries[key]
        return None

    # --- persistence ----------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            # Not fatal: lazily mounted private layers fall back to what the docker config offers.
            log.warning(
                "ignoring unreadable CRI credentials file",
                extra={"path": str(path), "error": type(e).__name__},
            )
            return
        if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
            log.warning("ignoring CRI credentials file of an unknown format", extra={"path": str(path)})
            return
        entries = data.get("entries")
        for item in entries if isinstance(entries, list) else []:
            parsed = _parse_entry(item)
            if parsed is not None:
                self._entries[parsed[0]] = parsed[1]
        log.info("loaded CRI pull credentials", extra={"path": str(path), "count": len(self._entries)})

    def _save_locked(self) -> None:
        if self._persist is None:
            return
        path = self._persist
        entries = [
            {
                "host": k.host,
                "repository": k.repository,
                "username": c.username,
                "password": c.password,
                "identity_token": c.identity_token,
            }
            for k, c in self._entries.items()
        ]
        body = json.dumps({"version": FILE_VERSION, "saved": int(time.time()), "entries": entries})
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".credentials-")  # created 0600
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(body)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            log.warning("cannot save CRI credentials", extra={"path": str(path), "error": e.strerror})


def _parse_entry(item: Any) -> tuple[_Key, Credentials] | None:
    if not isinstance(item, dict):
        return None
    fields = ("host", "repository", "username", "password", "identity_token")
    values = [item.get(f, "") for f in fields]
    if not all(isinstance(v, str) for v in values):
        return None
    host, repository, username, password, identity = values
    if not host or not repository or not (username or password or identity):
        return None
    return _Key(normalize_host(host), repository), Credentials(username, password, identity)
