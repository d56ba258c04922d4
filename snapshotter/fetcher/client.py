"""The registry client: resolve image references to manifests, and hand out blob readers.

``RegistryClient`` owns one aiohttp session (keep-alive, a per-host connection limit) through its
Transport, so use it as ``async with RegistryClient(...) as client`` or call ``close()``. It knows
registries, not layers: what a blob's bytes mean is for the layers above.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any
from urllib.parse import urljoin

import aiohttp

from snapshotter import __version__
from snapshotter.fetcher.blob import BlobReader
from snapshotter.fetcher.credentials import CredentialStore
from snapshotter.fetcher.errors import (
    DigestMismatchError,
    FetchError,
    InvalidResponseError,
    ManifestNotFoundError,
)
from snapshotter.fetcher.hosts import HostsConfig, RegistryHost
from snapshotter.fetcher.manifest import (
    ACCEPT,
    INDEX_TYPES,
    MAX_MANIFEST_BYTES,
    MAX_REFERRERS,
    OCI_INDEX,
    Descriptor,
    ManifestError,
    Platform,
    ResolvedImage,
    digest_of,
    load_document,
    matches_digest,
    parse_image_manifest,
    parse_referrers,
    referrers_tag,
    select_platform,
    string_map,
)
from snapshotter.fetcher.reference import Reference, parse_reference, validate_digest
from snapshotter.fetcher.sizing import RequestSizing
from snapshotter.fetcher.transport import Retry, Transport, Where, check_status

log = logging.getLogger(__name__)

MAX_REFERRER_PAGES = 8  # pages of a referrers list followed through Link headers


class RegistryClient:
    """Talks to OCI registries and their mirrors as configured by hosts.toml.

    ``timeout`` bounds each request (and any stall in a range read); ``fetch_timeout`` bounds one
    attempt of a range read in total. ``max_retries`` is the number of retries after an attempt,
    with exponential backoff from ``retry_base_delay`` capped at ``retry_max_delay`` (plus jitter);
    for range reads it counts only attempts in a row that brought no byte, since a response cut
    after part of its body is resumed at once. ``progress_timeout`` (None: no limit) fails a range
    read when no byte of it has arrived for that long. ``host_cooldown`` is how long a failing
    endpoint stays at the back of the line. ``sizing`` decides the size of range requests per
    server (sizing.py; one is made if not given).
    """

    def __init__(
        self,
        hosts: HostsConfig,
        credentials: CredentialStore,
        *,
        timeout: float = 30.0,
        fetch_timeout: float = 300.0,
        max_retries: int = 5,
        retry_base_delay: float = 0.1,
        retry_max_delay: float = 10.0,
        platform: Platform | None = None,
        max_ranges_per_request: int = 16,
        range_concurrency: int = 8,
        connections_per_host: int = 16,
        host_cooldown: float = 60.0,
        user_agent: str = f"lazysnap/{__version__}",
        trust_env: bool = False,
        progress_timeout: float | None = None,
        sizing: RequestSizing | None = None,
    ) -> None:
        self._transport = Transport(
            hosts,
            credentials,
            timeout=timeout,
            fetch_timeout=fetch_timeout,
            max_retries=max_retries,
            retry_base_delay=retry_base_delay,
            retry_max_delay=retry_max_delay,
            connections_per_host=connections_per_host,
            host_cooldown=host_cooldown,
            user_agent=user_agent,
            trust_env=trust_env,
            progress_timeout=progress_timeout,
            sizing=sizing,
        )
        self._platform = platform or Platform()
        self._max_ranges = max_ranges_per_request
        self._range_concurrency = range_concurrency

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    @property
    def transport(self) -> Transport:
        """The HTTP machinery (session, auth, hosts.toml, retries), shared with ``push.Pusher``."""
        return self._transport

    def blob(self, ref_or_repo: str | Reference, digest: str, size: int | None = None) -> BlobReader:
        """A reader for blob ``digest`` of the repository named by ``ref_or_repo``.

        ``ref_or_repo`` is an image reference (its tag or digest is ignored) or ``host/repository``.
        ``size``, from the descriptor, lets reads be checked without asking the registry first.
        """
        ref = ref_or_repo if isinstance(ref_or_repo, Reference) else parse_reference(ref_or_repo)
        return BlobReader(
            self._transport,
            ref,
            validate_digest(digest),
            size,
            max_ranges=self._max_ranges,
            concurrency=self._range_concurrency,
        )

    async def resolve(self, ref: str | Reference) -> ResolvedImage:
        """Resolve ``ref`` to this client's platform's image manifest, verifying pinned digests."""
        parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
        where = Where(parsed.host, parsed.repository, parsed.digest or "")
        # containerd: looking up a tag needs "resolve"; a digest is content, which "pull" serves.
        capability = "pull" if parsed.digest else "resolve"
        endpoints = self._transport.endpoints(parsed.host, capability, where)
        return await self._transport.across(endpoints, where, lambda e: self._resolve_at(e, parsed))

    async def _resolve_at(self, endpoint: RegistryHost, ref: Reference) -> ResolvedImage:
        where = Where(ref.host, ref.repository, ref.digest or "")
        media_type, body, header_digest = await self._get_manifest(endpoint, ref, ref.object, where)
        digest = self._check_digest(body, ref.digest, header_digest, where)
        doc = self._load(media_type, body, where.host, digest, ref)
        index_digest = None
        if doc[0] in INDEX_TYPES:
            index_digest = digest
            try:
                chosen = select_platform(doc[1], self._platform)
            except ManifestError as e:
                raise where.error(ManifestNotFoundError, str(e)) from None
            where = Where(ref.host, ref.repository, chosen.digest)
            media_type, body, header_digest = await self._get_manifest(endpoint, ref, chosen.digest, where)
            digest = self._check_digest(body, chosen.digest, header_digest, where)
            doc = self._load(media_type, body, where.host, digest, ref)
            if doc[0] in INDEX_TYPES:
                raise where.error(InvalidResponseError, "index entry for the platform is another index")
        try:
            config, layers = parse_image_manifest(doc[1])
            annotations = string_map(doc[1].get("annotations"), "annotations")
        except ManifestError as e:
            raise where.error(InvalidResponseError, str(e)) from None
        return ResolvedImage(
            reference=ref,
            manifest_digest=digest,
            media_type=doc[0],
            config=config,
            layers=layers,
            index_digest=index_digest,
            annotations=annotations,
            manifest=body,
        )

    async def manifest(
        self, ref: str | Reference, digest: str | None = None
    ) -> tuple[str, dict[str, Any], bytes]:
        """The manifest or index ``digest`` of ``ref``'s repository, verified against the digest
        (without one: what ``ref`` names, its tag or digest): its media type, document and bytes
        (at most MAX_MANIFEST_BYTES). No platform is chosen: an index comes back as one."""
        parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
        pinned = validate_digest(digest) if digest else parsed.digest
        obj = pinned or parsed.object
        where = Where(parsed.host, parsed.repository, obj)

        async def attempt(endpoint: RegistryHost) -> tuple[str, dict[str, Any], bytes]:
            media_type, body, header = await self._get_manifest(endpoint, parsed, obj, where)
            got = self._check_digest(body, pinned, header, where)
            kind, doc = self._load(media_type, body, where.host, got, parsed)
            return kind, doc, body

        capability = "pull" if pinned else "resolve"
        return await self._transport.across(
            self._transport.endpoints(parsed.host, capability, where), where, attempt
        )

    async def referrers(self, ref: str | Reference, subject: str) -> list[Descriptor]:
        """The manifests whose ``subject`` is manifest ``subject`` of ``ref``'s repository (OCI
        1.1 referrers API, ``GET /v2/<name>/referrers/<digest>``, following ``Link`` pages). A
        registry without the API answers 404: then the referrers tag schema's image index is read
        (tag ``sha256-<hex>``); none there either means no referrers. Each document is bounded
        by MAX_MANIFEST_BYTES and the list by MAX_REFERRERS."""
        parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
        subject = validate_digest(subject)
        where = Where(parsed.host, parsed.repository, subject)
        endpoints = self._transport.endpoints(parsed.host, "pull", where)
        try:
            return await self._transport.across(
                endpoints, where, lambda e: self._referrers_at(e, parsed, where)
            )
        except ManifestNotFoundError:
            pass  # no referrers API: the tag schema
        tag = referrers_tag(subject)
        tag_where = Where(parsed.host, parsed.repository, tag)
        endpoints = self._transport.endpoints(parsed.host, "resolve", tag_where)

        async def by_tag(endpoint: RegistryHost) -> list[Descriptor]:
            media_type, body, _ = await self._get_manifest(endpoint, parsed, tag, tag_where)
            try:
                kind, doc = load_document(body, media_type)
                if kind != OCI_INDEX:
                    return []  # not a referrers list: the spec says to assume none
                return parse_referrers(doc)
            except ManifestError as e:
                raise tag_where.error(InvalidResponseError, f"referrers tag: {e}") from None

        try:
            return await self._transport.across(endpoints, tag_where, by_tag)
        except ManifestNotFoundError:
            return []

    async def _referrers_at(self, endpoint: RegistryHost, ref: Reference, where: Where) -> list[Descriptor]:
        url: str | None = endpoint.api_url(ref.host, ref.repository, "referrers", where.digest)
        found: list[Descriptor] = []
        for _ in range(MAX_REFERRER_PAGES):
            if url is None:
                break
            page_url = url

            async def handler(
                resp: aiohttp.ClientResponse, page_url: str = page_url
            ) -> tuple[bytes, str | None]:
                check_status(resp, where, ManifestNotFoundError)
                body = await _read_limited(resp, MAX_MANIFEST_BYTES, where)
                link = resp.links.get("next")
                return body, urljoin(page_url, str(link["url"])) if link else None

            body, url = await self._transport.request(
                "GET",
                page_url,
                handler,
                where=where,
                endpoint=endpoint,
                scope=ref.scope,
                headers={"Accept": OCI_INDEX},
            )
            try:
                _, doc = load_document(body, OCI_INDEX)
                found.extend(parse_referrers(doc))
            except ManifestError as e:
                raise where.error(InvalidResponseError, f"referrers list: {e}") from None
            if len(found) > MAX_REFERRERS:
                break
        return found[:MAX_REFERRERS]

    @staticmethod
    def _load(
        media_type: str, body: bytes, host: str, digest: str, ref: Reference
    ) -> tuple[str, dict[str, object]]:
        try:
            return load_document(body, media_type)
        except ManifestError as e:
            raise InvalidResponseError(str(e), host=host, repository=ref.repository, digest=digest) from None

    @staticmethod
    def _check_digest(body: bytes, pinned: str | None, header: str, where: Where) -> str:
        """The manifest's digest; a mismatch with the pinned or announced digest is an error."""
        try:
            if pinned is not None:
                if not matches_digest(body, pinned):
                    raise where.error(
                        DigestMismatchError, "manifest content does not match the pinned digest"
                    )
                return pinned
            if header and not matches_digest(body, header):
                raise where.error(
                    DigestMismatchError, "manifest content does not match Docker-Content-Digest"
                )
            return header or digest_of(body)
        except ManifestError as e:
            raise where.error(FetchError, str(e)) from None

    async def _get_manifest(
        self, endpoint: RegistryHost, ref: Reference, obj: str, where: Where
    ) -> tuple[str, bytes, str]:
        """GET a manifest: (Content-Type, body, Docker-Content-Digest or "")."""
        url = endpoint.api_url(ref.host, ref.repository, "manifests", obj)

        async def handler(resp: aiohttp.ClientResponse) -> tuple[str, bytes, str] | str:
            location = resp.headers.get("Location")
            if 300 <= resp.status < 400 and location:
                return urljoin(url, location)
            check_status(resp, where, ManifestNotFoundError)
            body = await _read_limited(resp, MAX_MANIFEST_BYTES, where)
            return resp.headers.get("Content-Type", ""), body, resp.headers.get("Docker-Content-Digest", "")

        headers = {"Accept": ACCEPT}
        answer = await self._transport.request(
            "GET", url, handler, where=where, endpoint=endpoint, scope=ref.scope, headers=headers
        )
        if isinstance(answer, str):  # redirected off the registry: follow once, without credentials
            answer = await self._transport.request(
                "GET", answer, handler, where=where, headers=headers, via=endpoint, what="manifest redirect"
            )
            if isinstance(answer, str):
                raise where.error(InvalidResponseError, "manifest redirected more than once")
        return answer


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, where: Where) -> bytes:
    chunks, total = [], 0
    async for chunk in resp.content.iter_chunked(64 << 10):
        total += len(chunk)
        if total > limit:
            raise where.error(InvalidResponseError, f"manifest larger than {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) != len(body):
        raise Retry(f"manifest body has {len(body)} of {length} bytes", InvalidResponseError)
    return body
