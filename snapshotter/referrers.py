"""OCI 1.1 referrer artifacts that lazysnap attaches to an image manifest: building, pushing, finding.

An artifact is an image manifest with an ``artifactType``, the empty config, its blobs as
``layers`` and the image manifest as ``subject``. Pushing it to a registry that does not process
the subject (no ``OCI-Subject`` header, as distribution 2.8) also updates the referrers tag schema:
the image index tagged ``sha256-<subject hex>`` listing the subject's referrers. Finding one lists
the subject's referrers (``RegistryClient.referrers``: the API, else the tag schema), keeps those of
one artifact type, newest first, and checks each fetched artifact's ``subject``: only artifacts
pinned to the pulled manifest count. The gzip indexes (``indexer``, ``gzdiscovery``) and the shared
startup profiles (``sharedprofile``) are such artifacts.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from snapshotter.fetcher import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ManifestError,
    ManifestNotFoundError,
    Pusher,
    Reference,
    RegistryClient,
    parse_descriptor,
)
from snapshotter.fetcher.manifest import digest_of, parse_referrers, referrers_tag
from snapshotter.image import canonical_json

EMPTY_CONFIG_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
PUSH_CHUNK_SIZE = 8 << 20


class BadArtifactError(ValueError):
    """A referrer artifact that cannot be used (the message says why)."""


class AttachError(Exception):
    """The artifact could not be attached as asked (the referrers tag holds something else)."""


def artifact_manifest(
    artifact_type: str,
    layers: Sequence[Mapping[str, Any]],
    subject: Mapping[str, Any],
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """The artifact's manifest (canonical JSON): the empty config, ``layers`` (descriptors), the
    ``subject`` descriptor (mediaType, digest, size of the image manifest)."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {
            "mediaType": EMPTY_CONFIG_TYPE,
            "digest": digest_of(EMPTY_CONFIG),
            "size": len(EMPTY_CONFIG),
            "data": base64.b64encode(EMPTY_CONFIG).decode(),
        },
        "layers": [dict(layer) for layer in layers],
        "subject": dict(subject),
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return canonical_json(doc)


def with_referrer(index_doc: dict[str, Any] | None, artifact: bytes) -> bytes | None:
    """The referrers tag schema's image index with ``artifact`` listed (the spec's rules: the
    descriptor carries the artifact's artifactType and annotations, no duplicates); None when it
    is listed already."""
    digest = digest_of(artifact)
    manifests: list[Any] = list(index_doc.get("manifests", [])) if index_doc else []
    if any(isinstance(m, dict) and m.get("digest") == digest for m in manifests):
        return None
    doc = json.loads(artifact)
    entry: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": len(artifact),
        "artifactType": doc["artifactType"],
    }
    if doc.get("annotations"):
        entry["annotations"] = doc["annotations"]
    out = dict(index_doc or {})
    out.update({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*manifests, entry]})
    return canonical_json(out)


async def attach(
    client: RegistryClient,
    ref: Reference,
    subject_digest: str,
    blobs: Sequence[tuple[str, bytes]],
    artifact: bytes,
) -> tuple[str, str]:
    """Push ``blobs`` (digest, bytes), the empty config and ``artifact`` (whose subject is
    ``subject_digest``) to ``ref``'s repository: (the artifact's digest, the referrers tag when
    the registry needed the tag schema, else ""). AttachError when that tag holds something else."""
    pusher = Pusher(client, chunk_size=PUSH_CHUNK_SIZE)
    repo = Reference(ref.host, ref.repository)
    for digest, data in blobs:
        await pusher.push_blob(repo, digest, data)
    await pusher.push_blob(repo, digest_of(EMPTY_CONFIG), EMPTY_CONFIG)
    digest, subject = await pusher.put_manifest_subject(repo, artifact, OCI_MANIFEST)
    if subject == subject_digest:
        return digest, ""
    # No referrers API: keep the referrers tag schema's list (pull, append, push).
    tag = referrers_tag(subject_digest)
    current: dict[str, Any] | None = None
    try:
        kind, doc, _ = await client.manifest(Reference(ref.host, ref.repository, tag=tag))
        if kind != OCI_INDEX:
            raise AttachError(f"the referrers tag {tag} names a {kind}, not an image index: not touched")
        parse_referrers(doc)
        current = doc
    except ManifestNotFoundError:
        current = None
    except ManifestError as exc:
        raise AttachError(f"the referrers tag {tag} holds no referrers list: {exc}") from None
    updated = with_referrer(current, artifact)
    if updated is not None:
        await pusher.put_manifest(Reference(ref.host, ref.repository, tag=tag), updated, OCI_INDEX)
    return digest, tag


# How a discovery lists a manifest's referrers: ``client.referrers`` itself, or a caller's shared
# listing (the daemon lists each pulled manifest once for every kind of artifact it looks for).
ListReferrers = Callable[[str, str], Awaitable[list[Descriptor]]]


def newest_of_type(listed: Sequence[Descriptor], artifact_type: str, limit: int) -> list[Descriptor]:
    """The referrers of ``artifact_type``, newest first (referrers lists append: a re-pushed
    artifact is listed last), at most ``limit``."""
    artifacts = [d for d in listed if d.artifact_type == artifact_type and d.media_type == OCI_MANIFEST]
    return list(reversed(artifacts))[:limit]


def artifact_layers(doc: Mapping[str, object], subject: str, artifact_type: str) -> list[Descriptor]:
    """The blobs of one referrer artifact's manifest, checked to be of ``artifact_type`` and
    pinned to manifest ``subject``; BadArtifactError otherwise."""
    if doc.get("artifactType") != artifact_type:
        raise BadArtifactError(f"artifactType is {doc.get('artifactType')!r}")
    try:
        pointed = parse_descriptor(doc.get("subject"), "subject")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ManifestError("no 'layers' list")
        descriptors = [parse_descriptor(value, f"layers[{i}]") for i, value in enumerate(layers)]
    except ManifestError as exc:
        raise BadArtifactError(str(exc)) from None
    if pointed.digest != subject:
        raise BadArtifactError(f"its subject is {pointed.digest}, not the pulled manifest {subject}")
    return descriptors


async def fetch_artifact(
    client: RegistryClient, reference: str, digest: str, subject: str, artifact_type: str
) -> list[Descriptor]:
    """Fetch referrer artifact ``digest`` (verified against it) and return its blobs' descriptors,
    checked as ``artifact_layers`` does. The registry's errors (FetchError) propagate."""
    kind, doc, _ = await client.manifest(reference, digest)
    if kind != OCI_MANIFEST:
        raise BadArtifactError(f"it is a {kind}")
    return artifact_layers(doc, subject, artifact_type)


__all__ = [
    "EMPTY_CONFIG",
    "EMPTY_CONFIG_TYPE",
    "AttachError",
    "BadArtifactError",
    "artifact_layers",
    "artifact_manifest",
    "attach",
    "fetch_artifact",
    "newest_of_type",
    "with_referrer",
]
