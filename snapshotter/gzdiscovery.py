"""Finding the gzip indexes of an image's plain gzip layers among its OCI 1.1 referrers.

``lazysnap index --push`` attaches to an image manifest a referrer artifact (artifactType
``gzindex.ARTIFACT_TYPE``) holding one index blob per layer (docs/GZIP-INDEX.md). Here the daemon
finds it again (``snapshotter.referrers``): the manifest's referrers are listed (referrers API,
else the referrers tag schema), the artifacts of that type are fetched by digest, and only one
whose ``subject`` is the pulled manifest's digest counts. Its layer descriptors give, per layer
digest, the index blob's digest and size: that digest pins the index (``gzindex.parse_index``
verifies the blob against it) and the index names its layer's digest and size again. Registry
documents are bounded in size and count before they are read.
"""

from __future__ import annotations

from dataclasses import dataclass

from snapshotter.digest import InvalidDigestError, validate_digest
from snapshotter.fetcher import Descriptor, RegistryClient
from snapshotter.formats import gzindex
from snapshotter.referrers import BadArtifactError, ListReferrers, fetch_artifact, newest_of_type

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


def _indexes(descriptors: list[Descriptor]) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for desc in descriptors:
        if desc.media_type != gzindex.INDEX_MEDIA_TYPE:
            continue
        try:
            layer = validate_digest(desc.annotations.get(gzindex.LAYER_ANNOTATION, ""))
            out.setdefault(layer, (validate_digest(desc.digest), desc.size))
        except InvalidDigestError as exc:
            raise BadArtifactError(f"index blob {desc.digest}: {exc}") from None
    return out


async def find_indexes(
    client: RegistryClient,
    reference: str,
    manifest_digest: str,
    list_referrers: ListReferrers | None = None,
) -> tuple[dict[str, FoundIndex], list[str]]:
    """The indexes attached to manifest ``manifest_digest`` of ``reference``'s repository, by
    layer digest, and why artifacts of the index type were skipped. The registry's errors
    (FetchError) propagate: the caller decides what an unreachable registry means."""
    listed = await (list_referrers or client.referrers)(reference, manifest_digest)
    found: dict[str, FoundIndex] = {}
    skipped: list[str] = []
    # The newest first: a re-indexed image's latest artifact wins.
    for desc in newest_of_type(listed, gzindex.ARTIFACT_TYPE, MAX_ARTIFACTS):
        try:
            layers = _indexes(
                await fetch_artifact(client, reference, desc.digest, manifest_digest, gzindex.ARTIFACT_TYPE)
            )
        except BadArtifactError as exc:
            skipped.append(f"referrer {desc.digest}: {exc}")
            continue
        for layer, (digest, size) in layers.items():
            found.setdefault(layer, FoundIndex(layer, digest, size, desc.digest))
    return found, skipped
