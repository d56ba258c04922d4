"""OCI image layout directories (image-spec ``image-layout.md``): read an image, write one.

The one writer of layouts in the project: ``lazysnap convert``, the benchmark images and the test
images all write blobs, configs, manifests and tags through :class:`OciLayout`.

A layout is ``DIR/oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``DIR/index.json`` (an image
index whose entries may be named by the ``org.opencontainers.image.ref.name`` annotation, the tag in
skopeo's ``oci:DIR:TAG``) and content-addressed ``DIR/blobs/<alg>/<hex>``.

Reading verifies every blob against its digest (and its descriptor's size) before it is used.
Writing puts each blob in place atomically (a temp file in the same directory, fsync, rename), so
a crash never leaves a truncated blob under a digest's name, and rewrites ``index.json`` the same
way. One writer per layout at a time; readers never see a half-written file. The JSON documents
written here (configs, manifests, the index) are canonical: sorted keys, no spaces, so the same
image gives the same digests on every machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from snapshotter.fetcher import (
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
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
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# The creation time of images built from scratch (benchmarks, tests): a fixed one keeps them
# reproducible.
REPRODUCIBLE_CREATED = "2020-01-01T00:00:00Z"
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
            _atomic_write(self.path / "index.json", canonical_json(index))

    def write_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha256 digest (atomically) and return the digest."""
        digest = digest_of(data)
        path = self.blob_path(digest)
        if path.is_file() and path.stat().st_size == len(data):
            return digest  # content-addressed: same name, same bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, data)
        return digest

    def write_blob_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Store the concatenation of ``chunks`` as a blob, hashing while writing, so a blob of
        any size never sits in memory; returns its (sha256 digest, size)."""
        directory = self.path / "blobs" / "sha256"
        directory.mkdir(parents=True, exist_ok=True)
        tmp, digest, size = _stage(directory, chunks)
        try:
            os.replace(tmp, self.blob_path(digest))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest, size

    def write_json(self, doc: object, media_type: str) -> Descriptor:
        """Store ``doc`` as canonical JSON (see the module docstring); its descriptor."""
        body = canonical_json(doc)
        return Descriptor(media_type, self.write_blob(body), len(body))

    def write_image(
        self,
        config: Mapping[str, Any],
        layers: Sequence[Descriptor],
        *,
        tag: str | None = None,
        media_type: str = OCI_MANIFEST,
        config_media_type: str = OCI_CONFIG,
        annotations: Mapping[str, str] | None = None,
        platform: Platform | None = None,
    ) -> LayoutImage:
        """Write ``config`` and the image manifest of ``layers`` (blobs already written), and name
        it ``tag`` (for ``platform``, default linux/amd64) when one is given."""
        for layer in layers:
            if not self.has_blob(layer.digest):
                raise LayoutError(f"{self.path}: layer {layer.digest} is not written")
        config_desc = self.write_json(config, config_media_type)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": descriptor_json(config_desc),
            "layers": [descriptor_json(layer) for layer in layers],
        }
        if annotations:
            manifest["annotations"] = dict(annotations)
        body = canonical_json(manifest)
        digest = self.write_blob(body)
        if tag is not None:
            self.tag(Descriptor(media_type, digest, len(body), platform=platform or Platform()), tag)
        return LayoutImage(digest, media_type, config_desc, tuple(layers), dict(annotations or {}), body)

    def tag(self, manifest: Descriptor, tag: str) -> None:
        """Name ``manifest`` (already written as a blob) ``tag`` in index.json, replacing that tag."""
        if not self.has_blob(manifest.digest):
            raise LayoutError(f"{self.path}: cannot tag {manifest.digest}: blob not written")
        index = self.index()
        kept = [e for e in index.get("manifests", []) if not (isinstance(e, dict) and _name_of(e) == tag)]
        named = replace(manifest, annotations={**manifest.annotations, REF_NAME_ANNOTATION: tag})
        entry = descriptor_json(named)
        index["manifests"] = [*kept, entry]
        index.setdefault("schemaVersion", 2)
        _atomic_write(self.path / "index.json", canonical_json(index))

    def add_referrer(self, entry: Mapping[str, Any]) -> None:
        """List a referrer artifact's manifest (already written as a blob) in index.json, untagged,
        as OCI layout tools look for referrers; nothing when it is listed already."""
        if not self.has_blob(str(entry["digest"])):
            raise LayoutError(f"{self.path}: cannot list {entry['digest']}: blob not written")
        index = self.index()
        manifests = index.get("manifests", [])
        if any(isinstance(e, dict) and e.get("digest") == entry["digest"] for e in manifests):
            return
        index["manifests"] = [*manifests, dict(entry)]
        index.setdefault("schemaVersion", 2)
        _atomic_write(self.path / "index.json", canonical_json(index))

    def tagged(self, tag: str) -> Descriptor:
        """The index entry named ``tag`` (a manifest or an index), as index.json describes it."""
        self.check()
        for entry in self.index().get("manifests", []):
            if isinstance(entry, dict) and _name_of(entry) == tag:
                try:
                    return parse_descriptor(entry, f"index.json entry {tag!r}")
                except ManifestError as e:
                    raise LayoutError(f"{self.path}: {e}") from None
        raise LayoutError(f"{self.path}: no image tagged {tag!r} (tags: {', '.join(self.tags()) or 'none'})")


def image_config(
    diff_ids: Sequence[str],
    *,
    env: Sequence[str],
    cmd: Sequence[str] | None = None,
    created_by: str,
    created: str = REPRODUCIBLE_CREATED,
    platform: Platform | None = None,
) -> dict[str, Any]:
    """The configuration of an image built from scratch out of layers with these ``diff_ids``
    (one history entry each), for :meth:`OciLayout.write_image`."""
    platform = platform or Platform()
    config: dict[str, Any] = {
        "architecture": platform.architecture,
        "os": platform.os,
        "created": created,
        "config": {"Env": list(env), **({"Cmd": list(cmd)} if cmd is not None else {})},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": created, "created_by": created_by}] * len(diff_ids),
    }
    if platform.variant:
        config["variant"] = platform.variant
    return config


def descriptor_json(desc: Descriptor) -> dict[str, Any]:
    """``desc`` as a manifest or index lists it (empty optional fields left out)."""
    doc: dict[str, Any] = {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}
    if desc.annotations:
        doc["annotations"] = dict(desc.annotations)
    if desc.urls:
        doc["urls"] = list(desc.urls)
    if desc.platform is not None:
        p = desc.platform
        doc["platform"] = {"architecture": p.architecture, "os": p.os}
        if p.variant:
            doc["platform"]["variant"] = p.variant
    return doc


def canonical_json(doc: object) -> bytes:
    """Sorted keys, no whitespace: equal documents, equal bytes (hence equal digests)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _name_of(entry: dict[str, Any]) -> str:
    annotations = entry.get("annotations")
    if not isinstance(annotations, dict):
        return ""
    name = annotations.get(REF_NAME_ANNOTATION) or annotations.get(CONTAINERD_NAME_ANNOTATION) or ""
    return name if isinstance(name, str) else ""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp, _, _ = _stage(path.parent, [data])
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stage(directory: Path, chunks: Iterable[bytes]) -> tuple[Path, str, int]:
    """Write ``chunks`` to a new file in ``directory``, synced to disk; returns (its path, the
    sha256 digest and size of what was written). The caller renames it into place."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    tmp = Path(name)
    hasher = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                hasher.update(chunk)
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide blobs from other readers of the layout
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp, f"sha256:{hasher.hexdigest()}", size
