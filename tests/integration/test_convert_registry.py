"""``lazysnap convert`` against a real registry (CNCF distribution on loopback).

The standard three-layer test image is built as an OCI layout and pushed with skopeo; each test
converts it (registry → registry, layout → registry, registry → layout), reads the result back
with the project's registry client and checks it with ``tests.support.converted.check_converted``:
media types, TOC digest and uncompressed-size annotations, DiffIDs, and every entry of every
layer against the source tar, through the project's own parsers.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapshotter import cli
from snapshotter.convert import ConvertOptions, convert_image
from snapshotter.fetcher import (
    CredentialStore,
    HostsConfig,
    Pusher,
    PushOutcome,
    RegistryClient,
    parse_reference,
)
from snapshotter.image import OciLayout, parse_location
from tests.support import oci
from tests.support.converted import check_converted, read_image, read_layout_image
from tests.support.scratch import tmpdir
from tests.support.services import Registry, missing_prerequisite

PRIORITIZED = ("/bin/busybox", "/etc/motd", "/data/hello.txt", "/not/in/the/image")


def require_registry_tools() -> None:
    """Skip (with CI=true: fail) unless the registry and skopeo are installed."""
    missing = [b for b in (Registry.binary, "skopeo") if shutil.which(b) is None]
    missing += [] if Path("/bin/busybox").exists() else ["/bin/busybox"]
    if missing:
        missing_prerequisite("convert registry tests need " + ", ".join(missing))


@dataclass(frozen=True)
class Source:
    registry: Registry
    ref: str  # HOST/lztest/src:1
    layout: Path  # the same image as an OCI layout, tag "1"
    tars: list[bytes]


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    require_registry_tools()
    with tmpdir() as workdir, Registry(workdir / "registry") as registry:
        spec = oci.test_image_layers()
        image = oci.build_layout(workdir / "layout", spec.layers, tag="1", cmd=list(spec.cmd))
        ref = oci.push(image.layout_dir, "1", registry.host, "lztest/src")
        yield Source(registry, ref, image.layout_dir, [oci.layer_tar(layer) for layer in spec.layers])


def prefetch_file(tmp_path: Path) -> Path:
    path = tmp_path / "prefetch.txt"
    path.write_text("# startup reads\n" + "\n".join(PRIORITIZED) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["estargz", "zstdchunked", "nydus"])
def test_registry_to_registry(
    source: Source, fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = f"{source.registry.host}/lztest/conv-{fmt}:1"
    args = ["convert", source.ref, dst, "--format", fmt, "--chunk-size", "256K"]
    assert cli.main([*args, "--prefetch-files", str(prefetch_file(tmp_path))]) == 0
    out, err = capsys.readouterr()
    assert "1 prefetch file(s) found in no layer: /not/in/the/image" in err
    manifest, config, blobs = read_image(dst)
    indexes = check_converted(manifest, config, blobs, source.tars, fmt, prioritized=PRIORITIZED[:3])
    # busybox (~1 MB) is cut in 256 KiB chunks.
    assert len(indexes[0].entries["bin/busybox"].chunks) > 1
    digest = next(line.split()[1] for line in out.splitlines() if line.startswith("manifest "))
    assert f"image {dst}@{digest}" in out
    assert oci.registry_manifest_digest(source.registry.host, f"lztest/conv-{fmt}", "1") == digest


def test_layout_to_registry_to_layout(source: Source, tmp_path: Path) -> None:
    middle = f"{source.registry.host}/lztest/from-layout:esgz"
    assert cli.main(["convert", f"oci:{source.layout}:1", middle, "--format", "estargz", "-q"]) == 0
    manifest, config, blobs = read_image(middle)
    check_converted(manifest, config, blobs, source.tars, "estargz")
    # ... and back out of the registry into a layout, as zstd:chunked this time.
    out = tmp_path / "out"
    assert cli.main(["convert", middle, f"oci:{out}:zc", "--format", "zstdchunked", "-q"]) == 0
    manifest, config, blobs = read_layout_image(OciLayout(out), "zc")
    check_converted(manifest, config, blobs, source.tars, "zstdchunked")


def test_converting_within_one_registry_mounts_what_it_can(source: Source) -> None:
    host = source.registry.host
    options = ConvertOptions("estargz", prioritized_files=("/etc/motd",))

    def run(src: str, dst: str) -> Any:
        return asyncio.run(convert_image(parse_location(src), parse_location(dst), options, hosts_dir=None))

    first = run(source.ref, f"{host}/lztest/mount-a:1")
    assert (first.stats.uploaded, first.stats.mounted) == (4, 0)  # 3 layers + config, all new
    # Converting the converted image again yields the same blobs (the builder is deterministic):
    # every one is mounted from the source repository instead of uploaded.
    second = run(f"{host}/lztest/mount-a:1", f"{host}/lztest/mount-b:1")
    assert (second.stats.uploaded, second.stats.mounted, second.stats.bytes_uploaded) == (0, 4, 0)
    assert second.manifest_digest == first.manifest_digest
    manifest, config, blobs = read_image(f"{host}/lztest/mount-b:1")
    check_converted(manifest, config, blobs, source.tars, "estargz")
    # Within the same repository, the blobs are simply there already.
    third = run(f"{host}/lztest/mount-b:1", f"{host}/lztest/mount-b:2")
    assert (third.stats.existed, third.stats.uploaded, third.stats.mounted) == (4, 0, 0)


def test_errors_name_what_went_wrong(source: Source, capsys: pytest.CaptureFixture[str]) -> None:
    host = source.registry.host
    cases = [
        ([f"{host}/lztest/src:nope", f"{host}/lztest/x:1"], 1, "not found (HTTP 404)"),
        ([f"{host}/lztest/src:1", f"{host}/lztest/x@sha256:{'0' * 64}"], 2, "names a digest: give a tag"),
        ([f"{host}/lztest/src:1", f"{host}/BAD/x:1"], 2, "invalid reference"),
    ]
    for args, code, message in cases:
        assert cli.main(["convert", *args, "--format", "estargz", "-q"]) == code, args
        assert message in capsys.readouterr().err, args


def test_large_blob_goes_up_in_pieces(source: Source) -> None:
    """Blobs over the push chunk size are PATCHed in pieces; distribution checks every range."""
    data = os.urandom(20 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    ref = parse_reference(f"{source.registry.host}/lztest/big:1")
    progress: list[int] = []

    async def push_and_read() -> bytes:
        async with RegistryClient(HostsConfig(None), CredentialStore()) as client:
            pusher = Pusher(client, chunk_size=8 << 20)
            assert await pusher.push_blob(ref, digest, data, progress=progress.append) is PushOutcome.UPLOADED
            assert await pusher.push_blob(ref, digest, data) is PushOutcome.EXISTED
            return await client.blob(ref, digest, len(data)).read_all()

    assert asyncio.run(push_and_read()) == data
    assert progress == [8 << 20, 16 << 20, 20 << 20]
