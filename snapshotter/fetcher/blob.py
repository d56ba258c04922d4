"""Reading one blob by byte ranges: redirects, multi-range requests and their fallbacks.

The blob URL is resolved once per reader with ``GET Range: bytes=0-1`` without following
redirects. A ``Location`` (typically a presigned object-store URL) is then used for every read,
without the registry's Authorization or hosts.toml headers; if it answers 401/403 (expired) or
redirects again, the registry is asked once more and the read retried once.

Ranges go out as multi-range requests (``Range: bytes=a-b,c-d``, at most ``max_ranges`` each) and
come back as ``multipart/byteranges``. Servers differ (stargz-snapshotter's resolver.go): some
reject multi-range with 400 or 416, some answer only the first range, some send the whole blob
(200). The first two switch that server to single-range mode for good, sending the ranges as
parallel single requests; a 200 to a single range marks the server as ignoring Range, after which
one request fetches the span of a read and it is sliced. A server may merge neighbouring ranges
into one part; each requested range is cut from whichever part covers it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp

from snapshotter.fetcher.errors import (
    AuthError,
    BlobNotFoundError,
    DigestMismatchError,
    FetchError,
    InvalidResponseError,
    RangeNotSatisfiableError,
    UnreachableError,
)
from snapshotter.fetcher.hosts import RegistryHost
from snapshotter.fetcher.manifest import ManifestError, matches_digest
from snapshotter.fetcher.multipart import (
    BytePart,
    MultipartError,
    content_type,
    parse_byteranges,
    parse_content_range,
    range_header,
)
from snapshotter.fetcher.reference import Reference
from snapshotter.fetcher.transport import RangeMode, Retry, Transport, Where, check_status

log = logging.getLogger(__name__)
T = TypeVar("T")
Range = tuple[int, int]
_HASH_IN_THREAD = 1 << 20  # hash bigger bodies off the event loop (hashlib releases the GIL)


@dataclass(frozen=True)
class _Target:
    """Where this blob's bytes are read from: the registry URL, or what it redirected to."""

    endpoint: RegistryHost
    url: str
    foreign: bool  # a redirect target: no registry credentials or headers go there

    @property
    def server(self) -> str:
        return urlsplit(self.url).netloc


class _Expired(Exception):  # noqa: N818 - control flow: the cached redirect no longer works
    pass


@dataclass(frozen=True)
class _Answer:
    parts: tuple[BytePart, ...] = ()
    whole: bytes | None = None  # the server sent the entire blob (200)
    rejected: bool = False  # the server refused a multi-range request (400/416)


class BlobReader:
    """Reads bytes of one blob; create with ``RegistryClient.blob``. Safe for concurrent use."""

    def __init__(
        self,
        transport: Transport,
        ref: Reference,
        digest: str,
        size: int | None,
        *,
        max_ranges: int,
        concurrency: int,
    ) -> None:
        self._transport = transport
        self._ref = ref
        self.digest = digest
        self._expected_size = size
        self._server_size: int | None = None
        self._where = Where(ref.host, ref.repository, digest)
        self._max_ranges = max(1, max_ranges)
        self._concurrency = max(1, concurrency)
        self._target: _Target | None = None
        self._resolving = asyncio.Lock()

    @property
    def known_size(self) -> int | None:
        return self._expected_size if self._expected_size is not None else self._server_size

    # -- public API ------------------------------------------------------------------------------

    async def size(self) -> int:
        """The blob's size as the registry reports it (HEAD); checked against the descriptor's."""
        if self._server_size is None:
            self._server_size = await self._head_size()
        if self._expected_size is not None and self._server_size != self._expected_size:
            raise self._where.error(
                InvalidResponseError,
                f"registry reports {self._server_size} bytes, the descriptor says {self._expected_size}",
            )
        return self._server_size

    async def check(self) -> None:
        """Re-resolve the blob URL now, raising if no endpoint serves the blob any more."""
        async with self._resolving:
            self._target = None
        await self._current_target(set())

    async def read_all(self) -> bytes:
        """The whole blob, verified against its digest."""

        async def whole(target: _Target) -> bytes:
            answer = await self._get(target, None, single=None)
            if answer.whole is not None:
                return answer.whole
            raise self._where.error(InvalidResponseError, "server answered a plain GET with partial content")

        data = await self._with_target(whole)
        try:
            if len(data) >= _HASH_IN_THREAD:
                ok = await asyncio.to_thread(matches_digest, data, self.digest)
            else:
                ok = matches_digest(data, self.digest)
        except ManifestError as e:
            raise self._where.error(FetchError, str(e)) from None
        if not ok:
            raise self._where.error(DigestMismatchError, "blob content does not match its digest")
        return data

    async def read_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        """Bytes of each half-open ``[start, end)`` range (sorted, non-overlapping), in order."""
        self._validate(ranges)
        wanted = [r for r in ranges if r[1] > r[0]]
        got = await self._with_target(lambda target: self._fetch(target, wanted)) if wanted else {}
        return [got.get(r, b"") for r in ranges]

    # -- targets and failover --------------------------------------------------------------------

    def _validate(self, ranges: Sequence[Range]) -> None:
        previous_end = 0
        size = self.known_size
        for start, end in ranges:
            if start < previous_end or end < start:
                raise ValueError(
                    f"ranges must be sorted, non-overlapping and start <= end: {list(ranges)[:8]}"
                )
            previous_end = end
            if size is not None and end > size:
                raise self._where.error(
                    RangeNotSatisfiableError, f"range [{start}, {end}) ends past size {size}"
                )

    async def _with_target(self, op: Callable[[_Target], Awaitable[T]]) -> T:
        """Run ``op`` on the resolved target; re-resolve once if a redirect expired; fail over."""
        failed: set[str] = set()
        refreshed = False
        while True:
            target = await self._current_target(failed)
            try:
                return await op(target)
            except _Expired:
                await self._drop(target)
                if refreshed:
                    raise self._where.error(
                        AuthError, "blob URL refused access even after re-resolving"
                    ) from None
                refreshed = True
            except UnreachableError as e:
                self._transport.mark(target.endpoint, healthy=False)
                await self._drop(target)
                failed.add(target.endpoint.base_url)
                if not self._endpoints(failed):
                    raise
                log.warning(
                    "blob endpoint failed, trying the next",
                    extra={"endpoint": target.endpoint.host, "digest": self.digest, "error": e.reason},
                )

    def _endpoints(self, exclude: set[str]) -> list[RegistryHost]:
        all_endpoints = self._transport.endpoints(self._ref.host, "pull", self._where)
        return [e for e in all_endpoints if e.base_url not in exclude]

    async def _drop(self, target: _Target) -> None:
        async with self._resolving:
            if self._target == target:
                self._target = None

    async def _current_target(self, exclude: set[str]) -> _Target:
        async with self._resolving:  # one probe at a time; concurrent readers share its result
            if self._target is None or self._target.endpoint.base_url in exclude:
                endpoints = self._endpoints(exclude)
                if not endpoints:
                    raise self._where.error(UnreachableError, "no endpoint left to try")
                self._target = await self._transport.across(endpoints, self._where, self._probe)
            return self._target

    def _blob_url(self, endpoint: RegistryHost) -> str:
        return endpoint.api_url(self._ref.host, self._ref.repository, "blobs", self.digest)

    async def _probe(self, endpoint: RegistryHost) -> _Target:
        url = self._blob_url(endpoint)

        async def handler(resp: aiohttp.ClientResponse) -> str | None:
            location = resp.headers.get("Location")
            if resp.status in (301, 302, 303, 307, 308) and location:
                return urljoin(url, location)
            if resp.status == 416:  # an empty blob: reachable, nothing to redirect
                return None
            check_status(resp, self._where, BlobNotFoundError)
            if resp.status == 206:
                await resp.read()
                try:
                    total = parse_content_range(resp.headers.get("Content-Range", ""))[2]
                except MultipartError:
                    total = None
                if total is not None:
                    self._server_size = total
            # On 200 the body is the whole blob: leave it unread (aiohttp drops the connection).
            return None

        location = await self._transport.request(
            "GET",
            url,
            handler,
            where=self._where,
            endpoint=endpoint,
            scope=self._ref.scope,
            headers={"Range": "bytes=0-1"},
        )
        if location is None:
            return _Target(endpoint, url, foreign=False)
        return _Target(endpoint, location, foreign=True)

    async def _head_size(self) -> int:
        async def attempt(endpoint: RegistryHost) -> int | None:
            async def handler(resp: aiohttp.ClientResponse) -> int | None:
                if 300 <= resp.status < 400:
                    return None  # redirected: the redirect target knows the size
                check_status(resp, self._where, BlobNotFoundError)
                length = resp.headers.get("Content-Length", "")
                return int(length) if length.isdigit() else None

            return await self._transport.request(
                "HEAD",
                self._blob_url(endpoint),
                handler,
                where=self._where,
                endpoint=endpoint,
                scope=self._ref.scope,
            )

        endpoints = self._transport.endpoints(self._ref.host, "pull", self._where)
        size = await self._transport.across(endpoints, self._where, attempt)
        if size is not None:
            return size
        await self._current_target(set())  # the probe's Content-Range carries the total
        if self._server_size is None:
            raise self._where.error(InvalidResponseError, "server reports no blob size")
        return self._server_size

    # -- range requests --------------------------------------------------------------------------

    async def _fetch(self, target: _Target, wanted: list[Range]) -> dict[Range, bytes]:
        mode = self._transport.range_mode(target.server)
        if mode is RangeMode.NONE:
            span = (wanted[0][0], wanted[-1][1])
            got = _cut(wanted, await self._get(target, [span], single=span))
            self._require(wanted, got)
            return got
        sem = asyncio.Semaphore(self._concurrency)
        if mode is RangeMode.SINGLE or len(wanted) == 1:
            return await self._singles(target, wanted, sem)
        batches = [wanted[i : i + self._max_ranges] for i in range(0, len(wanted), self._max_ranges)]
        out: dict[Range, bytes] = {}
        for part in await _all([self._multi(target, b, sem) for b in batches]):
            out.update(part)
        return out

    async def _multi(self, target: _Target, batch: list[Range], sem: asyncio.Semaphore) -> dict[Range, bytes]:
        if len(batch) == 1:
            return await self._singles(target, batch, sem)
        async with sem:
            answer = await self._get(target, batch, single=None)
        if answer.rejected:
            self._transport.set_range_mode(target.server, RangeMode.SINGLE)
            return await self._singles(target, batch, sem)
        got = _cut(batch, answer)
        missing = [r for r in batch if r not in got]
        if answer.whole is not None:  # it ignored our multi-range (S3 does); single ranges may work
            self._transport.set_range_mode(target.server, RangeMode.SINGLE)
        if missing:  # it answered fewer ranges than asked: no multi-range there
            self._transport.set_range_mode(target.server, RangeMode.SINGLE)
            got.update(await self._singles(target, missing, sem))
        return got

    async def _singles(
        self, target: _Target, ranges: list[Range], sem: asyncio.Semaphore
    ) -> dict[Range, bytes]:
        async def one(rng: Range) -> bytes:
            async with sem:
                answer = await self._get(target, [rng], single=rng)
            if answer.whole is not None:
                self._transport.set_range_mode(target.server, RangeMode.NONE)
            got = _cut([rng], answer)
            self._require([rng], got)
            return got[rng]

        results = await _all([one(r) for r in ranges])
        return dict(zip(ranges, results, strict=True))

    async def _get(self, target: _Target, ranges: list[Range] | None, *, single: Range | None) -> _Answer:
        """One GET (retried): ``ranges`` None for the whole blob; ``single`` is checked for coverage."""

        async def handler(resp: aiohttp.ClientResponse) -> _Answer:
            status = resp.status
            if 300 <= status < 400 or (target.foreign and status in (401, 403)):
                raise _Expired()  # a presigned URL expired, or the registry now redirects elsewhere
            if status in (400, 416) and ranges is not None and len(ranges) > 1:
                return _Answer(rejected=True)
            check_status(resp, self._where, BlobNotFoundError)
            body = await resp.read()
            if status == 200:
                size = self.known_size
                if size is not None and len(body) != size:
                    raise Retry(f"body has {len(body)} of {size} bytes", InvalidResponseError)
                if self._server_size is None:
                    self._server_size = len(body)
                return _Answer(whole=body)
            if status != 206:
                raise self._where.error(FetchError, f"unexpected HTTP status {status}")
            return _Answer(parts=self._parts(resp, body, single))

        return await self._transport.request(
            "GET",
            target.url,
            handler,
            where=self._where,
            endpoint=None if target.foreign else target.endpoint,
            scope=self._ref.scope,
            headers={"Range": range_header(ranges)} if ranges else None,
            fetch=True,
        )

    def _require(self, wanted: list[Range], got: dict[Range, bytes]) -> None:
        # Only a whole-blob answer can miss a range that _get checked: the range lies past its end.
        for start, end in wanted:
            if (start, end) not in got:
                raise self._where.error(
                    RangeNotSatisfiableError, f"range [{start}, {end}) ends past the blob"
                )

    def _parts(self, resp: aiohttp.ClientResponse, body: bytes, single: Range | None) -> tuple[BytePart, ...]:
        try:
            media, boundary = content_type(resp.headers.get("Content-Type", ""))
            if media == "multipart/byteranges":
                if boundary is None:
                    raise MultipartError("multipart/byteranges without a boundary")
                parts = tuple(parse_byteranges(body, boundary))
            else:
                start, end, total = parse_content_range(resp.headers.get("Content-Range", ""))
                if len(body) != end - start:
                    raise MultipartError(f"body has {len(body)} bytes, Content-Range announces {end - start}")
                parts = (BytePart(start, end, total, body),)
        except MultipartError as e:
            raise Retry(str(e), InvalidResponseError) from None
        size = self.known_size
        for part in parts:
            if part.total is not None and size is not None and part.total != size:
                raise self._where.error(
                    InvalidResponseError, f"server says the blob has {part.total} bytes, expected {size}"
                )
        if single is not None and not any(p.start <= single[0] and single[1] <= p.end for p in parts):
            got = ", ".join(f"[{p.start}, {p.end})" for p in parts)
            raise Retry(f"asked for [{single[0]}, {single[1]}), got {got}", InvalidResponseError)
        return parts


async def _all(coros: list[Coroutine[object, object, T]]) -> list[T]:
    """Like gather, but the first failure cancels (and waits for) the others before propagating,
    so no request outlives the read that asked for it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _cut(wanted: list[Range], answer: _Answer) -> dict[Range, bytes]:
    """Slice each wanted range out of the parts (or the whole blob) that cover it."""
    if answer.whole is not None:
        return {(s, e): answer.whole[s:e] for s, e in wanted if e <= len(answer.whole)}
    out: dict[Range, bytes] = {}
    for start, end in wanted:
        for part in answer.parts:
            if part.start <= start and end <= part.end:
                out[(start, end)] = part.data[start - part.start : end - part.start]
                break
    return out
