"""Finding the gzip indexes of an image's plain gzip layers among its OCI 1.1 referrers.

``lazysnap index --push`` attaches to an image manifest a referrer artifact (artifactType
``gzindex.ARTIFACT_TYPE``) holding one index blob per layer (docs/GZIP-INDEX.md). Here the daemon
finds it again: the manifest's referrers are listed (referrers API, else the referrers tag schema),
the artifacts of that type are fetched by digest, and only one whose ``subject`` is the pulled
manifest's digest counts. Its layer descriptors give, per layer digest, the index blob's digest
and size: that digest pins the index (``gzindex.parse_index`` verifies the blob against it) and
the index names its layer's digest and size again. Registry documents are bounded in size and
count before they are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from snapshotter.digest import InvalidDigestError, validate_digest
from snapshotter.fetcher import OCI_MANIFEST, ManifestError, RegistryClient, parse_descriptor
from snapshotter.formats import gzindex

MAX_ARTIFACTS = 4  # index artifacts of one image fetched (the newest pushes are listed last)


@dataclass(frozen=True)
class FoundIndex:
    """A layer's index blob, and the referrer artifact that names it."""

    layer: str
    digest: str
    size: int
    referrer: str

    def annotations(self) -> dict[str, str]:
        """What the ``gzindex`` layer format reads from a layer's annotations."""
        return {
            gzindex.INDEX_DIGEST_KEY: self.digest,
            gzindex.INDEX_SIZE_KEY: str(self.size),
            gzindex.INDEX_LAYER_KEY: self.layer,
            gzindex.INDEX_REFERRER_KEY: self.referrer,
        }


class BadIndexArtifactError(ValueError):
    """A referrer artifact of the index type that cannot be used (the message says why)."""


def indexes_in_artifact(doc: Mapping[str, object], subject: str) -> dict[str, tuple[str, int]]:
    """Layer digest -> (index blob digest, size) of one referrer artifact's manifest, checked to
    be an index artifact whose subject is ``subject``; BadIndexArtifactError otherwise."""
    if doc.get("artifactType") != gzindex.ARTIFACT_TYPE:
        raise BadIndexArtifactError(f"artifactType is {doc.get('artifactType')!r}")
    try:
        pointed = parse_descriptor(doc.get("subject"), "subject")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ManifestError("no 'layers' list")
        descriptors = [parse_descriptor(value, f"layers[{i}]") for i, value in enumerate(layers)]
    except ManifestError as exc:
        raise BadIndexArtifactError(str(exc)) from None
    if pointed.digest != subject:
        raise BadIndexArtifactError(f"its subject is {pointed.digest}, not the pulled manifest {subject}")
    out: dict[str, tuple[str, int]] = {}
    for desc in descriptors:
        if desc.media_type != gzindex.INDEX_MEDIA_TYPE:
            continue
        try:
            layer = validate_digest(desc.annotations.get(gzindex.LAYER_ANNOTATION, ""))
            out.setdefault(layer, (validate_digest(desc.digest), desc.size))
        except InvalidDigestError as exc:
            raise BadIndexArtifactError(f"index blob {desc.digest}: {exc}") from None
    return out


async def find_indexes(
    client: RegistryClient, reference: str, manifest_digest: str
) -> tuple[dict[str, FoundIndex], list[str]]:
    """The indexes attached to manifest ``manifest_digest`` of ``reference``'s repository, by
    layer digest, and why artifacts of the index type were skipped. The registry's errors
    (FetchError) propagate: the caller decides what an unreachable registry means."""
    listed = await client.referrers(reference, manifest_digest)
    artifacts = [
        d for d in listed if d.artifact_type == gzindex.ARTIFACT_TYPE and d.media_type == OCI_MANIFEST
    ]
    found: dict[str, FoundIndex] = {}
    skipped: list[str] = []
    # The newest first: referrers lists append, so a re-indexed image's latest artifact wins.
    for desc in list(reversed(artifacts))[:MAX_ARTIFACTS]:
        try:
            kind, doc, _ = await client.manifest(reference, desc.digest)
            if kind != OCI_MANIFEST:
                raise BadIndexArtifactError(f"it is a {kind}")
            layers = indexes_in_artifact(doc, manifest_digest)
        except BadIndexArtifactError as exc:
            skipped.append(f"referrer {desc.digest}: {exc}")
            continue
        for layer, (digest, size) in layers.items():
            found.setdefault(layer, FoundIndex(layer, digest, size, desc.digest))
    return found, skipped
