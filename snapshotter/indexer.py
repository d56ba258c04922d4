"""``lazysnap index``: build gzip indexes of an image's plain gzip layers and attach them to it.

For each ``tar+gzip`` layer of the image (registry or OCI layout) the blob is fetched (verified
against its digest), indexed in one pass (``snapshotter.formats.build_gzindex``; the stream is
checked against the config's DiffID) and, with ``push``, stored beside the image as one OCI 1.1
referrer artifact: an image manifest with ``artifactType`` ``gzindex.ARTIFACT_TYPE``, the empty
config, one layer per index blob (annotated with the layer it indexes) and the image manifest as
its ``subject``. A registry that did not process the subject (no ``OCI-Subject`` header, as
distribution 2.8) also gets the referrers tag schema: the image index tagged
``sha256-<subject hex>`` listing the subject's referrers, with this artifact added.
docs/GZIP-INDEX.md describes the artifact. Layers are indexed at most ``parallel_layers`` at once
(each holds its blob in memory while indexed).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter import referrers
from snapshotter.convert import ConvertError, _all, _load_config
from snapshotter.fetcher import (
    DEFAULT_CONFIG_DIR,
    MANIFEST_TYPES,
    OCI_MANIFEST,
    CredentialStore,
    Descriptor,
    HostsConfig,
    Reference,
    RegistryClient,
)
from snapshotter.formats import FormatError, gzindex, registry
from snapshotter.image import (
    ImageSource,
    LayoutLocation,
    Location,
    OciLayout,
    RegistryLocation,
    SourceImage,
    open_source,
)

DEFAULT_PARALLEL_LAYERS = 2


class IndexingError(Exception):
    """The image cannot be indexed as asked; the message says why."""


@dataclass(frozen=True)
class IndexOptions:
    span: int = gzindex.DEFAULT_SPAN
    push: bool = False
    parallel_layers: int = DEFAULT_PARALLEL_LAYERS
    threads: int = 0  # rapidgzip's per layer; 0: one per core


@dataclass(frozen=True)
class LayerOutcome:
    """One layer: indexed (``index_digest`` set) or skipped (``skipped`` says why)."""

    position: int
    digest: str
    size: int
    media_type: str
    skipped: str = ""
    index_digest: str = ""
    index_size: int = 0
    tar_size: int = 0
    checkpoints: int = 0
    chunks: int = 0
    files: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class IndexSummary:
    source: str
    manifest_digest: str
    layers: tuple[LayerOutcome, ...]
    artifact_digest: str = ""  # the pushed referrer artifact's manifest
    referrers_tag: str = ""  # the tag schema's tag, when the registry needed it
    seconds: float = 0.0

    @property
    def index_bytes(self) -> int:
        return sum(layer.index_size for layer in self.layers)

    @property
    def indexed_layer_bytes(self) -> int:
        return sum(layer.size for layer in self.layers if layer.index_digest)


def _skip_reason(desc: Descriptor) -> str:
    if not gzindex.is_plain_gzip_layer(desc.media_type):
        return f"not a tar+gzip layer ({desc.media_type})"
    fmt = registry.format_of(desc.media_type, gzindex.without_discovery(desc.annotations))
    if fmt is not None:
        return f"already lazily pullable ({fmt.name})"
    if desc.urls:
        return "a non-distributable (foreign) layer"
    return ""


async def build_indexes(
    source: ImageSource, image: SourceImage, options: IndexOptions
) -> list[tuple[LayerOutcome, bytes]]:
    """Every layer's outcome and index blob (b"" when skipped), bottom layer first."""
    config = _load_config(image.config, await source.read_blob(image.config), len(image.layers))
    diff_ids: list[str] = config["rootfs"]["diff_ids"]
    limit = asyncio.Semaphore(options.parallel_layers)

    async def one(i: int, desc: Descriptor) -> tuple[LayerOutcome, bytes]:
        skipped = _skip_reason(desc)
        if skipped:
            return LayerOutcome(i, desc.digest, desc.size, desc.media_type, skipped=skipped), b""
        async with limit:
            started = time.monotonic()
            blob = await source.read_blob(desc)

            def build(data: bytes) -> Any:
                from snapshotter.formats.build_gzindex import build_index

                return build_index(data, span=options.span, threads=options.threads, diff_id=diff_ids[i])

            try:
                built = await asyncio.to_thread(build, blob)
            except FormatError as exc:
                raise IndexingError(f"layer {i + 1} ({desc.digest}): {exc}") from None
            del blob  # before waiting for the other layers
        outcome = LayerOutcome(
            i,
            desc.digest,
            desc.size,
            desc.media_type,
            index_digest=built.digest,
            index_size=len(built.data),
            tar_size=built.tar_size,
            checkpoints=built.checkpoints,
            chunks=built.chunks,
            files=built.entries,
            seconds=time.monotonic() - started,
        )
        return outcome, built.data

    return await _all([one(i, d) for i, d in enumerate(image.layers)])


def artifact_manifest(image: SourceImage, indexes: list[tuple[LayerOutcome, bytes]]) -> bytes:
    """The referrer artifact's manifest: the empty config, one layer per index blob, the image
    manifest as subject."""
    layers = [
        {
            "mediaType": gzindex.INDEX_MEDIA_TYPE,
            "digest": outcome.index_digest,
            "size": outcome.index_size,
            "annotations": {gzindex.LAYER_ANNOTATION: outcome.digest},
        }
        for outcome, _ in indexes
        if outcome.index_digest
    ]
    subject = {"mediaType": image.media_type, "digest": image.digest, "size": image.size}
    return referrers.artifact_manifest(gzindex.ARTIFACT_TYPE, layers, subject)


async def push_to_registry(
    client: RegistryClient, ref: Reference, image: SourceImage, indexes: list[tuple[LayerOutcome, bytes]]
) -> tuple[str, str]:
    """Push the index blobs and the artifact; (its digest, the referrers tag if one was needed)."""
    blobs = [(outcome.index_digest, data) for outcome, data in indexes if outcome.index_digest]
    try:
        return await referrers.attach(client, ref, image.digest, blobs, artifact_manifest(image, indexes))
    except referrers.AttachError as exc:
        raise IndexingError(str(exc)) from None


def store_in_layout(path: Path, image: SourceImage, indexes: list[tuple[LayerOutcome, bytes]]) -> str:
    """Write the index blobs and the artifact into an OCI layout and list the artifact in its
    index.json (untagged, with its artifactType: how OCI layout tools find referrers)."""
    layout = OciLayout(path)
    for outcome, data in indexes:
        if outcome.index_digest:
            layout.write_blob(data)
    layout.write_blob(referrers.EMPTY_CONFIG)
    artifact = artifact_manifest(image, indexes)
    digest = layout.write_blob(artifact)
    layout.add_referrer(
        {
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": len(artifact),
            "artifactType": gzindex.ARTIFACT_TYPE,
        }
    )
    return digest


async def index_image(client: RegistryClient, location: Location, options: IndexOptions) -> IndexSummary:
    """Index the image at ``location``; with ``options.push``, attach the indexes to it."""
    if not gzindex.MIN_SPAN <= options.span <= gzindex.MAX_SPAN:
        raise ValueError(f"span {options.span} is outside [{gzindex.MIN_SPAN}, {gzindex.MAX_SPAN}]")
    started = time.monotonic()
    source = open_source(location, client)
    image = await source.resolve()
    if image.media_type not in MANIFEST_TYPES:
        raise IndexingError(f"{location} is a {image.media_type}, not an image manifest")
    try:
        indexes = await build_indexes(source, image, options)
    except ConvertError as exc:
        raise IndexingError(str(exc)) from None
    artifact = tag = ""
    if options.push and any(outcome.index_digest for outcome, _ in indexes):
        if isinstance(location, RegistryLocation):
            artifact, tag = await push_to_registry(client, location.ref, image, indexes)
        elif isinstance(location, LayoutLocation):
            artifact = await asyncio.to_thread(store_in_layout, location.path, image, indexes)
    return IndexSummary(
        source=str(location),
        manifest_digest=image.digest,
        layers=tuple(outcome for outcome, _ in indexes),
        artifact_digest=artifact,
        referrers_tag=tag,
        seconds=time.monotonic() - started,
    )


async def index_location(
    location: Location,
    options: IndexOptions,
    *,
    hosts_dir: str | Path | None = DEFAULT_CONFIG_DIR,
    docker_config: str | Path | None = None,
    plain_http: bool = False,
) -> IndexSummary:
    """``index_image`` with a registry client made from hosts.toml and docker credentials."""
    hosts = HostsConfig(
        hosts_dir,
        plain_http_hosts=[location.ref.host] if plain_http and isinstance(location, RegistryLocation) else (),
    )
    async with RegistryClient(hosts, CredentialStore(docker_config)) as client:
        return await index_image(client, location, options)


def summary_text(summary: IndexSummary) -> str:
    lines = []
    for layer in summary.layers:
        label = f"layer {layer.position + 1} {layer.digest[:19]}"
        if layer.skipped:
            lines.append(f"{label}: skipped: {layer.skipped}")
            continue
        share = 100 * layer.index_size / layer.size if layer.size else 0.0
        lines.append(
            f"{label}: {layer.size} bytes, {layer.files} entries, {layer.checkpoints} checkpoints, "
            f"{layer.chunks} chunks -> index {layer.index_size} bytes ({share:.2f}%) in {layer.seconds:.1f}s"
        )
    total = summary.indexed_layer_bytes
    share = 100 * summary.index_bytes / total if total else 0.0
    lines.append(f"indexes: {summary.index_bytes} bytes for {total} bytes of layers ({share:.2f}%)")
    if summary.artifact_digest:
        lines.append(f"attached to {summary.manifest_digest} as referrer {summary.artifact_digest}")
        if summary.referrers_tag:
            lines.append(f"  listed under the referrers tag {summary.referrers_tag} (no referrers API)")
    return "\n".join(lines)


__all__ = [
    "IndexOptions",
    "IndexSummary",
    "LayerOutcome",
    "artifact_manifest",
    "index_image",
    "index_location",
]
