"""What a successor needs to resume serving an initialized FUSE connection: the session state file.

A FUSE connection is negotiated once (INIT) and then lives as long as some process holds its
/dev/fuse fd. A new server process that takes over the fd must not expect a second INIT; it must
know what the first one agreed on and which node id the kernel knows each file by (the kernel keeps
its inodes, dentries and page cache across the handover). This module owns that record and its
file: JSON, replaced atomically (write to a temporary file, then rename) on every change, so a kill
at any instant leaves either the old or the new record. It needs no fsync: the record is worthless
after a reboot, which also ends the mount.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
# Layer blob names: a digest with its algorithm, ":" spelled "-" as in file names.
BLOB_NAME = re.compile(r"(?:sha256-[0-9a-f]{64}|sha512-[0-9a-f]{128})")
# A state file is small; refuse anything absurd rather than parse it.
MAX_STATE_BYTES = 16 << 20


class StateError(Exception):
    """The state file is missing, unreadable or does not describe a usable session."""


def valid_name(name: str) -> bool:
    """True for a blob file name this server accepts (``sha256-<64 hex>`` or ``sha512-<128 hex>``)."""
    return BLOB_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class Negotiated:
    """The outcome of INIT, fixed for the life of the connection."""

    minor: int  # protocol 7.minor in use
    kernel_flags: int  # what the kernel offered (64 bits)
    flags: int  # what the server enabled (64 bits)
    max_read: int  # bytes in the largest READ the kernel will send
    max_readahead: int

    @property
    def can_resend(self) -> bool:
        """The kernel supports FUSE_NOTIFY_RESEND (Linux 6.9, protocol 7.40)."""
        return bool(self.kernel_flags & (1 << 39))


@dataclass(frozen=True)
class FileRecord:
    nodeid: int
    size: int


@dataclass
class SessionState:
    """One mounted connection: where, which one (``dev``), what INIT agreed, which files it has."""

    mountpoint: str
    dev: str  # "major:minor" of the mounted file system, from /proc/self/mountinfo
    negotiated: Negotiated
    next_nodeid: int
    files: dict[str, FileRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        n = self.negotiated
        return {
            "version": FORMAT_VERSION,
            "mountpoint": self.mountpoint,
            "dev": self.dev,
            "negotiated": {
                "minor": n.minor,
                "kernel_flags": n.kernel_flags,
                "flags": n.flags,
                "max_read": n.max_read,
                "max_readahead": n.max_readahead,
            },
            "next_nodeid": self.next_nodeid,
            "files": {name: [r.nodeid, r.size] for name, r in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, doc: Any) -> SessionState:
        try:
            if doc["version"] != FORMAT_VERSION:
                raise StateError(f"state format {doc['version']!r}, expected {FORMAT_VERSION}")
            neg = doc["negotiated"]
            negotiated = Negotiated(
                _int(neg["minor"]),
                _int(neg["kernel_flags"]),
                _int(neg["flags"]),
                _int(neg["max_read"]),
                _int(neg["max_readahead"]),
            )
            files: dict[str, FileRecord] = {}
            for name, (nodeid, size) in doc["files"].items():
                if not valid_name(name):
                    raise StateError(f"bad blob name {name!r}")
                files[name] = FileRecord(_int(nodeid), _int(size))
            state = cls(str(doc["mountpoint"]), str(doc["dev"]), negotiated, _int(doc["next_nodeid"]), files)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"malformed state: {exc!r}") from None
        if any(r.nodeid <= 1 or r.nodeid >= state.next_nodeid for r in files.values()):
            raise StateError("node ids out of range")
        if len({r.nodeid for r in files.values()}) != len(files):
            raise StateError("duplicate node ids")
        return state

    def save(self, path: Path) -> None:
        """Replace ``path`` atomically with this state."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.to_json(), fh, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> SessionState:
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_STATE_BYTES + 1)
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror}") from None
        if len(raw) > MAX_STATE_BYTES:
            raise StateError(f"{path} is larger than {MAX_STATE_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise StateError(f"{path} is not JSON: {exc}") from None
        return cls.from_json(doc)


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value
