"""Reading an image from, and writing one to, a registry or an OCI layout through one interface.

``ImageSource`` gives the image manifest and verified blobs; ``ImageTarget`` stores blobs and then
the manifest under the destination's tag. Layout file I/O runs in worker threads so the event
loop keeps serving registry transfers meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

from snapshotter.fetcher import (
    Descriptor,
    InvalidReferenceError,
    Platform,
    Pusher,
    PushOutcome,
    PushStats,
    Reference,
    RegistryClient,
)
from snapshotter.fetcher.push import ProgressCallback
from snapshotter.image.locations import LayoutLocation, Location, RegistryLocation
from snapshotter.image.ocilayout import LayoutDigestError, OciLayout

DEFAULT_LAYOUT_TAG = "latest"


@dataclass(frozen=True)
class SourceImage:
    """One platform's image manifest, wherever it was read from."""

    digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict, hash=False)
    size: int = 0  # of the manifest's bytes (what a descriptor of it says)


class ImageSource(Protocol):
    @property
    def location(self) -> Location: ...

    async def resolve(self) -> SourceImage: ...

    async def read_blob(self, desc: Descriptor) -> bytes:
        """The blob's bytes, verified against ``desc.digest``."""
        ...


class ImageTarget(Protocol):
    @property
    def location(self) -> Location: ...

    @property
    def stats(self) -> PushStats: ...

    @property
    def name(self) -> str:
        """The destination with its tag, as the user should see it."""
        ...

    def reference(self, digest: str) -> str:
        """How to name the stored image whose manifest is ``digest``."""
        ...

    async def prepare(self) -> None:
        """Check the destination can be written before any work is done."""
        ...

    async def put_blob(
        self, digest: str, data: bytes, progress: ProgressCallback | None = None
    ) -> PushOutcome: ...

    async def put_manifest(self, body: bytes, media_type: str, platform: Platform | None) -> str:
        """Store the manifest under the destination's tag; return its digest."""
        ...


class RegistrySource:
    def __init__(self, client: RegistryClient, location: RegistryLocation) -> None:
        self.location = location
        self._client = client

    async def resolve(self) -> SourceImage:
        got = await self._client.resolve(self.location.ref)
        return SourceImage(
            got.manifest_digest, got.media_type, got.config, got.layers, got.annotations, len(got.manifest)
        )

    async def read_blob(self, desc: Descriptor) -> bytes:
        return await self._client.blob(self.location.ref, desc.digest, desc.size).read_all()


class LayoutSource:
    def __init__(self, location: LayoutLocation) -> None:
        self.location = location
        self._layout = OciLayout(location.path)

    async def resolve(self) -> SourceImage:
        got = await asyncio.to_thread(self._layout.resolve, self.location.tag)
        return SourceImage(
            got.digest, got.media_type, got.config, got.layers, got.annotations, len(got.manifest)
        )

    async def read_blob(self, desc: Descriptor) -> bytes:
        return await asyncio.to_thread(self._layout.read_blob, desc.digest, desc.size)


class RegistryTarget:
    """Pushes to a registry; blobs listed by ``offer_mounts`` are mounted from their repository."""

    def __init__(self, client: RegistryClient, location: RegistryLocation, *, chunk_size: int) -> None:
        ref = location.ref
        if ref.digest is not None:
            raise InvalidReferenceError(f"destination {ref} names a digest: give a tag (the digest is new)")
        self.location = location
        self._ref = ref
        self._pusher = Pusher(client, chunk_size=chunk_size)
        self.stats = self._pusher.stats
        self._mountable: dict[str, str] = {}

    @property
    def name(self) -> str:
        return str(self._ref)

    def reference(self, digest: str) -> str:
        return f"{self._ref}@{digest}"

    def offer_mounts(self, source: Reference, digests: Collection[str]) -> None:
        """``source``'s repository holds ``digests``: mount them rather than upload, if same registry."""
        if source.host == self._ref.host and source.repository != self._ref.repository:
            self._mountable.update(dict.fromkeys(digests, source.repository))

    async def prepare(self) -> None:
        # Nothing to create; a registry says whether we may push when we first try.
        return None

    async def put_blob(
        self, digest: str, data: bytes, progress: ProgressCallback | None = None
    ) -> PushOutcome:
        mount_from = self._mountable.get(digest)
        return await self._pusher.push_blob(self._ref, digest, data, mount_from=mount_from, progress=progress)

    async def put_manifest(self, body: bytes, media_type: str, platform: Platform | None) -> str:
        return await self._pusher.put_manifest(self._ref, body, media_type)


class LayoutTarget:
    def __init__(self, location: LayoutLocation) -> None:
        self.location = location
        self.tag = location.tag or DEFAULT_LAYOUT_TAG
        self._layout = OciLayout(location.path)
        self.stats = PushStats()

    @property
    def name(self) -> str:
        return str(LayoutLocation(self.location.path, self.tag))

    def reference(self, digest: str) -> str:
        return self.name

    async def prepare(self) -> None:
        await asyncio.to_thread(self._layout.create)

    async def put_blob(
        self, digest: str, data: bytes, progress: ProgressCallback | None = None
    ) -> PushOutcome:
        if await asyncio.to_thread(self._layout.has_blob, digest):
            outcome = PushOutcome.EXISTED
        else:
            written = await asyncio.to_thread(self._layout.write_blob, data)
            if written != digest:
                raise LayoutDigestError(f"{self.location.path}: blob written as {written}, expected {digest}")
            outcome = PushOutcome.UPLOADED
        self.stats.count(outcome, len(data))
        if progress is not None:
            progress(len(data))
        return outcome

    async def put_manifest(self, body: bytes, media_type: str, platform: Platform | None) -> str:
        digest = await asyncio.to_thread(self._layout.write_blob, body)
        desc = Descriptor(media_type=media_type, digest=digest, size=len(body), platform=platform)
        await asyncio.to_thread(self._layout.tag, desc, self.tag)
        self.stats.manifests += 1
        return digest


def open_source(location: Location, client: RegistryClient) -> ImageSource:
    if isinstance(location, LayoutLocation):
        return LayoutSource(location)
    return RegistrySource(client, location)


def open_target(location: Location, client: RegistryClient, *, chunk_size: int) -> ImageTarget:
    if isinstance(location, LayoutLocation):
        return LayoutTarget(location)
    return RegistryTarget(client, location, chunk_size=chunk_size)
