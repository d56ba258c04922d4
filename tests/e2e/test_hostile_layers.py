"""Crafted eStargz and Nydus-like layers through real containerd: an eStargz TOC that does not
match its manifest digest falls back to a normal pull, a Nydus-like bootstrap that does not makes
the pull fail with the reason (containerd could not unpack that format); chunk bytes that do not
match their digest are never served nor cached (EIO), while the rest of the layer and the daemon
keep working."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.formats import TOC_DIGEST_ANNOTATION, build_estargz, nydus
from snapshotter.formats.build_nydus import build_nydus
from snapshotter.formats.index import Chunk
from tests.support import oci
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon
from tests.support.scratch import make_tmpdir, remove_tmpdir
from tests.support.services import (
    Containerd,
    CtrError,
    Registry,
    require_privileges,
    run_container,
    verify_container_fs,
)

TAMPERED_LAYER = 1  # the second layer holds /data/hello.txt


def estargz(raw: bytes) -> oci.EncodedLayer:
    # Level 0 (stored deflate blocks): the compressed layout depends only on the sizes, so a layer
    # with other bytes of the same length has the same offsets, and TOCs can be swapped.
    built = build_estargz(raw, compression_level=0)
    return oci.EncodedLayer(built.blob, built.media_type, built.annotations, built.diff_id)


def bad_toc_digest(raw: bytes) -> oci.EncodedLayer:
    layer = estargz(raw)
    wrong = "sha256:" + hashlib.sha256(b"not this TOC").hexdigest()
    return oci.EncodedLayer(
        layer.blob, layer.media_type, {**layer.annotations, TOC_DIGEST_ANNOTATION: wrong}, layer.diff_id
    )


def tampered(raw: bytes) -> oci.EncodedLayer:
    """The honest layer's TOC (so it verifies) over a body where hello.txt says something else."""
    honest = build_estargz(raw, compression_level=0)
    evil_raw = raw.replace(b"hello from layer 2\n", b"HELLO FROM EVE!!!\n\n")
    assert evil_raw != raw and len(evil_raw) == len(raw)
    evil = build_estargz(evil_raw, compression_level=0)
    assert evil.toc_offset == honest.toc_offset
    blob = evil.blob[: evil.toc_offset] + honest.blob[honest.toc_offset :]
    return oci.EncodedLayer(blob, honest.media_type, honest.annotations, honest.diff_id)


def nydus_bad_bootstrap_digest(raw: bytes) -> oci.EncodedLayer:
    built = build_nydus(raw)
    wrong = "sha256:" + hashlib.sha256(b"not this bootstrap").hexdigest()
    annotations = {k: wrong if k.endswith("bootstrap.digest") else v for k, v in built.annotations.items()}
    return oci.EncodedLayer(built.blob, built.media_type, annotations, built.diff_id)


def nydus_tampered(raw: bytes) -> oci.EncodedLayer:
    """A verified bootstrap over a data region where hello.txt's chunk frame is corrupted."""
    built = build_nydus(raw)
    chunk = hello_chunk(built.blob, built.annotations)
    blob = bytearray(built.blob)
    blob[chunk.compressed_offset + chunk.compressed_size // 2] ^= 0xFF
    return oci.EncodedLayer(bytes(blob), built.media_type, built.annotations, built.diff_id)


def hello_chunk(blob: bytes, annotations: dict[str, str]) -> Chunk:
    location = nydus.locate_bootstrap(blob[-nydus.FOOTER_SIZE :], len(blob))
    raw = blob[location.offset : location.offset + location.length]
    expected = annotations[nydus.BOOTSTRAP_DIGEST_ANNOTATION]
    index = nydus.parse_bootstrap(raw, location, blob_size=len(blob), expected_digest=expected)
    (chunk,) = index.entries["data/hello.txt"].chunks
    return chunk


@pytest.fixture(scope="module")
def hostile(registry: Registry) -> Iterator[dict[str, object]]:
    require_privileges(binaries=("containerd", "ctr", "ctr-remote", "docker-registry", "skopeo"))
    workdir = make_tmpdir()
    try:
        spec = oci.test_image_layers()
        refs: dict[str, object] = {"expected": spec.expected}
        cases = (
            ("bad-toc-digest", bad_toc_digest),
            ("tampered-chunk", tampered),
            ("nydus-bad-bootstrap", nydus_bad_bootstrap_digest),
            ("nydus-tampered-chunk", nydus_tampered),
        )
        for name, bad in cases:
            layers = iter(range(len(spec.layers)))

            def encode(raw: bytes, bad=bad, layers=layers) -> oci.EncodedLayer:  # type: ignore[no-untyped-def]
                return bad(raw) if next(layers) == TAMPERED_LAYER else estargz(raw)

            image = oci.build_layout(workdir / name, spec.layers, tag=name, encode=encode)
            refs[name] = oci.push(image.layout_dir, name, registry.host, "lztest/hostile")
            refs[f"{name}-layer"] = image.layer_digests[TAMPERED_LAYER]
            if name == "tampered-chunk":
                toc = json.loads(
                    build_estargz(oci.layer_tar(spec.layers[TAMPERED_LAYER]), compression_level=0).toc_json
                )
                refs["hello_chunk"] = next(
                    e["chunkDigest"] for e in toc["entries"] if e["name"] == "data/hello.txt"
                )
            if name == "nydus-tampered-chunk":
                honest = build_nydus(oci.layer_tar(spec.layers[TAMPERED_LAYER]))
                refs["nydus_hello_chunk"] = hello_chunk(honest.blob, honest.annotations).digest
        yield refs
    finally:
        remove_tmpdir(workdir)


def test_toc_not_matching_the_manifest_falls_back(
    hostile: dict[str, object], lazy_stack: tuple[LazysnapDaemon, Containerd]
) -> None:
    daemon, cd = lazy_stack
    ref = str(hostile["bad-toc-digest"])
    cd.rpull(ref)
    stats = daemon.stats()
    assert stats["lazy_mounts"] == 2 and stats["not_lazy"] == {"bad-toc": 1}, stats
    assert "bad-toc" in daemon.log_tail(400) and "TOC digest" in daemon.log_tail(400)
    expected = hostile["expected"]
    assert isinstance(expected, dict)
    assert verify_container_fs(cd, ref, expected, snapshotter=SNAPSHOTTER) == []


@pytest.mark.parametrize(
    ("case", "chunk"),
    [("tampered-chunk", "hello_chunk"), ("nydus-tampered-chunk", "nydus_hello_chunk")],
    ids=["estargz", "nydus"],
)
def test_chunk_not_matching_its_digest_is_eio_and_never_cached(
    hostile: dict[str, object], lazy_stack: tuple[LazysnapDaemon, Containerd], case: str, chunk: str
) -> None:
    daemon, cd = lazy_stack
    ref = str(hostile[case])
    cd.rpull(ref)
    assert daemon.stats()["lazy_mounts"] == 3
    bad = run_container(cd, ref, "/bin/cat", "/data/hello.txt", snapshotter=SNAPSHOTTER)
    assert bad.returncode != 0 and "hello" not in bad.stdout.lower()  # neither the honest nor Eve's
    good = run_container(cd, ref, "/bin/cat", "/etc/motd", "/data/orig.txt", snapshotter=SNAPSHOTTER)
    assert good.returncode == 0 and good.stdout == "motd from layer 2\nhardlinked content\n"
    layers = daemon.stats()["layers"]
    assert isinstance(layers, dict) and sum(layer["verify_failures"] for layer in layers.values()) >= 1
    hex_digest = str(hostile[chunk]).split(":")[1]
    assert not list(Path(daemon.root, "cache").rglob(hex_digest)), "an unverified chunk was cached"
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_nydus_bootstrap_not_matching_the_manifest_fails_the_pull_with_the_reason(
    hostile: dict[str, object], lazy_stack: tuple[LazysnapDaemon, Containerd]
) -> None:
    """containerd cannot unpack a Nydus-like layer, so instead of a fallback the pull fails, with a
    message naming the layer and the problem; nothing of it is kept, and the daemon serves on."""
    daemon, cd = lazy_stack
    with pytest.raises(CtrError) as failed:
        cd.rpull(str(hostile["nydus-bad-bootstrap"]))
    message = str(failed.value)
    assert "format only lazysnap reads" in message and "bootstrap digest mismatch" in message, message
    stats = daemon.stats()
    assert stats["not_lazy"] == {"bad-toc": 1}, stats
    bad_layer = str(hostile["nydus-bad-bootstrap-layer"]).replace(":", "-")
    stored = [p.name for p in Path(daemon.root, "layers").iterdir()]
    assert not [n for n in stored if n.startswith(bad_layer)], f"the bad bootstrap was kept: {stored}"
    assert bad_layer.split("-")[1][:12] in message  # the error names the layer
    ref = str(hostile["tampered-chunk"])  # the daemon serves other images
    cd.rpull(ref)
    good = run_container(cd, ref, "/bin/cat", "/etc/motd", snapshotter=SNAPSHOTTER)
    assert good.returncode == 0 and good.stdout == "motd from layer 2\n"
