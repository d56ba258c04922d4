"""Verified layer metadata (TOCs, bootstraps) on disk, under ``ROOT/layers``.

A lazy layer's metadata is fetched and verified once, at its first mount. Keeping the compressed
bytes, where they came from, their format and the digest they were verified against lets a
restarted daemon mount every lazy layer again without asking the registry anything (it may be
down, or the tag may point elsewhere by now), and re-verify them against the same digest as it
does so. Files are named by the layer digest, validated first (``snapshotter.digest``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from snapshotter.digest import InvalidDigestError, file_stem, from_file_stem
from snapshotter.formats import registry
from snapshotter.formats.index import FormatError
from snapshotter.formats.registry import Location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredToc:
    reference: str
    blob_size: int
    expected_digest: str  # what the metadata was verified against (from the image manifest)
    format: str  # a name in snapshotter.formats.registry
    location: Location
    raw: bytes  # the compressed metadata as fetched


class TocStore:
    def __init__(self, root: Path) -> None:
        self.dir = root
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _paths(self, digest: str) -> tuple[Path, Path]:
        name = file_stem(digest)  # InvalidDigestError for anything that is not a digest
        return self.dir / f"{name}.json", self.dir / f"{name}.toc"

    def save(self, digest: str, toc: StoredToc) -> None:
        meta_path, raw_path = self._paths(digest)
        meta = {
            "reference": toc.reference,
            "blob_size": toc.blob_size,
            "expected_digest": toc.expected_digest,
            "format": toc.format,
            "location": registry.by_name(toc.format).location_to_json(toc.location),
        }
        for path, data in ((raw_path, toc.raw), (meta_path, json.dumps(meta).encode())):
            tmp = path.with_suffix(path.suffix + ".tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)  # the .json goes last: present means complete

    def has(self, digest: str) -> bool:
        try:
            return self._paths(digest)[0].exists()
        except InvalidDigestError:
            return False

    def digests(self) -> Iterator[str]:
        """The layers whose metadata is stored."""
        for path in self.dir.glob("*.json"):
            digest = from_file_stem(path.stem)
            if digest is not None:
                yield digest

    def load(self, digest: str) -> StoredToc | None:
        try:
            meta_path, raw_path = self._paths(digest)
        except InvalidDigestError:
            return None
        try:
            meta = json.loads(meta_path.read_text())
            raw = raw_path.read_bytes()
            fmt = registry.by_name(str(meta["format"]))
            location = fmt.location_from_json(meta["location"])
            blob_size = int(meta["blob_size"])
            return StoredToc(meta["reference"], blob_size, meta["expected_digest"], fmt.name, location, raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, FormatError) as exc:
            log.warning("discarding unreadable stored TOC", extra={"layer": digest, "error": str(exc)})
            self.remove(digest)
            return None

    def remove(self, digest: str) -> None:
        try:
            paths = self._paths(digest)
        except InvalidDigestError:
            return
        for path in paths:
            path.unlink(missing_ok=True)
