"""Startup profiles shared through the registry: the profile artifact, pushing it, finding it at pull.

A node that recorded which files an image's containers read first (``[profile] record = true``,
``snapshotter.profile``) pushes that list with ``lazysnap profile push IMAGE`` as an OCI 1.1
referrer artifact of the image manifest (``snapshotter.referrers``): artifactType
``ARTIFACT_TYPE``, one blob of ``MEDIA_TYPE`` (JSON: the manifest digest again and the paths in
first-read order). Every node that pulls that manifest lazily finds the artifact among the
manifest's referrers and uses the list as the image's startup working set. Only an artifact whose
``subject`` is the pulled manifest, holding a blob that matches its descriptor's digest, is no
larger than ``MAX_PROFILE_BYTES`` and names the same manifest inside, counts. docs/PROFILES.md
describes the artifact.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from snapshotter import referrers
from snapshotter.digest import InvalidDigestError, validate_digest
from snapshotter.fetcher import (
    DEFAULT_CONFIG_DIR,
    CredentialStore,
    FetchError,
    HostsConfig,
    RegistryClient,
    parse_reference,
)
from snapshotter.fetcher.manifest import digest_of
from snapshotter.image import canonical_json
from snapshotter.profile import MAX_FILES_PER_IMAGE

ARTIFACT_TYPE = "application/vnd.lazysnap.startup-profile.v1"
MEDIA_TYPE = "application/vnd.lazysnap.startup-profile.v1+json"
SCHEMA_VERSION = 1
MAX_PROFILE_BYTES = 8 << 20  # checked against the descriptor before a byte of the blob is fetched
MAX_FILES = MAX_FILES_PER_IMAGE
MAX_PATH_BYTES = 4096  # PATH_MAX
MAX_ARTIFACTS = 4  # profile artifacts of one manifest tried, newest first


class BadProfileError(ValueError):
    """A profile blob or artifact that cannot be used (the message says why)."""


@dataclass(frozen=True)
class SharedProfile:
    """A validated profile: the files an image's startup reads, in first-read order."""

    manifest: str  # the image manifest it belongs to
    files: tuple[str, ...]  # absolute, normalised paths
    referrer: str = ""  # the artifact it came in (found in a registry)


@dataclass(frozen=True)
class PushedProfile:
    reference: str
    manifest: str  # the subject: the image manifest the profile is attached to
    artifact: str  # the referrer artifact's digest
    blob: str  # the profile blob's digest
    files: int
    referrers_tag: str = ""  # the tag schema's tag, when the registry needed it


def clean_path(raw: object) -> str:
    """A profile path as ``/a/b`` (no ".", "//" or trailing "/"); BadProfileError for anything
    that is not an absolute path inside the image (NUL, "..", too long)."""
    if not isinstance(raw, str) or not raw.startswith("/"):
        raise BadProfileError(f"path {raw!r} is not an absolute path string")
    if "\x00" in raw or len(raw.encode(errors="surrogatepass")) > MAX_PATH_BYTES:
        raise BadProfileError(f"path {raw[:64]!r}...: a NUL byte or longer than {MAX_PATH_BYTES} bytes")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadProfileError(f"path {raw!r}: '..' escapes the image root")
    if not parts:
        raise BadProfileError(f"path {raw!r} names the root, not a file")
    return "/" + "/".join(parts)


def _clean_files(files: Sequence[object]) -> tuple[str, ...]:
    if len(files) > MAX_FILES:
        raise BadProfileError(f"{len(files)} files, more than {MAX_FILES}")
    return tuple(dict.fromkeys(clean_path(f) for f in files))  # first occurrence keeps its place


def encode_profile(manifest_digest: str, files: Sequence[str]) -> bytes:
    """The profile blob (canonical JSON); BadProfileError when it would not decode again."""
    try:
        manifest = validate_digest(manifest_digest)
    except InvalidDigestError as exc:
        raise BadProfileError(str(exc)) from None
    doc = {"schemaVersion": SCHEMA_VERSION, "manifest": manifest, "files": list(_clean_files(files))}
    data = canonical_json(doc)
    if len(data) > MAX_PROFILE_BYTES:
        raise BadProfileError(f"the profile is {len(data)} bytes, more than {MAX_PROFILE_BYTES}")
    return data


def decode_profile(data: bytes, manifest_digest: str) -> tuple[str, ...]:
    """The files of a profile blob that belongs to manifest ``manifest_digest``; BadProfileError
    for anything else (too large, not JSON, another schema or manifest, bad paths)."""
    if len(data) > MAX_PROFILE_BYTES:
        raise BadProfileError(f"{len(data)} bytes, more than {MAX_PROFILE_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadProfileError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadProfileError("not a JSON object")
    if doc.get("schemaVersion") != SCHEMA_VERSION:
        raise BadProfileError(f"schemaVersion {doc.get('schemaVersion')!r}, not {SCHEMA_VERSION}")
    if doc.get("manifest") != manifest_digest:
        raise BadProfileError(f"it names manifest {doc.get('manifest')!r}, not {manifest_digest}")
    files = doc.get("files")
    if not isinstance(files, list):
        raise BadProfileError("no 'files' list")
    return _clean_files(files)


def profile_artifact(blob: bytes, subject_media_type: str, subject_digest: str, subject_size: int) -> bytes:
    """The referrer artifact's manifest for profile blob ``blob`` of the given image manifest."""
    layer = {"mediaType": MEDIA_TYPE, "digest": digest_of(blob), "size": len(blob)}
    subject = {"mediaType": subject_media_type, "digest": subject_digest, "size": subject_size}
    return referrers.artifact_manifest(ARTIFACT_TYPE, [layer], subject)


async def find_profile(
    client: RegistryClient,
    reference: str,
    manifest_digest: str,
    list_referrers: referrers.ListReferrers | None = None,
) -> tuple[SharedProfile | None, list[str]]:
    """The newest usable profile attached to manifest ``manifest_digest`` of ``reference``'s
    repository (None when there is none) and why profile artifacts were skipped. Listing the
    referrers may raise FetchError; an artifact that fails to fetch or verify is skipped."""
    listed = await (list_referrers or client.referrers)(reference, manifest_digest)
    skipped: list[str] = []
    for desc in referrers.newest_of_type(listed, ARTIFACT_TYPE, MAX_ARTIFACTS):
        try:
            layers = await referrers.fetch_artifact(
                client, reference, desc.digest, manifest_digest, ARTIFACT_TYPE
            )
            blobs = [layer for layer in layers if layer.media_type == MEDIA_TYPE]
            if len(blobs) != 1:
                raise BadProfileError(f"{len(blobs)} blobs of {MEDIA_TYPE}, not one")
            (blob,) = blobs
            if blob.size > MAX_PROFILE_BYTES:  # before a byte of it is fetched
                raise BadProfileError(f"its blob is {blob.size} bytes, more than {MAX_PROFILE_BYTES}")
            data = await client.blob(reference, blob.digest, blob.size).read_all()  # verified
            files = decode_profile(data, manifest_digest)
        except (referrers.BadArtifactError, BadProfileError, FetchError, InvalidDigestError) as exc:
            skipped.append(f"referrer {desc.digest}: {exc}")
            continue
        return SharedProfile(manifest_digest, files, desc.digest), skipped
    return None, skipped


async def push_profile(
    client: RegistryClient, reference: str, files: Sequence[str], manifest_digest: str = ""
) -> PushedProfile:
    """Attach ``files`` as the startup profile of ``reference``'s image manifest: the one with
    ``manifest_digest`` when given (the manifest the profile was recorded with), else the one the
    reference resolves to for this client's platform. BadProfileError for a profile that would
    not be used; FetchError and referrers.AttachError from the registry."""
    ref = parse_reference(reference)
    if manifest_digest:
        try:
            ref = dataclasses.replace(ref, digest=validate_digest(manifest_digest))
        except InvalidDigestError as exc:
            raise BadProfileError(f"manifest digest {manifest_digest!r}: {exc}") from None
    cleaned = _clean_files(files)
    if not cleaned:
        raise BadProfileError("the profile lists no files")
    image = await client.resolve(ref)  # verified against the digest when pinned
    blob = encode_profile(image.manifest_digest, cleaned)
    artifact = profile_artifact(blob, image.media_type, image.manifest_digest, len(image.manifest))
    blob_digest = digest_of(blob)
    digest, tag = await referrers.attach(client, ref, image.manifest_digest, [(blob_digest, blob)], artifact)
    return PushedProfile(reference, image.manifest_digest, digest, blob_digest, len(cleaned), tag)


async def push_recorded(
    reference: str,
    files: Sequence[str],
    manifest_digest: str = "",
    *,
    hosts_dir: str | Path | None = DEFAULT_CONFIG_DIR,
    docker_config: str | Path | None = None,
    plain_http: bool = False,
) -> PushedProfile:
    """``push_profile`` with a registry client made from hosts.toml and docker credentials."""
    host = parse_reference(reference).host
    hosts = HostsConfig(hosts_dir, plain_http_hosts=[host] if plain_http else ())
    async with RegistryClient(hosts, CredentialStore(docker_config)) as client:
        return await push_profile(client, reference, files, manifest_digest)


__all__ = [
    "ARTIFACT_TYPE",
    "MAX_PROFILE_BYTES",
    "MEDIA_TYPE",
    "BadProfileError",
    "PushedProfile",
    "SharedProfile",
    "clean_path",
    "decode_profile",
    "encode_profile",
    "find_profile",
    "profile_artifact",
    "push_profile",
    "push_recorded",
]
