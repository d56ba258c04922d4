"""Startup profiles: which files an image's container reads first, for ``convert --prefetch-files``.

With ``[profile] record = true`` every lazily mounted layer reports the first read of each of its
files during the first ``window_seconds`` after the mount. Files are grouped by the image
reference that mounted the layer and kept in first-read order, so that a user can convert an
image, run it once, and convert it again with the list of what its startup really read. A layer
shared with an image mounted earlier is not mounted again, so its reads count for that image.

Profiles live in memory and in ``ROOT/profiles/`` (one JSON file per image, written when a
window closes and at shutdown), so that they survive a daemon restart. Each also keeps the digest
of the image manifest it was recorded with, when containerd named it, so that ``lazysnap profile
push`` attaches it to that manifest (``snapshotter.sharedprofile``). Thread-safe: reads are
reported from FUSE worker threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MAX_FILES_PER_IMAGE = 100_000  # a bound on memory; a startup reading more is not a startup


class ProfileNotFoundError(KeyError):
    """No profile was recorded for that image."""


class StartupRecorder:
    def __init__(self, directory: Path, window_seconds: float) -> None:
        self.dir = directory
        self.window = window_seconds
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # image reference -> path -> wall time of its first read (dicts keep first-read order)
        self._profiles: dict[str, dict[str, float]] = {}
        self._manifests: dict[str, str] = {}  # image reference -> manifest digest, when known
        self._dirty: set[str] = set()

    def _path(self, reference: str) -> Path:
        return self.dir / (hashlib.sha256(reference.encode()).hexdigest()[:32] + ".json")

    def layer_mounted(self, reference: str, manifest_digest: str = "") -> Callable[[str], None]:
        """A callback for the layer's file system: call it with a file's path at its first read.
        ``manifest_digest``: the image manifest the layer was pulled with, if known."""
        deadline = time.monotonic() + self.window
        if manifest_digest:
            with self._lock:
                if reference not in self._profiles:
                    self._profiles[reference] = self._load(reference)
                known = self._manifests.get(reference)
                if known != manifest_digest:
                    if known:  # the tag moved to another image: its reads make a new profile
                        self._profiles[reference] = {}
                    self._manifests[reference] = manifest_digest
                    self._dirty.add(reference)

        def first_read(path: str) -> None:
            if time.monotonic() <= deadline:
                self._record(reference, "/" + path.lstrip("/"), time.time())

        return first_read

    def _record(self, reference: str, path: str, when: float) -> None:
        with self._lock:
            files = self._profiles.get(reference)
            if files is None:
                files = self._profiles[reference] = self._load(reference)
            if path not in files and len(files) < MAX_FILES_PER_IMAGE:
                files[path] = when
                self._dirty.add(reference)

    def _load(self, reference: str) -> dict[str, float]:
        """A profile recorded by an earlier daemon process, if any (the caller holds the lock)."""
        try:
            doc = json.loads(self._path(reference).read_text())
            if doc.get("image") != reference:
                return {}
            manifest = doc.get("manifest")
            if isinstance(manifest, str) and manifest and reference not in self._manifests:
                self._manifests[reference] = manifest
            return {str(f["path"]): float(f["first_read"]) for f in doc["files"]}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable startup profile", extra={"image": reference, "error": str(exc)})
            return {}

    def flush(self) -> None:
        """Write every profile changed since the last flush (atomically, one file per image)."""
        with self._lock:
            todo = {
                ref: (sorted(self._profiles[ref].items(), key=lambda kv: kv[1]), self._manifests.get(ref, ""))
                for ref in self._dirty
                if ref in self._profiles
            }
            self._dirty.clear()
        for reference, (files, manifest) in todo.items():
            doc: dict[str, object] = {"image": reference}
            if manifest:
                doc["manifest"] = manifest
            doc["files"] = [{"path": p, "first_read": t} for p, t in files]
            path = self._path(reference)
            tmp = path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(doc, indent=1))
                os.replace(tmp, path)
            except OSError as exc:  # a full disk loses a profile, never the daemon
                log.warning("cannot save startup profile", extra={"image": reference, "error": str(exc)})

    def export(self, reference: str) -> list[str]:
        """The image's files in first-read order, or ProfileNotFoundError."""
        with self._lock:
            files = self._profiles.get(reference)
            if files is None:
                files = self._load(reference)
                if files:
                    self._profiles[reference] = files
        if not files:
            raise ProfileNotFoundError(reference)
        return [p for p, _ in sorted(files.items(), key=lambda kv: kv[1])]

    def manifest_of(self, reference: str) -> str:
        """The digest of the manifest the image's profile was recorded with; "" when unknown."""
        with self._lock:
            if reference not in self._profiles:
                files = self._load(reference)
                if files:
                    self._profiles[reference] = files
            return self._manifests.get(reference, "")

    def images(self) -> list[str]:
        """Every image with a profile, in memory or on disk."""
        found = set(self._profiles)
        for path in self.dir.glob("*.json"):
            try:
                found.add(str(json.loads(path.read_text())["image"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(found)
