"""Responses cut mid-body are resumed: what arrived is kept, the retry asks only for the rest, the
pieces are stitched exactly (every byte of the blob depends on its position, so a misplaced byte
cannot go unnoticed), and only attempts that brought nothing use up the retry budget."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable

import pytest
from aiohttp import web

from snapshotter.fetcher import FetchError, InvalidResponseError, RequestSizing, UnreachableError

from .conftest import FakeRegistry, make_client, serve_ranges

DATA = hashlib.shake_256(b"lazysnap resume test").digest(300_000)  # no byte equals its neighbours'

# Decides, for the n-th data request (the probe excluded) and its Range header, after how many body
# bytes the connection is closed; None serves the whole answer.
CutPlan = Callable[[int, str], int | None]


def cut_responses(registry: FakeRegistry, plan: CutPlan) -> list[str]:
    """Serve blob GETs normally but cut their bodies as ``plan`` says; returns the Range headers
    of the data requests, in order (filled as they arrive)."""
    seen: list[str] = []

    async def intercept(request: web.Request) -> web.StreamResponse | None:
        header = request.headers.get("Range", "")
        if request.method != "GET" or "/blobs/" not in request.path or header == "bytes=0-1":
            return None
        seen.append(header)
        cut = plan(len(seen) - 1, header)
        if cut is None:
            return None
        whole = serve_ranges(request, DATA, registry.ranges, registry.boundary)
        assert isinstance(whole.body, bytes)
        resp = web.StreamResponse(status=whole.status, headers=whole.headers)
        resp.content_length = len(whole.body)
        await resp.prepare(request)
        if cut:
            await resp.write(whole.body[:cut])
        assert request.transport is not None
        request.transport.close()  # the connection drops mid-body, after what was written
        return resp

    registry.intercept = intercept
    return seen


def first(n: int, cut: int) -> CutPlan:
    """Cut the first ``n`` data responses after ``cut`` bytes each."""
    return lambda i, _: cut if i < n else None


async def test_a_cut_range_is_resumed_from_where_it_broke_off(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    seen = cut_responses(registry, first(5, 3000))
    # No retries at all: every attempt brought bytes, so none of them counts against the budget.
    async with make_client(max_retries=0) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert blob.last_byte_at == 0.0
        assert await blob.read_ranges([(10_000, 30_000)]) == [DATA[10_000:30_000]]
        assert blob.last_byte_at > 0.0
        counters = client.transport.counters
    assert seen == [f"bytes={10_000 + k * 3000}-29999" for k in range(6)]
    assert counters["resumed"] == 5
    assert counters["resumed_bytes"] == sum(3000 * k for k in range(1, 6))  # kept, not asked again


async def test_a_cut_multi_range_request_asks_only_for_what_is_missing(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    ranges = [(0, 100), (1000, 3000), (5000, 6000), (9000, 9500)]
    # Cut the multipart answer 700 bytes into the data of its second part.
    body = serve_ranges_body(ranges)
    second = body.index(f"Content-Range: bytes 1000-2999/{len(DATA)}".encode())
    cut_at = body.index(b"\r\n\r\n", second) + 4 + 700
    seen = cut_responses(registry, first(1, cut_at))
    async with make_client(max_retries=0) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges(ranges) == [DATA[a:b] for a, b in ranges]
    assert seen == ["bytes=0-99,1000-2999,5000-5999,9000-9499", "bytes=1700-2999,5000-5999,9000-9499"]


def serve_ranges_body(ranges: list[tuple[int, int]]) -> bytes:
    from .conftest import multipart_body

    return multipart_body(DATA, ranges, FakeRegistry().boundary)


async def test_a_cut_inside_part_headers_keeps_the_parts_before(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    ranges = [(0, 100), (1000, 3000), (5000, 6000)]
    body = serve_ranges_body(ranges)
    cut_at = body.index(b"Content-Range: bytes 1000") + 10
    seen = cut_responses(registry, first(1, cut_at))
    async with make_client(max_retries=0) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges(ranges) == [DATA[a:b] for a, b in ranges]
    assert seen[1] == "bytes=1000-2999,5000-5999"


async def test_whole_blob_answers_are_resumed_too(registry: FakeRegistry) -> None:
    """A server that ignores Range sends the blob from its start each time: only bytes past
    what arrived before count, and they are kept."""
    registry.ranges = "ignore"
    digest = registry.add_blob(DATA)
    seen = cut_responses(registry, lambda i, _: [121_000, 124_000, 127_000][i] if i < 3 else None)
    async with make_client(max_retries=0) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges([(120_000, 130_000)]) == [DATA[120_000:130_000]]
    assert seen == [f"bytes={start}-129999" for start in (120_000, 121_000, 124_000, 127_000)]


async def test_read_all_resumes_a_cut_download(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    seen = cut_responses(registry, first(2, 100_000))
    async with make_client(max_retries=0) as client:
        assert await client.blob(f"{registry.host}/app", digest, len(DATA)).read_all() == DATA
    # A plain GET first; then ranges for the rest.
    assert seen == ["", f"bytes=100000-{len(DATA) - 1}", f"bytes=200000-{len(DATA) - 1}"]


async def test_attempts_without_progress_use_up_the_budget(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    seen = cut_responses(registry, lambda i, _: 1000 if i == 0 else 0)
    async with make_client(max_retries=2) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        with pytest.raises(InvalidResponseError) as info:
            await blob.read_ranges([(0, 10_000)])
    # One attempt with progress, then 1 + max_retries in a row without.
    assert seen == ["bytes=0-9999"] + ["bytes=1000-9999"] * 3
    assert "body cut short" in str(info.value)
    assert "gave up after 4 attempts, the last 3 without progress" in str(info.value)


async def test_no_data_for_the_progress_timeout_fails_the_read(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    release = asyncio.Event()

    async def trickle_then_stall(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Range") != "bytes=0-9999":
            return None
        resp = web.StreamResponse(status=206, headers={"Content-Range": f"bytes 0-9999/{len(DATA)}"})
        resp.content_length = 10_000
        await resp.prepare(request)
        await resp.write(DATA[:500])
        await release.wait()  # then nothing, until the test ends
        return resp

    registry.intercept = trickle_then_stall
    # A stall alone would take 30 s per attempt (timeout) and six attempts: the deadline ends it.
    async with make_client(timeout=30.0, max_retries=5, progress_timeout=0.3) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        with pytest.raises(UnreachableError, match=r"no data for 0\.3s; gave up after 1 attempts"):
            await blob.read_ranges([(0, 10_000)])
    release.set()


async def test_a_slow_stream_is_not_a_stall(registry: FakeRegistry) -> None:
    """Bytes keep arriving, each well within the deadline, for longer than the deadline in all."""
    digest = registry.add_blob(DATA)

    async def trickle(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Range") != "bytes=0-1999":
            return None
        resp = web.StreamResponse(status=206, headers={"Content-Range": f"bytes 0-1999/{len(DATA)}"})
        resp.content_length = 2000
        await resp.prepare(request)
        for i in range(0, 2000, 100):
            await resp.write(DATA[i : i + 100])
            await asyncio.sleep(0.05)  # a slow link, not ordering: the total (1 s) outlasts the deadline
        return resp

    registry.intercept = trickle
    async with make_client(max_retries=0, progress_timeout=0.6) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges([(0, 2000)]) == [DATA[:2000]]


async def test_a_malformed_answer_keeps_nothing(registry: FakeRegistry) -> None:
    """Bytes placed by a multipart body that then turns out malformed are withdrawn: the retry
    asks for everything again."""
    digest = registry.add_blob(DATA)
    ranges = [(0, 100), (1000, 2000)]
    body = serve_ranges_body(ranges)
    broken = body.replace(b"\r\n--" + FakeRegistry().boundary.encode() + b"\r\n", b"\r\n--nope\r\n", 1)
    calls = []

    async def malformed(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Range") != "bytes=0-99,1000-1999":
            return None
        calls.append(1)
        if len(calls) > 1:
            return None
        boundary = FakeRegistry().boundary
        ctype = f"multipart/byteranges; boundary={boundary}"
        return web.Response(status=206, body=broken, headers={"Content-Type": ctype})

    registry.intercept = malformed
    async with make_client(max_retries=1) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges(ranges) == [DATA[a:b] for a, b in ranges]
        assert client.transport.counters["resumed"] == 0
    assert len(calls) == 2


async def test_request_sizes_shrink_after_cuts_and_grow_back(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    seen = cut_responses(registry, first(2, 100))
    sizing = RequestSizing(minimum=1000, maximum=64_000)
    async with make_client(max_retries=0, range_concurrency=1, sizing=sizing) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges([(0, 1000)]) == [DATA[:1000]]  # cut twice: 64000 -> 16000
        # The rest (800 bytes) completed, but a request that small does not show the link can do more.
        assert sizing.piece_bytes(registry.host) == 16_000
        assert await blob.read_ranges([(100_000, 196_000)]) == [DATA[100_000:196_000]]
    # 16000 completes (32000), 32000 completes (64000), then the 48000 left.
    assert seen[3:] == ["bytes=100000-115999", "bytes=116000-147999", "bytes=148000-195999"]
    assert sizing.piece_bytes(registry.host) == 64_000


@pytest.mark.parametrize("seed", range(4))
async def test_random_cuts_over_many_ranges_stitch_exactly(registry: FakeRegistry, seed: int) -> None:
    rng = random.Random(seed)
    digest = registry.add_blob(DATA)
    # Random sorted, non-overlapping ranges, small and large, some adjacent.
    points = sorted(rng.sample(range(len(DATA)), 60))
    ranges = [(a, b) for a, b in zip(points[::2], points[1::2], strict=True)]
    lock_rng = random.Random(seed + 100)

    def plan(_: int, header: str) -> int | None:
        if lock_rng.random() < 0.5:
            return None
        return lock_rng.randrange(1, 20_000)  # at least a byte arrives: every attempt progresses

    cut_responses(registry, plan)
    sizing = RequestSizing(minimum=2000, maximum=50_000)
    async with make_client(max_retries=0, max_ranges_per_request=4, sizing=sizing) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges(ranges) == [DATA[a:b] for a, b in ranges]


def test_sizing_policy() -> None:
    sizing = RequestSizing(minimum=100, maximum=1600)
    assert sizing.piece_bytes("a") == 1600
    for want in (800, 400, 200, 100, 100):
        sizing.cut("a")
        assert sizing.piece_bytes("a") == want
    assert sizing.piece_bytes("b") == 1600  # per endpoint
    sizing.completed("a", 10)  # a small request says nothing about the link
    assert sizing.piece_bytes("a") == 100
    for want in (200, 400, 800, 1600, 1600):
        sizing.completed("a", want // 2)
        assert sizing.piece_bytes("a") == want
    assert sizing.sizes() == {}
    with pytest.raises(ValueError):
        RequestSizing(minimum=0)


async def test_a_permanent_error_after_a_cut_fails_at_once(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    seen = cut_responses(registry, first(1, 500))
    real = registry.intercept
    assert real is not None

    async def gone_after_the_cut(request: web.Request) -> web.StreamResponse | None:
        if seen:  # the blob was deleted after the first (cut) answer
            seen.append(request.headers.get("Range", ""))
            return web.Response(status=404)
        return await real(request)

    registry.intercept = gone_after_the_cut
    async with make_client(max_retries=5) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        with pytest.raises(FetchError, match=r"not found \(HTTP 404\)"):
            await blob.read_ranges([(0, 10_000)])
    assert seen == ["bytes=0-9999", "bytes=500-9999"]
