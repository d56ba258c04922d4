"""Reading one blob by byte ranges: redirects, multi-range requests and their fallbacks, and
resuming responses that break off.

The blob URL is resolved once per reader with ``GET Range: bytes=0-1`` without following
redirects. A ``Location`` (typically a presigned object-store URL) is then used for every read,
without the registry's Authorization or hosts.toml headers, if redirects.py allows it; if it
answers 401/403 (expired) or redirects again, the registry is asked once more and the read
retried once.

A read's ranges are split into requests of at most the size sizing.py allows for the server (the
whole read while the link is sound) and sent, ``concurrency`` at a time, as multi-range requests
(``Range: bytes=a-b,c-d``, at most ``max_ranges`` each) that come back as ``multipart/byteranges``.
Servers differ (stargz-snapshotter's resolver.go): some reject multi-range with 400 or 416, some
answer only the first range, some send the whole blob (200). The first two switch that server to
single-range mode for good; a 200 to a single range marks the server as ignoring Range, after
which one request fetches what a read needs from the whole blob. A server may merge neighbouring
ranges into one part; each range is taken from whichever part covers it.

Bodies are read as they arrive into the read's pieces (transfer.py), never more than was asked.
A response cut mid-body keeps what arrived: its retry asks only for what is still missing (see
transport.py for how retries are counted). The chunk digests the layers above check still cover
every byte, so a resumed read can never serve wrong data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
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
from snapshotter.fetcher.multipart import MultipartError, parse_content_range, range_header
from snapshotter.fetcher.reference import Reference
from snapshotter.fetcher.timing import response_started
from snapshotter.fetcher.transfer import Answer, PastEnd, Piece, SizeMismatch, Transfer, WrongAnswer
from snapshotter.fetcher.transport import (
    Progress,
    RangeMode,
    Retry,
    Transport,
    Where,
    check_status,
    read_at_most,
)

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
    probed: bool = True  # False: the registry URL, used before anyone knows whether it redirects

    @property
    def server(self) -> str:
        return urlsplit(self.url).netloc


class _Expired(Exception):  # noqa: N818 - control flow: the cached redirect no longer works
    """``location``: the redirect the registry answered a read of its own URL with, if any."""

    def __init__(self, location: str | None = None) -> None:
        super().__init__(location)
        self.location = location


@dataclass(frozen=True)
class _Outcome:
    """How one request (with its retries) ended, for the range-mode decisions."""

    rejected: bool = False  # the server refused a multi-range request (400/416)
    whole: bool = False  # it answered with the whole blob (200)


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
        self._probe_next = False  # the registry redirected: find the target with a probe
        self._resolving = asyncio.Lock()
        # time.monotonic() when a byte of a range read last arrived: lets a caller that waits
        # for a read tell a slow link (bytes keep coming) from a dead one.
        self.last_byte_at = 0.0

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
        await self._current_target(set(), probe=True)

    async def read_all(self) -> bytes:
        """The whole blob, verified against its digest; never more bytes than its size."""
        size = self.known_size
        if size is None:
            size = await self.size()
        transfer = Transfer([(0, size)])
        if size:
            await self._with_target(lambda target: self._whole(target, transfer))
        (data,) = transfer.result()
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
        transfer = Transfer(ranges)
        if transfer.pieces:
            await self._with_target(lambda target: self._fetch(target, transfer))
        return transfer.result()

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
            except _Expired as expired:
                await self._drop(target)
                if not target.probed:  # the registry redirects: follow it, as a probe would have
                    if expired.location is None:
                        self._probe_next = True
                    else:
                        await self._redirected(target, expired.location)
                    continue
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

    async def _redirected(self, target: _Target, location: str) -> None:
        # Refuse an unsafe target now, with a clear error, as the probe does.
        await self._transport.foreign_session(target.endpoint, location, "blob redirect", self._where)
        async with self._resolving:
            self._target = _Target(target.endpoint, location, foreign=True)

    def _endpoints(self, exclude: set[str]) -> list[RegistryHost]:
        all_endpoints = self._transport.endpoints(self._ref.host, "pull", self._where)
        return [e for e in all_endpoints if e.base_url not in exclude]

    async def _drop(self, target: _Target) -> None:
        async with self._resolving:
            if self._target == target:
                self._target = None

    async def _current_target(self, exclude: set[str], *, probe: bool = False) -> _Target:
        """Where to read from. The first read goes straight to the registry URL: most registries
        answer it themselves, and a probe for a redirect would cost a round trip per layer at
        mount. A registry that redirects answers that read with a redirect, and only then (or
        when asked, ``probe``) the URL is probed with ``Range: bytes=0-1`` to learn the target."""
        async with self._resolving:  # one probe at a time; concurrent readers share its result
            if (
                self._target is None
                or self._target.endpoint.base_url in exclude
                or (probe and not self._target.probed)
            ):
                endpoints = self._endpoints(exclude)
                if not endpoints:
                    raise self._where.error(UnreachableError, "no endpoint left to try")
                if probe or self._probe_next:
                    self._target = await self._transport.across(endpoints, self._where, self._probe)
                else:
                    endpoint = endpoints[0]
                    self._target = _Target(endpoint, self._blob_url(endpoint), foreign=False, probed=False)
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
                if await read_at_most(resp, 2) is None:
                    raise Retry("more than the 2 bytes asked for", InvalidResponseError)
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
        # Refuse an unsafe target now, with a clear error, rather than at the first read.
        await self._transport.foreign_session(endpoint, location, "blob redirect", self._where)
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
        await self._current_target(set(), probe=True)  # the probe's Content-Range carries the total
        if self._server_size is None:
            raise self._where.error(InvalidResponseError, "server reports no blob size")
        return self._server_size

    # -- range requests --------------------------------------------------------------------------

    async def _fetch(self, target: _Target, transfer: Transfer) -> None:
        """Fetch every missing piece of ``transfer`` from ``target``, ``concurrency`` requests at a
        time; a request planned after others completed or broke off is sized by what they showed."""
        transfer.restart()  # requests to a previous target were abandoned with what they held
        server = target.server
        running: set[asyncio.Task[None]] = set()

        def plan() -> list[Piece]:
            mode = self._transport.range_mode(server)
            if mode is RangeMode.NONE:  # one request takes everything from the whole blob
                return transfer.claim(1 << 62, 1 << 30)
            max_ranges = self._max_ranges if mode is RangeMode.MULTI else 1
            return transfer.claim(self._transport.sizing.piece_bytes(server), max_ranges)

        try:
            while True:
                batch = plan() if len(running) < self._concurrency else []
                if batch:
                    running.add(asyncio.ensure_future(self._request(target, transfer, batch)))
                    continue
                if not running:
                    return
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                running -= done
                for task in done:
                    task.result()  # the first failure fails the read
        finally:  # on failure or cancellation no request outlives the read that asked for it
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _request(self, target: _Target, transfer: Transfer, batch: list[Piece]) -> None:
        """One request for ``batch``; what it leaves missing goes back to ``transfer``."""
        server = target.server
        whole_blob = self._transport.range_mode(server) is RangeMode.NONE
        outcome = await self._get(target, batch, span=whole_blob)
        missing = [p for p in batch if not p.done]
        if outcome.rejected or (missing and len(batch) > 1):
            # It refused multi-range, or answered fewer ranges than asked: no multi-range there.
            self._transport.set_range_mode(server, RangeMode.SINGLE)
        elif outcome.whole and not whole_blob:
            # A 200 to one range: Range is ignored there. To several: single ranges may work (S3).
            self._transport.set_range_mode(server, RangeMode.NONE if len(batch) == 1 else RangeMode.SINGLE)
        transfer.release(missing)

    async def _whole(self, target: _Target, transfer: Transfer) -> None:
        """Fetch the whole blob: a plain GET, resumed by range if it breaks off."""
        transfer.restart()
        batch = transfer.claim(1 << 62, 1)
        await self._get(target, batch, plain=True)
        if not transfer.complete:
            raise self._where.error(InvalidResponseError, "server answered a plain GET with partial content")

    async def _get(
        self, target: _Target, batch: list[Piece], *, plain: bool = False, span: bool = False
    ) -> _Outcome:
        """One request for ``batch`` (retried, and resumed where it broke off), filling its pieces.
        ``plain`` asks for the whole blob without a Range header while nothing has arrived;
        ``span`` asks for one range from the first byte missing to the last (a server that
        ignores Range sends the whole blob anyway: keep the header short)."""
        progress = Progress()
        sizing, server = self._transport.sizing, target.server
        asked: list[tuple[int, int]] = []

        def headers() -> dict[str, str] | None:
            asked[:] = [p.remainder for p in batch if not p.done]
            if span and asked:
                asked[:] = [(asked[0][0], asked[-1][1])]
            if not asked or (plain and not any(p.have for p in batch)):
                return None
            return {"Range": range_header(asked)}

        async def handler(resp: aiohttp.ClientResponse) -> _Outcome:
            status = resp.status
            response_started()
            if 300 <= status < 400 and not target.probed and resp.headers.get("Location"):
                raise _Expired(urljoin(target.url, resp.headers["Location"]))  # first read: it redirects
            if 300 <= status < 400 or (target.foreign and status in (401, 403)):
                raise _Expired()  # a presigned URL expired, or the registry now redirects elsewhere
            if not asked:
                return _Outcome()  # a previous attempt completed every piece
            if status in (400, 416) and len(asked) > 1:
                return _Outcome(rejected=True)
            check_status(resp, self._where, BlobNotFoundError)
            if status not in (200, 206):
                raise self._where.error(FetchError, f"unexpected HTTP status {status}")
            answer = self._answer(resp, batch, asked)
            if answer.useless:
                if len(asked) > 1:
                    return _Outcome()  # it answered only some range(s): the caller goes single-range
                (start, end), got = asked[0], answer.describe()
                raise Retry(f"asked for [{start}, {end}), got {got}", InvalidResponseError)
            try:
                async for data in resp.content.iter_any():
                    kept = answer.feed(data)
                    if kept:
                        progress.add(kept)
                        self.last_byte_at = progress.last
                    if answer.satisfied:
                        break
                else:
                    answer.finish()
                    if len(asked) == 1 and answer.missing():
                        (start, end), got = asked[0], answer.describe()
                        raise WrongAnswer(f"asked for [{start}, {end}), got {got}")
            except WrongAnswer as e:
                progress.drop(answer.rollback())
                raise Retry(str(e), InvalidResponseError) from None
            except PastEnd:
                raise self._where.error(RangeNotSatisfiableError, "range ends past the blob") from None
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                sizing.cut(server)
                raise
            sizing.completed(server, sum(end - start for start, end in asked))
            if answer.whole and self._server_size is None and answer.total is not None:
                self._server_size = answer.total
            return _Outcome(whole=answer.whole)

        return await self._transport.request(
            "GET",
            target.url,
            handler,
            where=self._where,
            endpoint=None if target.foreign else target.endpoint,
            scope=self._ref.scope,
            headers=headers,
            fetch=True,
            via=target.endpoint if target.foreign else None,
            what="blob redirect",
            progress=progress,
        )

    def _answer(
        self, resp: aiohttp.ClientResponse, batch: list[Piece], asked: list[tuple[int, int]]
    ) -> Answer:
        length = resp.headers.get("Content-Length", "")
        try:
            return Answer(
                batch,
                asked,
                status=resp.status,
                content_type_header=resp.headers.get("Content-Type", ""),
                content_range=resp.headers.get("Content-Range", ""),
                content_length=int(length) if length.isdigit() else None,
                size=self.known_size,
            )
        except SizeMismatch as e:
            raise self._where.error(InvalidResponseError, str(e)) from None
        except WrongAnswer as e:
            raise Retry(str(e), InvalidResponseError) from None
