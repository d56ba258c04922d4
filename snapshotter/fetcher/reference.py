"""Image references: parse ``host[:port]/repo[:tag][@digest]`` with Docker's normalisation.

Follows the distribution/reference grammar: the first path component is a registry host only if it
contains ``.`` or ``:``, is ``localhost``, or has an upper-case letter; otherwise the image lives on
Docker Hub (``docker.io``), where one-component names get the ``library/`` prefix. A reference with
neither tag nor digest means ``:latest``. The host is kept as written (``docker.io``), because that
is the name certs.d directories use; hosts.py maps it to the ``registry-1.docker.io`` endpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from snapshotter.fetcher.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
_LEGACY_HUB = "index.docker.io"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_NAME_MAX = 255


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference."""

    host: str  # registry host[:port] as named by the reference, e.g. "docker.io", "127.0.0.1:5000"
    repository: str  # e.g. "library/alpine"
    tag: str | None = None
    digest: str | None = None

    @property
    def object(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def scope(self) -> str:
        """The token scope for pulling from this repository."""
        return f"repository:{self.repository}:pull"

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it has the ``algorithm:encoded`` shape, else raise ``InvalidReferenceError``."""
    if not DIGEST_RE.fullmatch(digest):
        raise InvalidReferenceError(f"invalid digest {digest!r}")
    return digest


def parse_reference(ref: str) -> Reference:
    """Parse and normalise an image reference; raise ``InvalidReferenceError`` if it is malformed."""
    text = ref.strip()
    if not text or text != ref:
        raise InvalidReferenceError(f"invalid reference {ref!r}: empty or surrounded by whitespace")
    digest: str | None = None
    if "@" in text:
        text, digest = text.rsplit("@", 1)
        if not DIGEST_RE.fullmatch(digest):
            raise InvalidReferenceError(f"invalid reference {ref!r}: bad digest {digest!r}")
    tag: str | None = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:  # a colon in the last component is a tag, not a port
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReferenceError(f"invalid reference {ref!r}: bad tag {tag!r}")

    host, _, rest = text.partition("/")
    if not rest or not _is_domain(host):
        host, rest = DOCKER_HUB, text
    elif host == _LEGACY_HUB:
        host = DOCKER_HUB
    if not _DOMAIN.fullmatch(host):
        raise InvalidReferenceError(f"invalid reference {ref!r}: bad registry host {host!r}")
    if host == DOCKER_HUB and "/" not in rest:
        rest = f"library/{rest}"
    if len(rest) > _NAME_MAX or not all(_COMPONENT.fullmatch(c) for c in rest.split("/")):
        raise InvalidReferenceError(f"invalid reference {ref!r}: bad repository name {rest!r}")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(host=host, repository=rest, tag=tag, digest=digest)


def _is_domain(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or component != component.lower()
