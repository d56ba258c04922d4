"""The eager fallback's handshake side: an image's layers fetched together at the first Prepare,
each Prepare handed its own layer, verified, in its snapshot directory; failures leave nothing."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from snapshotter.contract import TARGET_REF_LABEL, LayerRef, NotLazyError
from snapshotter.eager import EagerConfig, EagerFills, chain_ids
from snapshotter.fetcher import OCI_MANIFEST, BlobReader, Descriptor, ResolvedImage, parse_reference
from snapshotter.scheduler import FetchScheduler
from tests.support.lazy import MemoryBlob, running_loop, wait_until

REFERENCE = "127.0.0.1:5000/app:1"
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class FakeBlob(MemoryBlob):
    async def read_all(self) -> bytes:
        await self.stall.wait()
        if self.fail is not None:
            raise self.fail
        return bytes(self.data)


@dataclass
class Image:
    resolved: ResolvedImage
    blobs: dict[str, FakeBlob]
    chains: list[str]
    digests: list[str]


def make_image(layers: list[dict[str, bytes]], *, wrong_diff_id: int | None = None) -> Image:
    tars = [layer_tar(files) for files in layers]
    blobs_data = [gzip.compress(t, mtime=0) for t in tars]
    diff_ids = [digest(t) for t in tars]
    if wrong_diff_id is not None:
        diff_ids[wrong_diff_id] = digest(b"something else")
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    descriptors = tuple(Descriptor(GZIP, digest(b), len(b)) for b in blobs_data)
    blobs = {d.digest: FakeBlob(b) for d, b in zip(descriptors, blobs_data, strict=True)}
    blobs[digest(config)] = FakeBlob(config)
    resolved = ResolvedImage(
        reference=parse_reference(REFERENCE),
        manifest_digest=digest(b"manifest" + config),
        media_type=OCI_MANIFEST,
        config=Descriptor("application/vnd.oci.image.config.v1+json", digest(config), len(config)),
        layers=descriptors,
    )
    return Image(resolved, blobs, chain_ids(diff_ids), [d.digest for d in descriptors])


LAYERS = [
    {"bin/tool": b"x" * 300_000, "etc/a": b"a"},
    {"etc/b": b"b", "var/big": bytes(2 << 20)},
    {"etc/c": b"c"},
]


class Harness:
    def __init__(self, root: Path, loop: asyncio.AbstractEventLoop, image: Image, **config: Any) -> None:
        self.root, self.loop, self.image = root, loop, image
        self.lazy: set[str] = set()
        scheduler = asyncio.run_coroutine_threadsafe(self._scheduler(), loop).result(5)

        async def resolve(ref: LayerRef) -> ResolvedImage:
            return image.resolved

        def blob(reference: str, blob_digest: str, size: int) -> BlobReader:
            return cast(BlobReader, image.blobs[blob_digest])

        self.fills = EagerFills(
            root,
            loop,
            resolve=resolve,
            blob=blob,
            scheduler=lambda ref: scheduler,
            lazy_capable=lambda d: d.digest in self.lazy,
            config=EagerConfig(**config),
        )
        self.fills.clear_staging()
        self.dirs: list[Path] = []

    async def _scheduler(self) -> FetchScheduler:
        return FetchScheduler(self.loop)

    def prepare(self, index: int, chain: str | None = None) -> Path:
        """What the snapshotter does before asking: a new snapshot with an empty fs directory."""
        fs = self.root / "snapshots" / str(len(self.dirs) + 1) / "fs"
        fs.mkdir(parents=True)
        self.dirs.append(fs)
        labels = {TARGET_REF_LABEL: chain or self.image.chains[index]}
        ref = LayerRef(REFERENCE, self.image.digests[index])
        lowerdirs = list(reversed(self.dirs[:-1]))
        fill = self.fills.fill(ref, labels, fs, lowerdirs)
        asyncio.run_coroutine_threadsafe(fill, self.loop).result(60)
        return fs

    def staged(self) -> list[str]:
        return sorted(p.name for p in (self.root / "eager").iterdir())


@pytest.fixture
def run(tmp_path: Path) -> Any:
    with running_loop() as loop:
        harnesses: list[Harness] = []

        def make(image: Image, **config: Any) -> Harness:
            harness = Harness(tmp_path / "root", loop, image, **config)
            harnesses.append(harness)
            return harness

        yield make
        for harness in harnesses:
            asyncio.run_coroutine_threadsafe(harness.fills.close(), loop).result(30)


def files(fs: Path) -> dict[str, bytes]:
    return {str(p.relative_to(fs)): p.read_bytes() for p in sorted(fs.rglob("*")) if p.is_file()}


def requests_for(image: Image, index: int) -> int:
    return len(image.blobs[image.digests[index]].requests)


def test_every_layer_starts_at_the_first_prepare_and_each_is_handed_over(run: Callable[..., Harness]) -> None:
    image = make_image(LAYERS)
    h = run(image)
    first = h.prepare(0)
    assert files(first) == {"bin/tool": b"x" * 300_000, "etc/a": b"a"}
    assert wait_until(lambda: requests_for(image, 1) > 0 and requests_for(image, 2) > 0)
    assert files(h.prepare(1)) == {"etc/b": b"b", "var/big": bytes(2 << 20)}
    assert files(h.prepare(2)) == {"etc/c": b"c"}
    assert h.fills.stats()["fills"] == 3
    assert wait_until(lambda: h.staged() == [])
    assert all(image.blobs[d].bytes_served == len(image.blobs[d].data) for d in image.digests)  # once


def test_a_wrong_diff_id_fails_the_layer_and_leaves_its_directory_empty(run: Callable[..., Harness]) -> None:
    image = make_image(LAYERS, wrong_diff_id=1)
    h = run(image, unclaimed_seconds=0.2)
    h.prepare(0)
    with pytest.raises(NotLazyError) as refused:
        h.prepare(1)
    assert refused.value.reason == "eager-diffid-mismatch" and image.digests[1] in refused.value.detail
    assert os.listdir(h.dirs[1]) == []
    assert wait_until(lambda: h.staged() == [])  # layer 3, unpacked ahead and never asked for, too
    assert h.fills.stats()["failures"] == {"eager-diffid-mismatch": 1}


def test_a_registry_failure_fails_the_layer(run: Callable[..., Harness]) -> None:
    image = make_image(LAYERS)
    image.blobs[image.digests[0]].fail = OSError("connection reset")
    h = run(image)
    with pytest.raises(NotLazyError) as refused:
        h.prepare(0)
    assert refused.value.reason == "eager-fetch-failed" and "connection reset" in refused.value.detail
    assert os.listdir(h.dirs[0]) == []
    image.blobs[image.digests[0]].fail = None  # a later pull of the same image starts it again
    fs = h.prepare(0, image.chains[0])
    assert files(fs)["etc/a"] == b"a"


def test_a_chain_that_is_not_in_the_image_is_refused(run: Callable[..., Harness]) -> None:
    image = make_image(LAYERS)
    h = run(image)
    with pytest.raises(NotLazyError) as refused:
        h.prepare(0, chain=digest(b"another image's chain"))
    assert refused.value.reason == "eager-not-in-image"
    assert sum(len(b.requests) for b in image.blobs.values()) == 0


def test_not_enough_disk_is_refused_before_fetching(run: Callable[..., Harness]) -> None:
    image = make_image(LAYERS)
    h = run(image, min_free_bytes=1 << 62)
    with pytest.raises(NotLazyError) as refused:
        h.prepare(0)
    assert refused.value.reason == "eager-disk-full" and "min_free_bytes" in refused.value.detail
    assert sum(len(image.blobs[d].requests) for d in image.digests) == 0


def test_layers_that_will_be_lazy_are_not_fetched_ahead(run: Callable[..., Harness]) -> None:
    image = make_image(LAYERS)
    h = run(image)
    h.lazy.add(image.digests[1])
    h.prepare(0)
    assert wait_until(lambda: requests_for(image, 2) > 0)
    assert requests_for(image, 1) == 0


def test_layers_nobody_asks_for_are_removed(run: Callable[..., Harness]) -> None:
    image = make_image(LAYERS)
    h = run(image, unclaimed_seconds=0.2)
    h.prepare(0)
    assert wait_until(lambda: requests_for(image, 2) > 0)
    assert wait_until(lambda: h.staged() == [])
