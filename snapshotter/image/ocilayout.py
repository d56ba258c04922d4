"""OCI image layout directories (image-spec ``image-layout.md``): read an image, write one.

A layout is ``DIR/oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``DIR/index.json`` (an image
index whose entries may be named by the ``org.opencontainers.image.ref.name`` annotation, the tag in
skopeo's ``oci:DIR:TAG``) and content-addressed ``DIR/blobs/<alg>/<hex>``.

Reading verifies every blob against its digest (and its descriptor's size) before it is used.
Writing puts each blob in place atomically (a temp file in the same directory, fsync, rename), so
a crash never leaves a truncated blob under a digest's name, and rewrites ``index.json`` the same
way. One writer per layout at a time; readers never see a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.fetcher import (
    INDEX_TYPES,
    OCI_INDEX,
    Descriptor,
    ManifestError,
    Platform,
    load_document,
    parse_descriptor,
    parse_image_manifest,
    select_platform,
)
from snapshotter.fetcher.manifest import digest_of
from snapshotter.fetcher.reference import DIGEST_RE

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = "1.0.0"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"  # what `ctr image export` names entries with
_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


class LayoutError(Exception):
    """The directory is not a usable OCI layout, or holds no such image; the message says which."""


class LayoutDigestError(LayoutError):
    """A blob's bytes do not match the digest (or size) that names it: the layout is corrupt."""


@dataclass(frozen=True)
class LayoutImage:
    """One platform's image manifest found in a layout."""

    digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict, hash=False)
    manifest: bytes = field(default=b"", repr=False)


class OciLayout:
    """An OCI image layout at ``path``; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # -- reading ---------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise LayoutError unless ``path`` holds an OCI layout of a version we read."""
        marker = self.path / LAYOUT_FILE
        try:
            doc = json.loads(marker.read_bytes())
        except FileNotFoundError:
            what = "no such directory" if not self.path.is_dir() else f"no {LAYOUT_FILE} file"
            raise LayoutError(f"{self.path} is not an OCI image layout ({what})") from None
        except (OSError, ValueError) as e:
            raise LayoutError(f"{marker}: unreadable: {e}") from None
        version = doc.get("imageLayoutVersion") if isinstance(doc, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise LayoutError(f"{marker}: unsupported imageLayoutVersion {version!r}")

    def blob_path(self, digest: str) -> Path:
        if not DIGEST_RE.fullmatch(digest):
            raise LayoutError(f"invalid digest {digest!r}")
        algorithm, _, encoded = digest.partition(":")
        return self.path / "blobs" / algorithm / encoded

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str, size: int | None = None) -> bytes:
        """The blob's bytes, verified against ``digest`` (and ``size`` when given)."""
        path = self.blob_path(digest)
        algorithm = digest.partition(":")[0]
        if algorithm not in _HASHES:
            raise LayoutError(f"{digest}: unsupported digest algorithm {algorithm!r}")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LayoutError(f"{self.path}: blob {digest} is missing") from None
        except OSError as e:
            raise LayoutError(f"{path}: unreadable: {e.strerror}") from None
        if size is not None and len(data) != size:
            raise LayoutDigestError(
                f"{self.path}: blob {digest} has {len(data)} bytes, its descriptor says {size}"
            )
        if _HASHES[algorithm](data).hexdigest() != digest.partition(":")[2]:
            raise LayoutDigestError(f"{self.path}: blob {digest} does not match its digest (corrupt layout)")
        return data

    def index(self) -> dict[str, Any]:
        path = self.path / "index.json"
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise LayoutError(f"{self.path}: no index.json") from None
        except (OSError, ValueError) as e:
            raise LayoutError(f"{path}: unreadable: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
            raise LayoutError(f"{path}: not an image index")
        return doc

    def tags(self) -> list[str]:
        return [
            name
            for entry in self.index().get("manifests", [])
            if isinstance(entry, dict) and (name := _name_of(entry))
        ]

    def resolve(self, tag: str | None = None, platform: Platform | None = None) -> LayoutImage:
        """The image named ``tag`` (or the only one, or ``platform``'s), as an image manifest.

        An entry that is itself an index (a multi-platform image) is narrowed to ``platform``
        (default linux/amd64). Docker media types are accepted.
        """
        self.check()
        platform = platform or Platform()
        entries = [e for e in self.index().get("manifests", []) if isinstance(e, dict)]
        if tag is not None:
            entries = [e for e in entries if _name_of(e) == tag]
            if not entries:
                known = ", ".join(self.tags()) or "none"
                raise LayoutError(f"{self.path}: no image tagged {tag!r} (tags: {known})")
        if not entries:
            raise LayoutError(f"{self.path}: index.json lists no image")
        try:
            chosen = parse_descriptor(entries[0], "index.json manifests[0]")
            if len(entries) > 1:
                try:
                    chosen = select_platform({"manifests": entries}, platform)
                except ManifestError:
                    names = ", ".join(sorted({n for e in entries if (n := _name_of(e))})) or "none named"
                    raise LayoutError(
                        f"{self.path} holds {len(entries)} images; name one as oci:{self.path}:TAG "
                        f"(tags: {names})"
                    ) from None
            return self._image(chosen, platform)
        except ManifestError as e:
            raise LayoutError(f"{self.path}: {e}") from None

    def _image(self, desc: Descriptor, platform: Platform) -> LayoutImage:
        body = self.read_blob(desc.digest, desc.size)
        media_type, doc = load_document(body, desc.media_type)
        if media_type in INDEX_TYPES:
            desc = select_platform(doc, platform)
            body = self.read_blob(desc.digest, desc.size)
            media_type, doc = load_document(body, desc.media_type)
            if media_type in INDEX_TYPES:
                raise LayoutError(f"{self.path}: index entry {desc.digest} is another index")
        config, layers = parse_image_manifest(doc)
        annotations = doc.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise LayoutError(f"{self.path}: manifest {desc.digest} has malformed annotations")
        return LayoutImage(desc.digest, media_type, config, layers, dict(annotations), body)

    # -- writing ---------------------------------------------------------------------------------

    def create(self) -> None:
        """Make ``path`` a layout if it is missing or empty; accept an existing layout."""
        if (self.path / LAYOUT_FILE).exists():
            self.check()
            return
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise LayoutError(f"{self.path} exists and is not an OCI image layout; refusing to write into it")
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / LAYOUT_FILE, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
        if not (self.path / "index.json").exists():
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
            _atomic_write(self.path / "index.json", _dumps(index))

    def write_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha256 digest (atomically) and return the digest."""
        digest = digest_of(data)
        path = self.blob_path(digest)
        if path.is_file() and path.stat().st_size == len(data):
            return digest  # content-addressed: same name, same bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, data)
        return digest

    def tag(self, manifest: Descriptor, tag: str) -> None:
        """Name ``manifest`` (already written as a blob) ``tag`` in index.json, replacing that tag."""
        if not self.has_blob(manifest.digest):
            raise LayoutError(f"{self.path}: cannot tag {manifest.digest}: blob not written")
        index = self.index()
        kept = [e for e in index.get("manifests", []) if not (isinstance(e, dict) and _name_of(e) == tag)]
        entry: dict[str, Any] = {
            "mediaType": manifest.media_type,
            "digest": manifest.digest,
            "size": manifest.size,
            "annotations": {**manifest.annotations, REF_NAME_ANNOTATION: tag},
        }
        if manifest.platform is not None:
            p = manifest.platform
            entry["platform"] = {"architecture": p.architecture, "os": p.os}
            if p.variant:
                entry["platform"]["variant"] = p.variant
        index["manifests"] = [*kept, entry]
        index.setdefault("schemaVersion", 2)
        _atomic_write(self.path / "index.json", _dumps(index))


def _name_of(entry: dict[str, Any]) -> str:
    annotations = entry.get("annotations")
    if not isinstance(annotations, dict):
        return ""
    name = annotations.get(REF_NAME_ANNOTATION) or annotations.get(CONTAINERD_NAME_ANNOTATION) or ""
    return name if isinstance(name, str) else ""


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide blobs from other readers of the layout
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
