"""Lazy layers are read from the manifest containerd pulled, not from whatever the tag points to by
now (issue 14, item 10): with the CRI plugin's manifest-digest label the image is resolved by that
digest, and a manifest other than the one named is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.cache import ChunkCache
from snapshotter.contract import NotLazyError, layer_ref
from snapshotter.fetcher import Descriptor, Reference, ResolvedImage
from snapshotter.remote import RemoteLayers
from snapshotter.tocstore import TocStore
from tests.support.lazy import running_loop

LAYER = "sha256:" + "1" * 64
PULLED = "sha256:" + "2" * 64
OTHER = "sha256:" + "3" * 64
LABELS = {
    "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/app:1",
    "containerd.io/snapshot/cri.layer-digest": LAYER,
}


class FakeClient:
    """Resolves every reference to a manifest with this digest and no layer (so the lookup stops
    right after the manifest checks), and records what it was asked."""

    def __init__(self, manifest_digest: str) -> None:
        self.manifest_digest = manifest_digest
        self.asked: list[Reference] = []

    async def resolve(self, ref: Reference) -> ResolvedImage:
        self.asked.append(ref)
        config = Descriptor("application/vnd.oci.image.config.v1+json", "sha256:" + "c" * 64, 2)
        return ResolvedImage(
            ref, self.manifest_digest, "application/vnd.oci.image.manifest.v1+json", config, ()
        )


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    with running_loop() as loop:
        yield loop


def fetch_index(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, client: FakeClient, labels: dict[str, str]
) -> NotLazyError:
    remote = RemoteLayers(
        client,  # type: ignore[arg-type]
        ChunkCache(tmp_path / "cache", 1 << 20),
        loop,
        TocStore(tmp_path / "layers"),
    )
    future = asyncio.run_coroutine_threadsafe(remote._fetch_index(layer_ref(labels), labels), loop)
    with pytest.raises(NotLazyError) as info:
        future.result(10)
    return info.value


def test_the_manifest_containerd_pulled_is_resolved_by_its_digest(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    client = FakeClient(PULLED)
    labels = {**LABELS, "containerd.io/snapshot/cri.manifest-digest": PULLED}
    error = fetch_index(tmp_path, loop, client, labels)
    assert [str(r) for r in client.asked] == [f"127.0.0.1:5000/app:1@{PULLED}"]
    assert error.reason == "layer-not-in-manifest"  # got past the manifest check


def test_a_manifest_other_than_the_one_pulled_is_refused(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    labels = {**LABELS, "containerd.io/snapshot/cri.manifest-digest": PULLED}
    error = fetch_index(tmp_path, loop, FakeClient(OTHER), labels)
    assert error.reason == "manifest-mismatch" and PULLED in error.detail and OTHER in error.detail


def test_without_a_manifest_digest_the_reference_is_resolved_as_given(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    client = FakeClient(OTHER)
    error = fetch_index(tmp_path, loop, client, LABELS)
    assert [str(r) for r in client.asked] == ["127.0.0.1:5000/app:1"]
    assert error.reason == "layer-not-in-manifest"
