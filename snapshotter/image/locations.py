"""Where an image comes from or goes to: a registry reference, or an OCI layout directory.

The syntax follows skopeo's transports: ``oci:DIR[:TAG]`` is a layout (the first ``:`` after
``oci:`` ends the directory, so a directory name cannot hold one), ``[docker://]HOST/REPO[:TAG]``
a registry. A bare name that happens to start with ``oci:`` is therefore a layout: write
``docker://`` in front to mean the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from snapshotter.fetcher import InvalidReferenceError, Reference, parse_reference

LAYOUT_PREFIX = "oci:"
REGISTRY_PREFIX = "docker://"
SYNTAX = "HOST/REPO[:TAG], docker://HOST/REPO[:TAG] or oci:DIR[:TAG]"
_OTHER_TRANSPORTS = ("oci-archive:", "docker-archive:", "docker-daemon:", "dir:", "containers-storage:")


@dataclass(frozen=True)
class RegistryLocation:
    ref: Reference

    def __str__(self) -> str:
        return str(self.ref)


@dataclass(frozen=True)
class LayoutLocation:
    path: Path
    tag: str | None = None

    def __str__(self) -> str:
        return f"{LAYOUT_PREFIX}{self.path}" + (f":{self.tag}" if self.tag else "")


Location = RegistryLocation | LayoutLocation


def parse_location(text: str) -> Location:
    """Parse SRC or DST; raise InvalidReferenceError (a ValueError) naming the accepted syntax."""
    if text.startswith(LAYOUT_PREFIX):
        path, colon, tag = text[len(LAYOUT_PREFIX) :].partition(":")
        if not path:
            raise InvalidReferenceError(f"invalid location {text!r}: oci: needs a directory (oci:DIR[:TAG])")
        if colon and not tag:
            raise InvalidReferenceError(f"invalid location {text!r}: empty tag after the directory")
        return LayoutLocation(Path(path), tag or None)
    if text.startswith(_OTHER_TRANSPORTS):
        raise InvalidReferenceError(f"unsupported location {text!r}: use {SYNTAX}")
    name = text.removeprefix(REGISTRY_PREFIX)
    if "://" in name:
        raise InvalidReferenceError(f"unsupported location {text!r}: use {SYNTAX}")
    try:
        return RegistryLocation(parse_reference(name))
    except InvalidReferenceError as e:
        raise InvalidReferenceError(f"{e} (expected {SYNTAX})") from None
