"""The registry of lazily mountable layer formats: one entry per format, found by its manifest facts.

Everything outside ``snapshotter.formats`` that needs to know "what kind of layer is this, where is
its metadata, what digest verifies it, can containerd unpack it without us" asks here. A new
format is one module (its parser) plus one ``LayerFormat`` in ``FORMATS``.

A format's metadata (an eStargz/zstd:chunked TOC, a Nydus-like bootstrap) is found from the blob's
tail (footer), fetched as ``[location.offset, location.offset + location.length)``, verified
against a digest rooted in the image manifest and parsed into a ``LayerIndex``. An indexed plain
gzip layer's metadata is a blob of its own (``metadata_blob``), found among the image's referrers
and verified against the digest the referrer artifact gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from snapshotter.formats import detect, gzindex, nydus
from snapshotter.formats.index import Compression, FormatError, LayerIndex


class Location(Protocol):
    """Where a layer's metadata lies in its blob."""

    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...


@dataclass(frozen=True)
class LayerFormat:
    """One family of layer formats.

    ``lazy_only``: containerd cannot unpack such a layer, so failing to mount it lazily must fail
    the pull (with the reason) instead of handing containerd a snapshot to fill."""

    name: str
    lazy_only: bool
    # Whether a layer is of this format, from its media type ("" when only labels are known).
    claims: Callable[[str, Mapping[str, str]], bool]
    # The manifest-rooted digest that verifies the metadata (None: the layer cannot be verified).
    expected_digest: Callable[[Mapping[str, str]], str | None]
    # (blob tail, blob size, annotations, max metadata bytes) -> where the metadata is.
    locate: Callable[[bytes, int, Mapping[str, str], int], Location]
    # (raw metadata, location, blob size, expected digest, max metadata bytes, max chunk bytes)
    # -> index.
    parse: Callable[[bytes, Any, int, str, int, int], LayerIndex]
    location_to_json: Callable[[Any], dict[str, Any]]
    location_from_json: Callable[[Mapping[str, Any]], Location]
    # The longest footer: the tail fetched first must hold at least this much.
    footer_bytes: int
    # When the metadata is not in the layer blob: (location) -> the blob holding it (digest, size),
    # read whole; ``locate`` then gets no tail.
    metadata_blob: Callable[[Any], tuple[str, int]] | None = None


def _stargz_claims(media_type: str, annotations: Mapping[str, str]) -> bool:
    return bool(detect.toc_digest_from_annotations(annotations))


def _stargz_location_to_json(location: detect.TocLocation) -> dict[str, Any]:
    return {**dataclasses.asdict(location), "compression": location.compression.value}


def _stargz_location_from_json(value: Mapping[str, Any]) -> detect.TocLocation:
    return detect.TocLocation(**{**value, "compression": Compression(value["compression"])})


STARGZ = LayerFormat(
    name="stargz",  # eStargz, legacy stargz and zstd:chunked: one TOC, told apart by the footer
    lazy_only=False,
    claims=_stargz_claims,
    expected_digest=detect.toc_digest_from_annotations,
    locate=lambda tail, size, annotations, _max: detect.locate_toc(
        tail[-detect.MAX_FOOTER_SIZE :], size, annotations
    ),
    parse=lambda raw, location, size, expected, max_bytes, max_chunk: detect.parse_toc(
        raw,
        location,
        blob_size=size,
        expected_digest=expected,
        max_toc_bytes=max_bytes,
        max_chunk_bytes=max_chunk,
    ),
    location_to_json=_stargz_location_to_json,
    location_from_json=_stargz_location_from_json,
    footer_bytes=detect.MAX_FOOTER_SIZE,
)

NYDUS = LayerFormat(
    name="nydus",
    lazy_only=True,
    claims=nydus.is_nydus_layer,
    expected_digest=nydus.bootstrap_digest,
    locate=lambda tail, size, _annotations, max_bytes: nydus.locate_bootstrap(
        tail, size, max_bytes=max_bytes
    ),
    # Nydus-like chunks are bounded by the format itself (nydus.MAX_CHUNK_SIZE).
    parse=lambda raw, location, size, expected, max_bytes, _max_chunk: nydus.parse_bootstrap(
        raw, location, blob_size=size, expected_digest=expected, max_bytes=max_bytes
    ),
    location_to_json=dataclasses.asdict,
    location_from_json=lambda value: nydus.BootstrapLocation(**value),
    footer_bytes=nydus.FOOTER_SIZE,
)

GZINDEX = LayerFormat(
    name=gzindex.FORMAT,  # an unchanged tar+gzip layer with a referrer index (docs/GZIP-INDEX.md)
    lazy_only=False,
    claims=gzindex.claims,
    expected_digest=gzindex.index_digest,
    locate=lambda _tail, _size, annotations, max_bytes: gzindex.locate(annotations, max_bytes),
    parse=lambda raw, location, size, expected, max_bytes, max_chunk: gzindex.parse_index(
        raw,
        location,
        blob_size=size,
        expected_digest=expected,
        max_bytes=max_bytes,
        max_chunk_bytes=max_chunk,
    ),
    location_to_json=dataclasses.asdict,
    location_from_json=lambda value: gzindex.IndexLocation(**value),
    footer_bytes=0,
    metadata_blob=lambda location: (location.index, location.length),
)

# Asked in order: a Nydus-like layer may also carry stargz-looking annotations, never the reverse;
# an eStargz layer is a tar+gzip layer too, and its own TOC wins over any index.
FORMATS: tuple[LayerFormat, ...] = (NYDUS, STARGZ, GZINDEX)


def format_of(media_type: str, annotations: Mapping[str, str]) -> LayerFormat | None:
    """The format that claims this layer, or None (containerd pulls it normally)."""
    return next((f for f in FORMATS if f.claims(media_type, annotations)), None)


def by_name(name: str) -> LayerFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise FormatError(f"unknown layer format {name!r}")


def requires_lazy_mount(labels: Mapping[str, str]) -> bool:
    """Whether a layer with these Prepare labels is in a format only lazysnap can mount."""
    fmt = format_of("", labels)
    return fmt is not None and fmt.lazy_only
