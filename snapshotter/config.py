"""Daemon configuration: one typed model, read from TOML with stdlib tomllib.

Every option and its default is documented in ``config/config.toml``; this module is the source of
truth for names, types and validation. Unknown keys and bad values are errors naming the key, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
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
class Config:
    root: Path = Path("/var/lib/lazysnap")
    address: Path = Path("/run/lazysnap/lazysnap.sock")
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    log: LogConfig = field(default_factory=LogConfig)

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
    config: Config = _build(Config, data, where, "")
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config.validate(where)
    return config


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
