"""Daemon configuration: one typed model, read from TOML with stdlib tomllib.

Every option and its default is documented in ``config/config.toml``; this module is the source of
truth for names, types and validation. Unknown keys and bad values are errors naming the key, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")


@dataclass(frozen=True)
class GrpcConfig:
    # Group (name or numeric id) allowed to use the socket besides root; the socket becomes 0660.
    socket_group: str = ""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "logfmt"

    def validate(self, where: str) -> None:
        if self.level not in LOG_LEVELS:
            raise ConfigError(f"{where}log.level: {self.level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.format not in LOG_FORMATS:
            raise ConfigError(f"{where}log.format: {self.format!r} is not one of {', '.join(LOG_FORMATS)}")


@dataclass(frozen=True)
class RemoteConfig:
    # Serve eStargz / zstd:chunked layers lazily when containerd passes the remote labels.
    enabled: bool = True
    # Longest a Prepare waits to resolve, fetch the TOC of and mount one lazy layer.
    mount_timeout_seconds: float = 60.0
    # Refuse a layer whose TOC decompresses to more than this (a bomb guard).
    max_toc_bytes: int = 32 << 20
    # A FUSE manager with no lazy layer mounted and no daemon running exits after this long.
    manager_idle_exit_seconds: float = 60.0
    # Serve plain tar+gzip layers lazily when the image has a gzip index attached as an OCI
    # referrer (`lazysnap index --push`); the index is trusted as the repository's pushers are.
    gzip_index: bool = True


FS_BACKENDS = ("erofs", "fuse")


@dataclass(frozen=True)
class FsConfig:
    # How a lazy layer's file system is served: "erofs" (the kernel serves it from a metadata
    # image; lazysnap supplies only missing file bytes) when the kernel can, else "fuse".
    backend: str = "erofs"
    # EROFS over loop devices instead of file-backed mounts (kernels before 6.12).
    loop_devices: bool = False
    # Threads answering the kernel's reads of data blobs (each may wait on the registry).
    blob_workers: int = 64

    def validate(self, where: str) -> None:
        if self.backend not in FS_BACKENDS:
            raise ConfigError(f"{where}fs.backend: {self.backend!r} is not one of {', '.join(FS_BACKENDS)}")
        if not 1 <= self.blob_workers <= 1024:
            raise ConfigError(f"{where}fs.blob_workers: {self.blob_workers} is not between 1 and 1024")


REST_POLICIES = ("eager", "idle-only", "off")


@dataclass(frozen=True)
class FetchConfig:
    timeout_seconds: float = 30.0  # per HTTP request
    max_retries: int = 5
    hosts_dir: Path = Path("/etc/containerd/certs.d")  # containerd's hosts.toml directory
    plain_http_hosts: list[str] = field(default_factory=list)  # besides loopback, always HTTP
    docker_config: str = ""  # "" = $DOCKER_CONFIG/config.json or ~/.docker/config.json
    # The rest of an image (what startup does not read): "eager" keeps the link busy until it is
    # local, "idle-only" only while nothing is read on demand, "off" never.
    rest: str = "eager"
    rate_bytes: int = 0  # bytes/s cap on everything but on-demand reads; 0 = none
    connections: int = 16  # concurrent range requests per registry
    idle_seconds: float = 1.0  # "idle-only": quiet this long after the last on-demand fetch

    def validate(self, where: str) -> None:
        if self.rest not in REST_POLICIES:
            raise ConfigError(f"{where}fetch.rest: {self.rest!r} is not one of {', '.join(REST_POLICIES)}")
        if self.rate_bytes < 0:
            raise ConfigError(f"{where}fetch.rate_bytes: {self.rate_bytes} is negative")
        if not 2 <= self.connections <= 256:
            raise ConfigError(f"{where}fetch.connections: {self.connections} is not between 2 and 256")


@dataclass(frozen=True)
class CacheConfig:
    max_bytes: int = 10 << 30  # chunk cache bound; least recently used chunks go first


@dataclass(frozen=True)
class PrefetchConfig:
    enabled: bool = True  # fetch each layer's startup set (prioritized files) ahead of reads


@dataclass(frozen=True)
class ReadConfig:
    timeout_seconds: float = 60.0  # a read waiting longer gets EIO
    readahead_bytes: int = 4 << 20  # a file read front to back is fetched at least this far ahead
    merge_gap_bytes: int = 64 << 10  # neighbouring ranges closer than this share a request
    max_request_bytes: int = 16 << 20


@dataclass(frozen=True)
class ProfileConfig:
    # Record, per image, the files its container reads first (`lazysnap profile export`).
    record: bool = False
    window_seconds: float = 60.0  # record first reads during this long after each layer mount
    # Look for a startup profile attached to the pulled manifest in the registry (docs/PROFILES.md)
    # when no profile was recorded here; `lazysnap profile push` attaches one.
    shared: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    # Prometheus endpoint: "" = only on the admin socket; "HOST:PORT" or "unix:/path".
    address: str = ""

    def validate(self, where: str) -> None:
        if not self.address or self.address.startswith("unix:/"):
            return
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"{where}metrics.address: {self.address!r} is not HOST:PORT or unix:/absolute/path"
            )


@dataclass(frozen=True)
class CriConfig:
    # Serve the CRI image-service proxy that hands Kubernetes pull secrets to lazy pulls.
    enable: bool = False
    listen: Path = Path("/run/lazysnap/cri.sock")  # the kubelet's --image-service-endpoint
    containerd_socket: Path = Path("/run/containerd/containerd.sock")  # calls are forwarded here
    persist_credentials: bool = False  # keep pull secrets in ROOT/cri/credentials.json (0600)
    # Lend a host's most recent pull secret to repositories of that host that have none.
    secret_host_fallback: bool = False

    def validate(self, where: str) -> None:
        for key, path in (("listen", self.listen), ("containerd_socket", self.containerd_socket)):
            if not path.is_absolute():
                raise ConfigError(f"{where}cri.{key}: {str(path)!r} must be an absolute path")
            if len(str(path).encode()) > 107:
                raise ConfigError(
                    f"{where}cri.{key}: {str(path)!r} is longer than a unix socket path may be (107 bytes)"
                )


FALLBACK_MODES = ("off", "eager")


@dataclass(frozen=True)
class FallbackConfig:
    # Layers that cannot be lazy: "off" leaves them to containerd; "eager" fetches the image's
    # layers in parallel and unpacks them as they arrive (needs the remote labels, as lazy does).
    mode: str = "off"
    layers_at_once: int = 4  # layers fetched and unpacked at the same time
    window_bytes: int = 16 << 20  # per layer: bytes fetched ahead of its unpacking (memory)
    min_free_bytes: int = 1 << 30  # free disk space under the root an eager pull leaves
    timeout_seconds: float = 1800.0  # a layer not unpacked this long after asked for is given up
    unclaimed_seconds: float = 120.0  # an unpacked layer no Prepare asked for is removed after this

    def validate(self, where: str) -> None:
        if self.mode not in FALLBACK_MODES:
            modes = ", ".join(FALLBACK_MODES)
            raise ConfigError(f"{where}fallback.mode: {self.mode!r} is not one of {modes}")
        if not 1 <= self.layers_at_once <= 64:
            raise ConfigError(
                f"{where}fallback.layers_at_once: {self.layers_at_once} is not between 1 and 64"
            )
        if self.window_bytes < 1 << 20:
            raise ConfigError(f"{where}fallback.window_bytes: {self.window_bytes} is less than 1 MiB")
        if self.min_free_bytes < 0:
            raise ConfigError(
                f"{where}fallback.min_free_bytes: must not be negative, got {self.min_free_bytes}"
            )
        for key, value in (
            ("timeout_seconds", self.timeout_seconds),
            ("unclaimed_seconds", self.unclaimed_seconds),
        ):
            if value <= 0:
                raise ConfigError(f"{where}fallback.{key}: must be greater than 0, got {value}")


@dataclass(frozen=True)
class Config:
    root: Path = Path("/var/lib/lazysnap")
    address: Path = Path("/run/lazysnap/lazysnap.sock")
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    log: LogConfig = field(default_factory=LogConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    fs: FsConfig = field(default_factory=FsConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    cri: CriConfig = field(default_factory=CriConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self, where: str = "") -> None:
        if not self.root.is_absolute():
            raise ConfigError(f"{where}root: {str(self.root)!r} must be an absolute path")
        if not self.address.is_absolute():
            raise ConfigError(f"{where}address: {str(self.address)!r} must be an absolute path")
        if len(str(self.address).encode()) > 107:
            raise ConfigError(
                f"{where}address: {str(self.address)!r} is longer than a unix socket path may be (107 bytes)"
            )
        self.log.validate(where)
        self.fs.validate(where)
        self.fetch.validate(where)
        self.fallback.validate(where)
        self.cri.validate(where)
        self.metrics.validate(where)
        positive = {
            "remote.mount_timeout_seconds": self.remote.mount_timeout_seconds,
            "remote.max_toc_bytes": self.remote.max_toc_bytes,
            "fetch.timeout_seconds": self.fetch.timeout_seconds,
            "cache.max_bytes": self.cache.max_bytes,
            "read.timeout_seconds": self.read.timeout_seconds,
            "read.max_request_bytes": self.read.max_request_bytes,
            "profile.window_seconds": self.profile.window_seconds,
        }
        not_negative = {
            "fetch.max_retries": self.fetch.max_retries,
            "fetch.idle_seconds": self.fetch.idle_seconds,
            "read.readahead_bytes": self.read.readahead_bytes,
            "read.merge_gap_bytes": self.read.merge_gap_bytes,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{where}{key}: must be greater than 0, got {value}")
        for key, value in not_negative.items():
            if value < 0:
                raise ConfigError(f"{where}{key}: must not be negative, got {value}")


def manager_fingerprint(config: Config) -> str:
    """A digest of the settings the FUSE manager runs with: a daemon restarted with other ones
    can tell that the running manager does not use them yet."""
    owned = (
        config.root,
        config.remote,
        config.fs,
        config.fetch,
        config.cache,
        config.prefetch,
        config.read,
        config.fallback,
    )
    return hashlib.sha256(repr((*owned, config.profile, config.cri)).encode()).hexdigest()[:16]


def with_backend(config: Config, backend: str | None) -> Config:
    """``config`` with ``fs.backend`` overridden by a command-line flag (None: unchanged)."""
    if backend is None:
        return config
    changed = dataclasses.replace(config, fs=dataclasses.replace(config.fs, backend=backend))
    changed.validate()
    return changed


def load(path: Path | None, **overrides: Any) -> Config:
    """Read ``path`` (None: defaults only), apply non-None ``overrides`` (command-line flags), and
    validate. Raises ConfigError naming the file and key on any problem."""
    where = f"{path}: " if path else ""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}not valid TOML: {exc}") from None
    deprecation_warnings[:] = _upgrade(data, where)
    config: Config = _build(Config, data, where, "")
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config.validate(where)
    return config


# Keys of earlier versions: accepted, so that an upgrade does not stop a node's daemon, and said
# in the log at start. A key that maps to a new one gives it its value (unless that is set too).
DEPRECATED: dict[str, tuple[str, Callable[[Any], Any]] | None] = {
    "prefetch.background": ("fetch.rest", lambda on: "eager" if on else "off"),
    "prefetch.background_rate_bytes": ("fetch.rate_bytes", lambda rate: rate),
    "prefetch.fetch_whole_below_bytes": None,
    "prefetch.background_delay_seconds": None,
    "prefetch.background_quiet_seconds": None,
    "read.small_file_readahead_bytes": None,
}
deprecation_warnings: list[str] = []  # what the last load() found, for the daemon to log


def _upgrade(data: dict[str, Any], where: str) -> list[str]:
    """Move or drop deprecated keys in ``data`` (a parsed TOML document) in place; say what."""
    said: list[str] = []
    for old, new in DEPRECATED.items():
        section, _, key = old.partition(".")
        table = data.get(section)
        if not isinstance(table, dict) or key not in table:
            continue
        value = table.pop(key)
        if new is None:
            said.append(f"{where}{old} is no longer used (the fetch scheduler decides); remove it")
            continue
        target, translate = new
        new_section, _, new_key = target.partition(".")
        destination = data.setdefault(new_section, {})
        if isinstance(destination, dict) and new_key not in destination:
            destination[new_key] = translate(value)
        said.append(f"{where}{old} is deprecated; use {target}")
    return said


def _build(cls: type[Any], data: dict[str, Any], where: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}unknown key {prefix + key!r}; known keys: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for name in known & data.keys():
        values[name] = _convert(hints[name], data[name], where, prefix + name)
    return cls(**values)


def _convert(hint: Any, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a table [{key}], got {type(value).__name__}")
        return _build(hint, value, where, key + ".")  # type: ignore[arg-type]
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}{key}: expected a non-empty path string, got {value!r}")
        return Path(value)
    if typing.get_origin(hint) in (list, types.GenericAlias):
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}{key}: expected a list, got {value!r}")
        return [_convert(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}{key}: unsupported option type {hint!r}")  # a bug in this module
