"""Verified TOCs of lazy layers on disk, under ``ROOT/layers``.

A lazy layer's metadata is fetched and verified once, at its first mount. Keeping the compressed
TOC bytes, where they came from and the digest they were verified against lets a restarted daemon
mount every lazy layer again without asking the registry anything (it may be down, or the tag may
point elsewhere by now), and re-verify them against the same digest as it does so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from snapshotter.formats import TocLocation
from snapshotter.formats.index import Compression
from snapshotter.formats.nydus import BootstrapLocation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredToc:
    reference: str
    blob_size: int
    expected_digest: str  # what the TOC was verified against (from the image manifest)
    location: TocLocation | BootstrapLocation  # a stargz-family TOC or a Nydus-like bootstrap
    raw: bytes  # the compressed TOC as fetched


class TocStore:
    def __init__(self, root: Path) -> None:
        self.dir = root
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _paths(self, digest: str) -> tuple[Path, Path]:
        name = digest.replace(":", "-")
        return self.dir / f"{name}.json", self.dir / f"{name}.toc"

    def save(self, digest: str, toc: StoredToc) -> None:
        meta_path, raw_path = self._paths(digest)
        location: dict[str, object] = dict(dataclasses.asdict(toc.location))
        if isinstance(toc.location, TocLocation):
            location["compression"] = toc.location.compression.value
        meta = {
            "reference": toc.reference,
            "blob_size": toc.blob_size,
            "expected_digest": toc.expected_digest,
            "format": "stargz" if isinstance(toc.location, TocLocation) else "nydus",
            "location": location,
        }
        for path, data in ((raw_path, toc.raw), (meta_path, json.dumps(meta).encode())):
            tmp = path.with_suffix(path.suffix + ".tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)  # the .json goes last: present means complete

    def has(self, digest: str) -> bool:
        return self._paths(digest)[0].exists()

    def load(self, digest: str) -> StoredToc | None:
        meta_path, raw_path = self._paths(digest)
        try:
            meta = json.loads(meta_path.read_text())
            raw = raw_path.read_bytes()
            loc = meta["location"]
            location: TocLocation | BootstrapLocation
            if meta.get("format") == "nydus":
                location = BootstrapLocation(**loc)
            else:
                location = TocLocation(**{**loc, "compression": Compression(loc["compression"])})
            blob_size = int(meta["blob_size"])
            return StoredToc(meta["reference"], blob_size, meta["expected_digest"], location, raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("discarding unreadable stored TOC", extra={"layer": digest, "error": str(exc)})
            self.remove(digest)
            return None

    def remove(self, digest: str) -> None:
        for path in self._paths(digest):
            path.unlink(missing_ok=True)
