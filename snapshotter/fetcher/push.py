"""Pushing to a registry, per the OCI distribution spec: blobs and manifests.

A blob is pushed in the cheapest way the registry allows:

1. ``HEAD /v2/<name>/blobs/<digest>``: already there, nothing to send;
2. a cross-repository mount (``POST …/blobs/uploads/?mount=<digest>&from=<repo>``) when the caller
   knows a repository of the same registry that holds it: 201 means done, 202 opens an ordinary
   upload session instead, which we then use;
3. an upload: ``POST …/blobs/uploads/`` opens a session, then one ``PUT <location>?digest=`` with
   the whole body (blobs up to ``monolithic_max``), or ``PATCH <location>`` with ``Content-Range``
   in pieces of ``chunk_size``, following the ``Location`` each answer gives, and a closing ``PUT``.

Everything goes through the client's Transport, so hosts.toml (endpoints with the ``push``
capability), TLS, credentials and retries are the same as for pulling; the token scope asked for is
``repository:<name>:pull,push`` (plus ``repository:<from>:pull`` for a mount). A request that
failed half-way is retried by the Transport; if the registry then refuses the session as out of
step (416, ``BLOB_UPLOAD_INVALID``/``UNKNOWN``), the upload restarts once from a fresh session.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from snapshotter.fetcher.client import RegistryClient
from snapshotter.fetcher.errors import (
    AuthError,
    DigestMismatchError,
    FetchError,
    InvalidResponseError,
)
from snapshotter.fetcher.hosts import RegistryHost
from snapshotter.fetcher.manifest import digest_of, matches_digest
from snapshotter.fetcher.reference import Reference, validate_digest
from snapshotter.fetcher.transport import Handler, Retry, Transport, Where

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_CHUNK_SIZE = 8 << 20
_OCTET_STREAM = "application/octet-stream"
_MAX_ERROR_BODY = 4096
_HASH_IN_THREAD = 1 << 20  # hash bigger blobs off the event loop (hashlib releases the GIL)

#: Called with the number of bytes of the blob the registry has accepted so far.
ProgressCallback = Callable[[int], None]


class PushOutcome(enum.Enum):
    EXISTED = "existed"  # the repository already had the blob
    MOUNTED = "mounted"  # linked from another repository of the same registry
    UPLOADED = "uploaded"


@dataclass
class PushStats:
    """What a Pusher did, for summaries and tests."""

    existed: int = 0
    mounted: int = 0
    uploaded: int = 0
    bytes_uploaded: int = 0
    manifests: int = 0

    def count(self, outcome: PushOutcome, size: int) -> None:
        if outcome is PushOutcome.EXISTED:
            self.existed += 1
        elif outcome is PushOutcome.MOUNTED:
            self.mounted += 1
        else:
            self.uploaded += 1
            self.bytes_uploaded += size


async def _matches(data: bytes, digest: str) -> bool:
    if not digest.startswith("sha256:"):
        return False
    if len(data) < _HASH_IN_THREAD:
        return matches_digest(data, digest)
    return await asyncio.to_thread(matches_digest, data, digest)


class _UploadLostError(FetchError):
    """The upload session is out of step with what we sent, or gone; a new one may work."""


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


def _with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` appended to its query (upload locations often carry one already)."""
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    return f"{url}{'&' if urlsplit(url).query else '?'}{query}"


async def _error_detail(resp: aiohttp.ClientResponse) -> str:
    """The registry's own words from an error body (``{"errors": [{"code", "message"}]}``)."""
    try:
        body = await resp.content.read(_MAX_ERROR_BODY)
        doc = json.loads(body)
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list):
            parts = [
                ": ".join(str(e[k]) for k in ("code", "message") if isinstance(e, dict) and e.get(k))
                for e in errors
            ]
            return "; ".join(p for p in parts if p)
    except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError):
        pass
    return ""


async def _check(resp: aiohttp.ClientResponse, where: Where, action: str, expected: tuple[int, ...]) -> None:
    """Raise the error (or Retry) an unexpected status means, with the registry's explanation."""
    status = resp.status
    if status in expected:
        return
    if status == 429 or (status >= 500 and status != 501):
        retry_after = resp.headers.get("Retry-After", "")
        raise Retry(f"HTTP {status}", retry_after=float(retry_after) if retry_after.isdigit() else 0.0)
    detail = await _error_detail(resp)
    said = f" ({detail})" if detail else ""
    if status in (401, 403):
        raise where.error(AuthError, f"registry refused to {action}: HTTP {status}{said}")
    if status == 416 or "BLOB_UPLOAD_INVALID" in detail or "BLOB_UPLOAD_UNKNOWN" in detail:
        raise where.error(_UploadLostError, f"registry refused to {action}: HTTP {status}{said}")
    if status == 400 and "DIGEST_INVALID" in detail:
        raise where.error(DigestMismatchError, f"registry refused to {action}: digest mismatch{said}")
    if 200 <= status < 300:
        raise where.error(InvalidResponseError, f"cannot {action}: unexpected HTTP {status}")
    raise where.error(FetchError, f"cannot {action}: HTTP {status}{said}")


class Pusher:
    """Pushes blobs and manifests through a RegistryClient's Transport. Safe for concurrent use.

    Blobs up to ``monolithic_max`` bytes (default ``chunk_size``) go in one PUT; bigger ones in
    PATCH pieces of ``chunk_size``.
    """

    def __init__(
        self,
        client: RegistryClient | Transport,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        monolithic_max: int | None = None,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk size must be positive, got {chunk_size}")
        self._transport = client.transport if isinstance(client, RegistryClient) else client
        self._chunk_size = chunk_size
        self._monolithic_max = chunk_size if monolithic_max is None else monolithic_max
        self.stats = PushStats()

    # -- blobs -----------------------------------------------------------------------------------

    async def push_blob(
        self,
        ref: Reference,
        digest: str,
        data: bytes,
        *,
        mount_from: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> PushOutcome:
        """Make blob ``digest`` (whose bytes are ``data``) exist in ``ref``'s repository.

        ``mount_from`` names a repository on the same registry that holds the blob (the image's
        source, say): the registry is asked to mount it from there before anything is uploaded.
        """
        where = Where(ref.host, ref.repository, validate_digest(digest))
        if not await _matches(data, digest):
            raise where.error(DigestMismatchError, "refusing to push: the data does not match its digest")
        if mount_from == ref.repository:
            mount_from = None

        async def attempt(endpoint: RegistryHost) -> PushOutcome:
            if await self._exists(endpoint, ref, where):
                return PushOutcome.EXISTED
            location = None
            if mount_from:
                location = await self._mount(endpoint, ref, mount_from, where)
                if location is None:
                    return PushOutcome.MOUNTED
            await self._upload(endpoint, ref, data, where, location, progress)
            return PushOutcome.UPLOADED

        endpoints = self._transport.endpoints(ref.host, "push", where)
        try:
            outcome = await self._transport.across(endpoints, where, attempt)
        except AuthError as e:
            raise where.error(AuthError, f"cannot push (is push access granted?): {e.reason}") from None
        self.stats.count(outcome, len(data))
        if progress is not None and outcome is not PushOutcome.UPLOADED:
            progress(len(data))
        log.debug("blob pushed", extra={"repository": ref.repository, "digest": digest, "how": outcome.value})
        return outcome

    async def _exists(self, endpoint: RegistryHost, ref: Reference, where: Where) -> bool:
        url = endpoint.api_url(ref.host, ref.repository, "blobs", where.digest)

        async def handler(resp: aiohttp.ClientResponse) -> bool:
            if resp.status == 404:
                return False
            if 300 <= resp.status < 400:
                return True  # redirected to the storage backend: the registry knows the blob
            await _check(resp, where, "check for the blob", (200,))
            return True

        return await self._send("HEAD", url, handler, where, endpoint, push_scope(ref.repository))

    async def _mount(self, endpoint: RegistryHost, ref: Reference, source: str, where: Where) -> str | None:
        """Ask for a cross-repository mount: None when mounted, else the upload session it opened."""
        url = _with_query(self._uploads_url(endpoint, ref), mount=where.digest, **{"from": source})

        async def handler(resp: aiohttp.ClientResponse) -> str | None:
            if resp.status == 201:
                return None
            await _check(resp, where, f"mount the blob from {source}", (202,))
            return self._location(resp, url, where)

        # Pull access to the source repository is part of the request's authorization.
        scope = f"{push_scope(ref.repository)} repository:{source}:pull"
        return await self._send("POST", url, handler, where, endpoint, scope)

    async def _upload(
        self,
        endpoint: RegistryHost,
        ref: Reference,
        data: bytes,
        where: Where,
        location: str | None,
        progress: ProgressCallback | None,
    ) -> None:
        for restart in (False, True):
            if location is None:
                location = await self._start_upload(endpoint, ref, where)
            try:
                if len(data) > self._monolithic_max:
                    location = await self._patch_chunks(endpoint, ref, data, where, location, progress)
                    await self._finish(endpoint, ref, b"", location, where)
                else:
                    await self._finish(endpoint, ref, data, location, where)
                    if progress is not None:
                        progress(len(data))
                return
            except _UploadLostError as e:
                # Typically a request retried after a failure the registry had partly applied
                # (distribution then cancels the session): start over, once.
                if restart:
                    raise
                log.warning(
                    "upload out of step with the registry, restarting it",
                    extra={"repository": ref.repository, "digest": where.digest, "error": e.reason},
                )
                location = None

    async def _start_upload(self, endpoint: RegistryHost, ref: Reference, where: Where) -> str:
        url = self._uploads_url(endpoint, ref)

        async def handler(resp: aiohttp.ClientResponse) -> str:
            await _check(resp, where, "start an upload", (202,))
            return self._location(resp, url, where)

        return await self._send("POST", url, handler, where, endpoint, push_scope(ref.repository))

    async def _patch_chunks(
        self,
        endpoint: RegistryHost,
        ref: Reference,
        data: bytes,
        where: Where,
        location: str,
        progress: ProgressCallback | None,
    ) -> str:
        view = memoryview(data)
        for start in range(0, len(data), self._chunk_size):
            piece = bytes(view[start : start + self._chunk_size])
            end = start + len(piece) - 1
            url = location

            async def handler(resp: aiohttp.ClientResponse, url: str = url, end: int = end) -> str:
                await _check(resp, where, "accept an upload chunk", (202, 204))
                _check_range(resp, end, where)
                return self._location(resp, url, where)

            headers = {"Content-Type": _OCTET_STREAM, "Content-Range": f"{start}-{end}"}
            location = await self._send(
                "PATCH", url, handler, where, endpoint, push_scope(ref.repository), headers, piece
            )
            if progress is not None:
                progress(end + 1)
        return location

    async def _finish(
        self, endpoint: RegistryHost, ref: Reference, body: bytes, location: str, where: Where
    ) -> None:
        url = _with_query(location, digest=where.digest)

        async def handler(resp: aiohttp.ClientResponse) -> None:
            await _check(resp, where, "complete the upload", (201, 204))
            said = resp.headers.get("Docker-Content-Digest", "")
            if said and said != where.digest:
                raise where.error(InvalidResponseError, f"registry stored the upload as {said}")

        headers = {"Content-Type": _OCTET_STREAM}
        await self._send("PUT", url, handler, where, endpoint, push_scope(ref.repository), headers, body)

    # -- manifests -------------------------------------------------------------------------------

    async def put_manifest(self, ref: Reference, body: bytes, media_type: str) -> str:
        """PUT a manifest (or index) under ``ref``'s tag (or its digest); return its digest."""
        return (await self.put_manifest_subject(ref, body, media_type))[0]

    async def put_manifest_subject(self, ref: Reference, body: bytes, media_type: str) -> tuple[str, str]:
        """``put_manifest``, and the registry's ``OCI-Subject`` header: the subject digest when it
        processed the manifest's ``subject`` (it has the referrers API), else "" (the pusher must
        then maintain the referrers tag schema)."""
        digest = digest_of(body)
        if ref.digest is not None and ref.digest != digest:
            raise DigestMismatchError(
                "manifest does not match the reference's digest",
                host=ref.host,
                repository=ref.repository,
                digest=ref.digest,
            )
        where = Where(ref.host, ref.repository, digest)
        obj = ref.tag or digest

        async def attempt(endpoint: RegistryHost) -> str:
            url = endpoint.api_url(ref.host, ref.repository, "manifests", obj)

            async def handler(resp: aiohttp.ClientResponse) -> str:
                await _check(resp, where, f"store the manifest as {obj!r}", (200, 201, 202, 204))
                said = resp.headers.get("Docker-Content-Digest", "")
                if said and said != digest:
                    raise where.error(InvalidResponseError, f"registry stored the manifest as {said}")
                return resp.headers.get("OCI-Subject", "")

            headers = {"Content-Type": media_type}
            return await self._send(
                "PUT", url, handler, where, endpoint, push_scope(ref.repository), headers, body
            )

        endpoints = self._transport.endpoints(ref.host, "push", where)
        try:
            subject = await self._transport.across(endpoints, where, attempt)
        except AuthError as e:
            raise where.error(AuthError, f"cannot push (is push access granted?): {e.reason}") from None
        self.stats.manifests += 1
        return digest, subject

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _uploads_url(endpoint: RegistryHost, ref: Reference) -> str:
        return endpoint.api_url(ref.host, ref.repository, "blobs", "uploads/")

    @staticmethod
    def _location(resp: aiohttp.ClientResponse, request_url: str, where: Where) -> str:
        location = resp.headers.get("Location", "")
        if not location:
            raise where.error(InvalidResponseError, f"HTTP {resp.status} without a Location for the upload")
        return urljoin(request_url, location)

    async def _send(
        self,
        method: str,
        url: str,
        handler: Handler[T],
        where: Where,
        endpoint: RegistryHost,
        scope: str,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> T:
        # An upload location on another server (an upload service, a storage backend) gets
        # neither the registry's credentials nor its hosts.toml headers, as with blob redirects.
        on_registry = urlsplit(url).netloc == endpoint.host
        return await self._transport.request(
            method,
            url,
            handler,
            where=where,
            endpoint=endpoint if on_registry else None,
            scope=scope,
            headers=headers,
            fetch=data is not None,  # bodies may be large: the long timeout with a stall limit
            data=data,
            via=None if on_registry else endpoint,
            what="upload location",
        )


def _check_range(resp: aiohttp.ClientResponse, end: int, where: Where) -> None:
    """The registry's ``Range: 0-<last byte>`` after a PATCH must cover what we have sent."""
    value = resp.headers.get("Range", "")
    if not value:
        return
    last = value.rpartition("-")[2]
    if not last.isdigit() or int(last) != end:
        raise where.error(InvalidResponseError, f"after sending bytes up to {end} the registry has {value!r}")
