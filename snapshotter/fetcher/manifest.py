"""Image manifests and indexes (OCI and Docker schema 2): typed results, platform choice, digests.

Pure functions on bytes; the client does the HTTP. Docker schema 1 manifests are refused: they
carry no layer sizes or digests of the compressed blobs we need.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from snapshotter.fetcher.reference import Reference

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
# What containerd's resolver accepts, in its order.
ACCEPT = ", ".join([DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"])
MAX_MANIFEST_BYTES = 4 << 20  # containerd's limit too: a manifest bigger than this is not one

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}
_HASHES = {"sha256": 64, "sha512": 128}


class ManifestError(ValueError):
    """The document is not a manifest or index we can use."""


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""  # "" matches any variant

    def matches(self, other: Platform) -> bool:
        if self.os != other.os or _arch(self.architecture) != _arch(other.architecture):
            return False
        if not self.variant:
            return True
        return _variant(self.architecture, self.variant) == _variant(other.architecture, other.variant)


def _arch(arch: str) -> str:
    return _ARCH_ALIASES.get(arch, arch)


def _variant(arch: str, variant: str) -> str:
    return "v8" if _arch(arch) == "arm64" and variant in ("", "8") else variant


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor as found in a manifest."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, hash=False)
    urls: tuple[str, ...] = ()
    platform: Platform | None = None
    artifact_type: str = ""  # OCI 1.1: what a referrer is (in a referrers list)


@dataclass(frozen=True)
class ResolvedImage:
    """An image reference resolved to one platform's manifest."""

    reference: Reference
    manifest_digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    index_digest: str | None = None  # set when the reference named an index or manifest list
    annotations: dict[str, str] = field(default_factory=dict, hash=False)
    manifest: bytes = field(default=b"", repr=False)  # the raw manifest, for callers that store it


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of ``data``; ManifestError for an algorithm we cannot compute."""
    if algorithm not in _HASHES:
        raise ManifestError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def matches_digest(data: bytes, digest: str) -> bool:
    algorithm, _, _ = digest.partition(":")
    return digest_of(data, algorithm) == digest


def load_document(body: bytes, content_type: str) -> tuple[str, dict[str, Any]]:
    """Decode a manifest or index; return its media type (body's, else header's) and its JSON."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise ManifestError("manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    media_type = doc.get("mediaType") or content_type.split(";", 1)[0].strip()
    if not media_type or media_type in ("application/json", "application/octet-stream", "text/plain"):
        # An OCI document may omit mediaType; its shape tells which one it is.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if doc.get("schemaVersion") == 1 or media_type.startswith(
        "application/vnd.docker.distribution.manifest.v1"
    ):
        raise ManifestError("Docker schema 1 manifests are not supported")
    if media_type not in INDEX_TYPES | MANIFEST_TYPES:
        raise ManifestError(f"unsupported manifest media type {media_type!r}")
    return media_type, doc


def select_platform(doc: dict[str, Any], platform: Platform) -> Descriptor:
    """The first manifest of an index whose platform matches (attestations never match)."""
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError("index has no 'manifests' list")
    available = []
    for i, entry in enumerate(entries):
        desc = parse_descriptor(entry, f"manifests[{i}]")
        if desc.platform is None:
            continue
        available.append(f"{desc.platform.os}/{desc.platform.architecture}")
        if desc.media_type in MANIFEST_TYPES | INDEX_TYPES and platform.matches(desc.platform):
            return desc
    wanted = "/".join(p for p in (platform.os, platform.architecture, platform.variant) if p)
    raise ManifestError(f"no manifest for platform {wanted} (index has: {', '.join(available) or 'none'})")


def parse_image_manifest(doc: dict[str, Any]) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """The config and layer descriptors of an image manifest."""
    config = parse_descriptor(doc.get("config"), "config")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ManifestError("manifest has no 'layers' list")
    return config, tuple(parse_descriptor(layer, f"layers[{i}]") for i, layer in enumerate(layers))


def string_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ManifestError(f"{where} must map strings to strings")
    return dict(value)


def parse_descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ManifestError(f"{where} is not a descriptor object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str) or ":" not in digest:
        raise ManifestError(f"{where} lacks a mediaType or digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where} has no valid size")
    urls = value.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ManifestError(f"{where}.urls must be a list of strings")
    artifact_type = value.get("artifactType", "")
    if not isinstance(artifact_type, str):
        raise ManifestError(f"{where}.artifactType must be a string")
    platform = None
    raw = value.get("platform")
    if isinstance(raw, dict):
        platform = Platform(
            os=str(raw.get("os", "")),
            architecture=str(raw.get("architecture", "")),
            variant=str(raw.get("variant", "")),
        )
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        annotations=string_map(value.get("annotations"), f"{where}.annotations"),
        urls=tuple(urls),
        platform=platform,
        artifact_type=artifact_type,
    )


MAX_REFERRERS = 4096  # descriptors read from one referrers list (a list is bounded in bytes too)


def parse_referrers(doc: dict[str, Any]) -> list[Descriptor]:
    """The descriptors of a referrers list (an image index, from the referrers API or the
    referrers tag schema); ManifestError when it is not one."""
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError("referrers list has no 'manifests' list")
    if len(entries) > MAX_REFERRERS:
        raise ManifestError(f"referrers list of {len(entries)} entries (at most {MAX_REFERRERS} are read)")
    return [parse_descriptor(entry, f"manifests[{i}]") for i, entry in enumerate(entries)]


def referrers_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject digest (OCI distribution spec 1.1): the
    algorithm truncated to 32 characters, "-", the encoded part truncated to 64, with characters
    a tag cannot hold replaced by "-"."""
    algorithm, _, encoded = digest.partition(":")
    tag = f"{algorithm[:32]}-{encoded[:64]}"
    return "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in tag)
