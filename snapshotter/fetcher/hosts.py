"""Registry endpoints: containerd's hosts.toml / certs.d directory format, and its defaults.

For a registry ``R`` the directory ``DIR/R`` (``DIR/host_port_`` first when R has a port, the way
containerd names them), else ``DIR/_default``, may hold a ``hosts.toml``::

    server = "https://registry.example.com"      # the origin; defaults to R itself
    [host."https://mirror.example.com"]           # mirrors, tried in file order before the server
      capabilities = ["pull", "resolve"]          # pull / resolve / push; default all three
      skip_verify = false
      ca = "ca.crt"                               # string or list; relative to the directory
      client = [["client.cert", "client.key"]]    # string, list of strings, or list of pairs
      header = { X-Mirror = "1" }                 # values: string or list of strings
      override_path = false                       # true: the URL path is the API root, no "/v2"

Without a hosts.toml, Docker-style ``*.crt`` (CA) and ``*.cert``/``*.key`` (client) files in the
directory apply to the origin. Without a directory, the defaults are containerd's: ``docker.io`` is
served by ``registry-1.docker.io``; loopback hosts use plain HTTP (containerd would try HTTPS first
for them; going straight to HTTP is equivalent for a local registry); everything else HTTPS. A URL
written without a scheme follows the same rule, and ``plain_http_hosts`` adds hosts to the HTTP list.

Unlike containerd, an invalid file is an error (``HostsConfigError`` naming the file and the key),
not a silent fallback, so a typo never quietly bypasses a mirror.
"""

from __future__ import annotations

import ipaddress
import posixpath
import ssl
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from snapshotter.fetcher.errors import HostsConfigError
from snapshotter.fetcher.reference import DOCKER_HUB

DEFAULT_CONFIG_DIR = Path("/etc/containerd/certs.d")
CAPABILITIES = frozenset({"pull", "resolve", "push"})
_HOST_KEYS = frozenset({"capabilities", "skip_verify", "ca", "client", "header", "override_path"})
_TOP_KEYS = _HOST_KEYS | {"server", "host"}


@dataclass(frozen=True)
class RegistryHost:
    """One endpoint serving a registry: a mirror or the origin, with its TLS and header settings."""

    scheme: str  # "http" or "https"
    host: str  # host[:port] as it goes on the wire
    path: str = "/v2"  # the API root
    capabilities: frozenset[str] = CAPABILITIES
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()  # (cert, key); key "" means the cert file holds both
    header: tuple[tuple[str, str], ...] = ()  # repeated names carry list values
    mirror: bool = False

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"

    def api_url(self, registry: str, repository: str, kind: str, obj: str) -> str:
        """URL of ``/<repository>/<kind>/<obj>`` here; mirrors get containerd's ``?ns=<registry>``."""
        url = f"{self.base_url}/{repository}/{kind}/{obj}"
        is_origin = registry == self.host or (registry == DOCKER_HUB and self.host == "registry-1.docker.io")
        # Proxy caches (Harbor, spegel, ...) serve several registries and use ns to tell them apart.
        return url if is_origin else f"{url}?ns={quote(registry, safe=':[]')}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for this endpoint; None means the system defaults (or plain HTTP)."""
        if self.scheme != "https" or not (self.skip_verify or self.ca or self.client):
            return None
        ctx = ssl.create_default_context()
        for ca in self.ca:
            try:
                ctx.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError) as e:
                raise HostsConfigError(f"{ca}: cannot load CA certificate for {self.host}: {e}") from e
        for cert, key in self.client:
            try:
                ctx.load_cert_chain(cert, key or None)
            except (OSError, ssl.SSLError) as e:
                raise HostsConfigError(f"{cert}: cannot load client certificate for {self.host}: {e}") from e
        if self.skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs, with or without a port (containerd's IsLocalhost)."""
    name = split_host_port(host)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def split_host_port(host: str) -> tuple[str, str]:
    """Split ``host[:port]`` (``[v6]:port`` too) into the bare host and the port ("" if none)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return host, ""  # a bare IPv6 address such as ::1, or no port


class HostsConfig:
    """Answers "which endpoints serve registry R, in order": the mirrors, then the origin.

    Each registry's directory is read once, on first use; build a new HostsConfig to reload.
    """

    def __init__(
        self,
        config_dir: str | Path | None = DEFAULT_CONFIG_DIR,
        *,
        plain_http_hosts: Iterable[str] = (),
    ) -> None:
        self._dir = Path(config_dir) if config_dir is not None else None
        self._plain_http = frozenset(plain_http_hosts)
        self._cache: dict[str, tuple[RegistryHost, ...]] = {}

    def endpoints(self, registry: str) -> tuple[RegistryHost, ...]:
        """The endpoints for ``registry`` (a reference's host) in the order to try them."""
        found = self._cache.get(registry)
        if found is None:
            found = self._cache[registry] = self._load(registry)
        return found

    def insecure_hosts(self) -> list[str]:
        """Every configured endpoint whose TLS certificate is not verified (``skip_verify``), for
        the warning the daemon logs at start. Unreadable directories are skipped (they fail, with
        their own error, when a pull needs them)."""
        if self._dir is None or not self._dir.is_dir():
            return []
        found: list[str] = []
        for directory in sorted(p for p in self._dir.iterdir() if p.is_dir()):
            hosts_file = directory / "hosts.toml"
            if not hosts_file.is_file():
                continue
            try:
                endpoints = self._parse_file(directory.name, hosts_file)
            except HostsConfigError:
                continue
            found += [f"{directory.name}: {e.base_url}" for e in endpoints if e.skip_verify]
        return found

    def plain_http(self, host: str) -> bool:
        """Whether ``host`` (host[:port]) is spoken to in plain HTTP when no scheme is given."""
        return is_loopback(host) or host in self._plain_http or split_host_port(host)[0] in self._plain_http

    def _load(self, registry: str) -> tuple[RegistryHost, ...]:
        directory = self._host_dir(registry)
        if directory is None:
            return (self._default_origin(registry),)
        hosts_file = directory / "hosts.toml"
        if hosts_file.is_file():
            return self._parse_file(registry, hosts_file)
        return (self._with_cert_files(self._default_origin(registry), directory),)

    def _host_dir(self, registry: str) -> Path | None:
        if self._dir is None:
            return None
        names = [registry, "_default"]
        name, port = split_host_port(registry)
        if port:  # containerd spells "host:port" directories "host_port_" (":" is awkward in paths)
            names.insert(0, f"{name}_{port}_")
        for candidate in names:
            path = self._dir / candidate
            if path.is_dir():
                return path
        return None

    def _default_origin(self, registry: str) -> RegistryHost:
        if registry == DOCKER_HUB:
            return RegistryHost(scheme="https", host="registry-1.docker.io")
        return RegistryHost(scheme="http" if self.plain_http(registry) else "https", host=registry)

    def _with_cert_files(self, origin: RegistryHost, directory: Path) -> RegistryHost:
        """Docker's certs.d layout: ``*.crt`` are CAs, ``X.cert`` with optional ``X.key`` are clients."""
        cas, clients = [], []
        for entry in sorted(directory.iterdir()):
            if not entry.is_file():
                continue
            if entry.suffix == ".crt":
                cas.append(str(entry))
            elif entry.suffix == ".cert":
                key = entry.with_suffix(".key")
                clients.append((str(entry), str(key) if key.is_file() else ""))
        return RegistryHost(
            scheme=origin.scheme, host=origin.host, path=origin.path, ca=tuple(cas), client=tuple(clients)
        )

    def _parse_file(self, registry: str, path: Path) -> tuple[RegistryHost, ...]:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise HostsConfigError(f"{path}: cannot parse TOML: {e}") from e
        _check_keys(path, "", data, _TOP_KEYS)
        hosts_table = data.get("host", {})
        if not isinstance(hosts_table, dict):
            raise HostsConfigError(f"{path}: key 'host' must be a table of [host.\"URL\"] tables")
        result = []
        for url, table in hosts_table.items():  # tomllib keeps file order: mirrors are tried in it
            where = f'host."{url}".'
            if not isinstance(table, dict):
                raise HostsConfigError(f"{path}: key '{where[:-1]}' must be a table")
            _check_keys(path, where, table, _HOST_KEYS)
            result.append(self._parse_host(path, where, url, table, mirror=True))
        server = data.get("server")
        if server is None:
            origin = self._default_origin(registry)
            server = f"{origin.scheme}://{origin.host}"
        elif not isinstance(server, str) or not server:
            raise HostsConfigError(f"{path}: key 'server' must be a non-empty string")
        top = {k: v for k, v in data.items() if k in _HOST_KEYS}
        result.append(self._parse_host(path, "", server, top, mirror=False))
        return tuple(result)

    def _parse_host(
        self, path: Path, where: str, url: str, table: dict[str, Any], *, mirror: bool
    ) -> RegistryHost:
        base = path.parent
        if "://" not in url:
            url = ("http://" if self.plain_http(url.split("/", 1)[0]) else "https://") + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise HostsConfigError(f"{path}: key '{where or 'server'}': {url!r} is not an http(s) URL")
        override = table.get("override_path", False)
        if not isinstance(override, bool):
            raise HostsConfigError(f"{path}: key '{where}override_path' must be a boolean")
        api_path = posixpath.normpath(parts.path) if parts.path not in ("", "/") else ""
        if not override and not api_path.endswith("/v2"):
            api_path += "/v2"

        capabilities = table.get("capabilities", sorted(CAPABILITIES))
        if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
            raise HostsConfigError(f"{path}: key '{where}capabilities' must be a list of strings")
        unknown = {c.lower() for c in capabilities} - CAPABILITIES
        if unknown:
            raise HostsConfigError(
                f"{path}: key '{where}capabilities': unknown capability {sorted(unknown)[0]!r}"
                f" (expected pull, resolve, push)"
            )
        skip_verify = table.get("skip_verify", False)
        if not isinstance(skip_verify, bool):
            raise HostsConfigError(f"{path}: key '{where}skip_verify' must be a boolean")

        return RegistryHost(
            scheme=parts.scheme,
            host=parts.netloc,
            path=api_path,
            capabilities=frozenset(c.lower() for c in capabilities),
            skip_verify=skip_verify,
            ca=tuple(str(base / p) for p in _ca_files(path, where, table.get("ca"))),
            client=tuple(
                (str(base / c), str(base / k) if k else "") for c, k in _client_pairs(path, where, table)
            ),
            header=_headers(path, where, table.get("header", {})),
            mirror=mirror,
        )


def _check_keys(path: Path, where: str, table: dict[str, Any], allowed: frozenset[str]) -> None:
    for key in table:
        if key not in allowed:
            raise HostsConfigError(f"{path}: unknown key '{where}{key}'")


def _ca_files(path: Path, where: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise HostsConfigError(f"{path}: key '{where}ca' must be a string or a list of strings")


def _client_pairs(path: Path, where: str, table: dict[str, Any]) -> list[tuple[str, str]]:
    value = table.get("client")
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise HostsConfigError(f"{path}: key '{where}client' must be a string or a list")
    pairs = []
    for item in items:
        if isinstance(item, str):
            pairs.append((item, ""))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item):
            pairs.append((item[0], item[1]))
        else:
            raise HostsConfigError(
                f"{path}: key '{where}client': {item!r} is not a file or a [cert, key] pair"
            )
    return pairs


def _headers(path: Path, where: str, value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise HostsConfigError(f"{path}: key '{where}header' must be a table")
    out: list[tuple[str, str]] = []
    for name, v in value.items():
        if isinstance(v, str):
            out.append((name, v))
        elif isinstance(v, list) and all(isinstance(s, str) for s in v):
            out.extend((name, s) for s in v)
        else:
            raise HostsConfigError(
                f"{path}: key '{where}header.{name}' must be a string or a list of strings"
            )
    return tuple(out)
