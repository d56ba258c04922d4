"""Our eStargz / zstd:chunked parser reads what stargz-snapshotter's ``ctr-remote`` writes, and
our builder writes the same TOC as ctr-remote for the same layer.

The standard test image is converted with ``ctr-remote image convert --estargz|--zstdchunked
--oci`` inside a private containerd; the converted layer blobs and manifest come back out of
containerd's content store with ``ctr content get``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.formats import (
    UNCOMPRESSED_SIZE_ANNOTATION,
    Compression,
    build_blob,
)
from snapshotter.formats.zstdchunked import MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_POSITION_ANNOTATION
from tests.e2e.conftest import ContainerdFactory
from tests.support import oci
from tests.support.converted import (
    FORMAT_MEDIA_TYPES,
    PRIORITIZED,
    TUNED_CHUNK_SIZE,
    check_layer_against_tar,
    ctr_bytes,
    ctr_remote_convert,
    read_toc,
    toc_stream_count,
    toc_without_offsets,
)
from tests.support.oci import PushedImage
from tests.support.services import Containerd, Registry, require_privileges


@pytest.fixture
def converter(
    registry: Registry, base_image: PushedImage, containerd_factory: ContainerdFactory
) -> Containerd:
    """A private containerd that has pulled the standard image (ctr-remote convert needs it local)."""
    require_privileges(("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo", "runc"))
    cd = containerd_factory()
    cd.pull(base_image.ref)
    return cd


@pytest.mark.parametrize("tuned", [False, True], ids=["defaults", "chunked-prioritized"])
@pytest.mark.parametrize("fmt", ["estargz", "zstdchunked"])
def test_ctr_remote_output_parses_and_matches_our_builder(
    converter: Containerd, base_image: PushedImage, fmt: str, tuned: bool, tmp_path: Path
) -> None:
    manifest = ctr_remote_convert(converter, base_image.ref, fmt, tuned, tmp_path)
    spec = oci.test_image_layers()
    assert len(manifest["layers"]) == len(spec.layers)
    for desc, layer in zip(manifest["layers"], spec.layers, strict=True):
        assert desc["mediaType"] == FORMAT_MEDIA_TYPES[fmt]
        annotations: dict[str, str] = desc["annotations"]
        blob = ctr_bytes(converter, "content", "get", desc["digest"])
        assert len(blob) == desc["size"]
        index, their_toc = read_toc(blob, annotations)
        assert index.format == fmt
        source = oci.layer_tar(layer)
        check_layer_against_tar(index, blob, {}, source)

        compression = Compression.GZIP if fmt == "estargz" else Compression.ZSTD
        ours = build_blob(
            source,
            compression,
            chunk_size=TUNED_CHUNK_SIZE if tuned else 4 << 20,
            prioritized_files=PRIORITIZED if tuned else (),
            allow_missing_prioritized=True,
        )
        # Same entries, in the same order, with the same attributes, chunking and digests.
        assert toc_without_offsets(ours.toc_json) == toc_without_offsets(their_toc)
        assert toc_stream_count(ours.toc_json) == toc_stream_count(their_toc)
        # Our blob reads back through the same path, with the same index shape.
        our_index, _ = read_toc(ours.blob, ours.annotations)
        assert list(our_index.entries) == list(index.entries)
        assert our_index.prefetch == index.prefetch and our_index.no_prefetch == index.no_prefetch
        for name, entry in index.entries.items():
            assert [(c.file_offset, c.size, c.digest) for c in our_index.entries[name].chunks] == [
                (c.file_offset, c.size, c.digest) for c in entry.chunks
            ], name
        # Same annotation keys. The uncompressed size matches too (for zstd:chunked neither of us
        # ends the tar with the end-of-archive blocks). The DiffID does not: Go re-serializes tar
        # headers (e.g. writes "0000000" device fields where Python's tarfile writes NULs), we copy
        # them byte for byte, and the gzip TOC entry (part of the tar) holds different offsets.
        assert set(ours.annotations) == set(annotations)
        if fmt == "zstdchunked":
            assert set(ours.annotations) >= {MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_POSITION_ANNOTATION}
        assert ours.annotations[UNCOMPRESSED_SIZE_ANNOTATION] == annotations[UNCOMPRESSED_SIZE_ANNOTATION]
