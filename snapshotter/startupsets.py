"""The startup working set of an image being pulled lazily: which of its files to fetch first.

For each layer being mounted the remote layers ask ``StartupSets.for_image`` and get, in this
order of preference:

1. **local**: the profile this node recorded for the image reference (``[profile] record =
   true``), unless it was recorded with another manifest than the one being pulled;
2. **shared**: the newest valid profile artifact attached in the registry to the pulled manifest
   (``snapshotter.sharedprofile``; ``[profile] shared = true``), looked up once per manifest;
3. None: the layer's own prefetch list (eStargz landmark, Nydus prefetch table) is used.

A profile that cannot be found or used never fails a pull: a registry error, a bad artifact or a
slow look-up (longer than ``wait_seconds`` once the layer's metadata is ready) means no profile,
with a log line. Counters say what was used (``stats``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from snapshotter.fetcher import FetchError, RegistryClient
from snapshotter.lookups import Lookups
from snapshotter.profile import ProfileNotFoundError, StartupRecorder
from snapshotter.referrers import ListReferrers
from snapshotter.sharedprofile import SharedProfile, find_profile

log = logging.getLogger(__name__)
T = TypeVar("T")

LOOKUP_TTL_SECONDS = 60.0
WAIT_SECONDS = 5.0  # a profile look-up may delay a mount this long after its metadata is ready

LOCAL = "local"
SHARED = "shared"
LAYER = "layer"  # no profile: the layer's own prefetch list


@dataclass(frozen=True)
class StartupSet:
    """An image's startup files (absolute paths, first-read order) and where they came from."""

    source: str  # LOCAL or SHARED
    files: tuple[str, ...]
    referrer: str = ""  # SHARED: the artifact's digest

    def in_layer(self, names: Callable[[str], bool]) -> list[str]:
        """The index names (no leading "/") of the files ``names`` says the layer has, in order."""
        return [n for n in (f.lstrip("/") for f in self.files) if names(n)]


class StartupSets:
    def __init__(
        self,
        client: RegistryClient,
        loop: asyncio.AbstractEventLoop,
        executor: Executor,
        *,
        recorder: StartupRecorder | None = None,
        shared: bool = True,
        wait_seconds: float = WAIT_SECONDS,
        list_referrers: ListReferrers | None = None,
    ) -> None:
        self.client = client
        self.list_referrers = list_referrers
        self.loop = loop
        self.executor = executor
        self.recorder = recorder
        self.shared = shared
        self.wait_seconds = wait_seconds
        self._shared: Lookups[SharedProfile | None] = Lookups(loop, LOOKUP_TTL_SECONDS)
        self.layers_by_source = collections.Counter[str]()  # mounted layers -> what set they got
        self.shared_found = 0  # manifests whose shared profile was found and valid
        self.shared_rejected = 0  # profile artifacts ignored (bad, another subject, unreadable)
        self.shared_errors = 0  # look-ups the registry failed

    async def for_image(
        self, reference: str, manifest: Callable[[], Awaitable[str]], ready: Awaitable[T]
    ) -> tuple[T, StartupSet | None]:
        """What ``ready`` (the layer's metadata) gives, and the startup set of image
        ``reference``, whose pulled manifest digest ``manifest()`` gives, looked up meanwhile.
        Raises only what ``ready`` raises. Call on the loop."""
        lookup = self.loop.create_task(self._lookup(reference, manifest))
        try:
            result = await ready
            done, _ = await asyncio.wait([lookup], timeout=self.wait_seconds)
        finally:
            if not lookup.done():
                lookup.cancel()
        if not done:
            log.info("startup profile look-up is slow; mounting without it", extra={"image": reference})
            return result, None
        return result, lookup.result()

    def counted(self, startup: StartupSet | None) -> None:
        """A layer was mounted with ``startup``."""
        self.layers_by_source[startup.source if startup is not None else LAYER] += 1

    def stats(self) -> dict[str, Any]:
        return {
            "layers_by_source": dict(self.layers_by_source),
            "shared": self.shared,
            "shared_found": self.shared_found,
            "shared_rejected": self.shared_rejected,
            "shared_errors": self.shared_errors,
        }

    async def _lookup(
        self, reference: str, manifest_digest: Callable[[], Awaitable[str]]
    ) -> StartupSet | None:
        try:
            manifest = await manifest_digest()
        except Exception as exc:  # the mount reports what is wrong with the image
            log.debug("no startup profile: the manifest is unknown", extra={"error": str(exc)})
            return None
        if self.recorder is not None:
            files = await self.loop.run_in_executor(self.executor, self._local, reference, manifest)
            if files:
                return StartupSet(LOCAL, files)
        if not self.shared:
            return None
        found = await asyncio.shield(self._shared.task(manifest, lambda: self._discover(reference, manifest)))
        return StartupSet(SHARED, found.files, found.referrer) if found is not None else None

    def _local(self, reference: str, manifest: str) -> tuple[str, ...]:
        assert self.recorder is not None
        try:
            files = self.recorder.export(reference)
        except ProfileNotFoundError:
            return ()
        recorded = self.recorder.manifest_of(reference)
        if recorded and recorded != manifest:
            return ()  # recorded with an older manifest of the tag: a shared one may fit better
        return tuple(files)

    async def _discover(self, reference: str, manifest: str) -> SharedProfile | None:
        """The shared profile of one manifest (once per LOOKUP_TTL_SECONDS); logs what it found."""
        try:
            found, skipped = await find_profile(self.client, reference, manifest, self.list_referrers)
        except FetchError as exc:
            self.shared_errors += 1
            log.info(
                "cannot look for a shared startup profile",
                extra={"image": reference, "manifest": manifest, "error": str(exc)},
            )
            return None
        except Exception:
            self.shared_errors += 1
            log.exception("looking for a shared startup profile failed", extra={"image": reference})
            return None
        self.shared_rejected += len(skipped)
        for reason in skipped:
            log.warning(
                "ignoring a shared startup profile",
                extra={"image": reference, "manifest": manifest, "reason": reason},
            )
        if found is not None:
            self.shared_found += 1
            log.info(
                "using a shared startup profile",
                extra={
                    "image": reference,
                    "manifest": manifest,
                    "referrer": found.referrer,
                    "files": len(found.files),
                },
            )
        return found
