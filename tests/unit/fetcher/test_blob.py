"""Ranged blob reads against a local fake registry: multi-range, fallbacks, redirects, retries."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aiohttp import web

from snapshotter.fetcher import (
    BlobNotFoundError,
    DigestMismatchError,
    FetchError,
    HostsConfig,
    InvalidResponseError,
    RangeNotSatisfiableError,
    UnreachableError,
)
from snapshotter.fetcher.transport import Where

from .conftest import FakeRegistry, ObjectStore, make_client

DATA = bytes((i * 7 + i // 256) % 256 for i in range(10_000))
RANGES = [(0, 10), (100, 200), (5000, 5001), (9990, 10_000)]


def expected(ranges: list[tuple[int, int]]) -> list[bytes]:
    return [DATA[a:b] for a, b in ranges]


def range_headers(reg: FakeRegistry) -> list[str]:
    return [r.headers.get("Range", "") for r in reg.blob_requests() if r.method == "GET"]


async def test_single_range(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges([(10, 20)]) == [DATA[10:20]]
    # One exact range, straight away: no probe for a redirect the registry does not send.
    assert range_headers(registry) == ["bytes=10-19"]
    assert all(r.headers.get("Accept-Encoding") == "identity" for r in registry.blob_requests())


async def test_multi_range_one_request(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges(RANGES) == expected(RANGES)
        assert await blob.read_ranges([]) == []
        assert await blob.read_ranges([(3, 3), (4, 6)]) == [b"", DATA[4:6]]
    assert range_headers(registry)[0] == "bytes=0-9,100-199,5000-5000,9990-9999"


async def test_ranges_are_batched(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    ranges = [(i * 1000, i * 1000 + 5) for i in range(5)]
    async with make_client(max_ranges_per_request=2) as client:
        assert await client.blob(f"{registry.host}/app", digest).read_ranges(ranges) == expected(ranges)
    assert sorted(range_headers(registry)) == [
        "bytes=0-4,1000-1004",
        "bytes=2000-2004,3000-3004",
        "bytes=4000-4004",
    ]


@pytest.mark.parametrize("mode", ["reject400", "reject416", "first_only", "ignore_multi"])
async def test_fallback_to_single_ranges_is_permanent(registry: FakeRegistry, mode: str) -> None:
    registry.ranges = mode
    digest = registry.add_blob(DATA)
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges(RANGES) == expected(RANGES)
        before = len(range_headers(registry))
        # A second reader of another blob on the same host goes straight to single ranges.
        other = client.blob(f"{registry.host}/app", registry.add_blob(DATA[::-1]), len(DATA))
        assert await other.read_ranges(RANGES[:2]) == [DATA[::-1][0:10], DATA[::-1][100:200]]
    later = range_headers(registry)[before:]
    assert sorted(later) == ["bytes=0-9", "bytes=100-199"]


async def test_whole_blob_instead_of_206(registry: FakeRegistry, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapshotter.fetcher")
    registry.ranges = "ignore"
    digest = registry.add_blob(DATA)
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges(RANGES) == expected(RANGES)
        # It ignored a multi-range request: try single ranges, which it ignores too.
        n = len(registry.blob_requests())
        assert await blob.read_ranges([(1, 2), (3, 4)]) == [DATA[1:2], DATA[3:4]]
        assert len(registry.blob_requests()) == n + 2
        # Now known to ignore Range: one request per read, sliced.
        assert await blob.read_ranges([(1, 2), (3, 4), (9999, 10_000)]) == [DATA[1:2], DATA[3:4], DATA[9999:]]
        assert len(registry.blob_requests()) == n + 3
    downgrades = [r for r in caplog.records if r.getMessage() == "server range support downgraded"]
    assert len(downgrades) == 2  # multi → single → none, each logged once for the host


async def test_server_may_coalesce_ranges(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)

    async def coalesce(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Range") == "bytes=0-9,20-29":
            return web.Response(
                status=206, body=DATA[0:30], headers={"Content-Range": f"bytes 0-29/{len(DATA)}"}
            )
        return None

    registry.intercept = coalesce
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges([(0, 10), (20, 30)]) == [DATA[0:10], DATA[20:30]]
        assert await blob.read_ranges([(0, 10), (40, 50)]) == [DATA[0:10], DATA[40:50]]


async def test_quoted_boundary_with_preamble(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)

    async def quoted(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Range") == "bytes=0-1,4-5":
            total = len(DATA)
            body = (
                f"preamble\r\n--a:b\r\nContent-Range: bytes 0-1/{total}\r\n\r\n".encode()
                + DATA[0:2]
                + f"\r\n--a:b\r\nContent-Range: bytes 4-5/{total}\r\n\r\n".encode()
                + DATA[4:6]
                + b"\r\n--a:b--\r\n"
            )
            return web.Response(
                status=206, body=body, headers={"Content-Type": 'multipart/byteranges; boundary="a:b"'}
            )
        return None

    registry.intercept = quoted
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges([(0, 2), (4, 6)]) == [DATA[0:2], DATA[4:6]]


async def test_redirect_without_auth_and_expired_url(
    registry: FakeRegistry, object_store: tuple[ObjectStore, str]
) -> None:
    store, store_url = object_store
    registry.auth = "bearer"
    registry.redirect_base = store_url
    digest = registry.add_blob(DATA)
    store.blobs[digest] = DATA
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges(RANGES) == expected(RANGES)
        assert registry.redirects_issued == 1
        store.valid_from = 2  # the presigned URL from the first redirect has expired
        assert await blob.read_ranges([(5, 6)]) == [DATA[5:6]]
        assert registry.redirects_issued == 2
        store.valid_from = 100  # expired again, and re-resolving does not help: give up
        with pytest.raises(FetchError, match="even after re-resolving"):
            await blob.read_ranges([(5, 6)])
    assert store.requests and all("Authorization" not in r.headers for r in store.requests)
    assert [r.query["sig"] for r in store.requests[:2]] == ["1", "1"]
    assert any(r.headers.get("Authorization", "").startswith("Bearer ") for r in registry.blob_requests())


async def test_5xx_then_success(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        await blob.read_ranges([(0, 1)])
        registry.fail_statuses = [503, 502, 500]
        assert await blob.read_ranges(RANGES) == expected(RANGES)
    assert len(range_headers(registry)) == 5  # first read, 3 failures, success


async def test_persistent_5xx_gives_up(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    registry.fail_statuses = [500] * 100
    async with make_client(max_retries=3) as client:
        with pytest.raises(UnreachableError) as info:
            await client.blob(f"{registry.host}/app", digest).read_ranges([(0, 1)])
    assert len(registry.blob_requests()) == 4
    assert "HTTP 500; gave up after 4 attempts" in str(info.value)
    assert (
        registry.host in str(info.value) and "repository=app" in str(info.value) and digest in str(info.value)
    )


async def test_client_errors_are_not_retried(registry: FakeRegistry) -> None:
    registry.fail_statuses = [400]
    async with make_client() as client:
        with pytest.raises(FetchError, match="unexpected HTTP status 400"):
            await client.blob(f"{registry.host}/app", "sha256:" + "0" * 64).read_ranges([(0, 1)])
        with pytest.raises(BlobNotFoundError):
            await client.blob(f"{registry.host}/app", "sha256:" + "0" * 64).read_ranges([(0, 1)])
    assert len(registry.blob_requests()) == 2


@pytest.mark.parametrize("fault", ["short", "wrong_range", "cut"])
async def test_bad_bodies_are_retried(registry: FakeRegistry, fault: str) -> None:
    digest = registry.add_blob(DATA)
    faults = [fault]

    async def broken(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Range") != "bytes=10-19" or not faults:
            return None
        faults.pop()
        if fault == "short":
            return web.Response(
                status=206, body=DATA[10:15], headers={"Content-Range": f"bytes 10-19/{len(DATA)}"}
            )
        if fault == "wrong_range":
            return web.Response(
                status=206, body=DATA[11:21], headers={"Content-Range": f"bytes 11-20/{len(DATA)}"}
            )
        resp = web.StreamResponse(status=206, headers={"Content-Range": f"bytes 10-19/{len(DATA)}"})
        resp.content_length = 10
        await resp.prepare(request)
        await resp.write(DATA[10:13])
        assert request.transport is not None
        request.transport.close()  # the connection drops mid-body
        return resp

    registry.intercept = broken
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges([(10, 20)]) == [DATA[10:20]]
    if fault == "cut":  # what arrived is kept: the retry asks for the rest
        assert range_headers(registry) == ["bytes=10-19", "bytes=13-19"]
    else:  # a body that contradicts its headers is not used at all
        assert range_headers(registry) == ["bytes=10-19", "bytes=10-19"]


async def test_persistently_wrong_content_range_is_an_error(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)

    async def wrong(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Range") == "bytes=10-19":
            return web.Response(
                status=206, body=DATA[0:10], headers={"Content-Range": f"bytes 0-9/{len(DATA)}"}
            )
        return None

    registry.intercept = wrong
    async with make_client(max_retries=2) as client:
        with pytest.raises(InvalidResponseError, match=r"asked for \[10, 20\)"):
            await client.blob(f"{registry.host}/app", digest).read_ranges([(10, 20)])


async def test_stalled_server_times_out(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    stall = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Range") == "bytes=10-19":
            await stall.wait()
        return None

    registry.intercept = stalls
    async with make_client(timeout=0.3, max_retries=1) as client:
        with pytest.raises(UnreachableError, match="timed out"):  # never set: only a timeout ends it
            await client.blob(f"{registry.host}/app", digest).read_ranges([(10, 20)])
    stall.set()


async def test_mirror_failing_falls_over_to_origin(registry: FakeRegistry, tmp_path: Path) -> None:
    digest = registry.add_blob(DATA)
    host_dir = tmp_path / (registry.host.replace(":", "_") + "_")
    host_dir.mkdir()
    (host_dir / "hosts.toml").write_text(
        f'server = "http://{registry.host}"\n'
        '[host."http://127.0.0.1:1"]\n  capabilities = ["pull", "resolve"]\n'
    )
    async with make_client(HostsConfig(tmp_path), max_retries=1) as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges(RANGES) == expected(RANGES)
        where = Where(registry.host, "app", digest)
        order = [e.base_url for e in client.transport.endpoints(registry.host, "pull", where)]
        assert order == [f"http://{registry.host}/v2", "http://127.0.0.1:1/v2"]  # the sick mirror goes last
        other = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await other.read_ranges([(1, 2)]) == [DATA[1:2]]


async def test_mirror_5xx_falls_over_mid_read(registry: FakeRegistry, tmp_path: Path) -> None:
    origin = FakeRegistry(blobs={})
    digest = registry.add_blob(DATA)  # the fake "registry" plays the mirror here
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", origin.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    origin_host = f"127.0.0.1:{runner.addresses[0][1]}"
    origin.blobs[digest] = DATA
    try:
        host_dir = tmp_path / (origin_host.replace(":", "_") + "_")
        host_dir.mkdir()
        (host_dir / "hosts.toml").write_text(f'[host."http://{registry.host}"]\n')
        async with make_client(HostsConfig(tmp_path), max_retries=1) as client:
            blob = client.blob(f"{origin_host}/app", digest, len(DATA))
            assert await blob.read_ranges([(0, 5)]) == [DATA[0:5]]
            registry.fail_statuses = [503] * 10
            assert await blob.read_ranges(RANGES) == expected(RANGES)
        assert origin.blob_requests()
    finally:
        await runner.cleanup()


async def test_read_all_size_and_checks(registry: FakeRegistry) -> None:
    digest = registry.add_blob(DATA)
    async with make_client() as client:
        assert await client.blob(f"{registry.host}/app", digest).size() == len(DATA)
        assert [r.method for r in registry.blob_requests()] == ["HEAD"]
        assert await client.blob(f"{registry.host}/app", digest, len(DATA)).read_all() == DATA
        with pytest.raises(InvalidResponseError, match="descriptor says 5"):
            await client.blob(f"{registry.host}/app", digest, 5).size()
        with pytest.raises(RangeNotSatisfiableError):
            await client.blob(f"{registry.host}/app", digest, len(DATA)).read_ranges([(0, len(DATA) + 1)])
        with pytest.raises(ValueError, match="sorted"):
            await client.blob(f"{registry.host}/app", digest).read_ranges([(10, 20), (0, 5)])
        bad = "sha256:" + "1" * 64
        registry.blobs[bad] = DATA
        with pytest.raises(DigestMismatchError):
            await client.blob(f"{registry.host}/app", bad).read_all()
        with pytest.raises(RangeNotSatisfiableError):
            await client.blob(f"{registry.host}/app", digest).read_ranges([(len(DATA) + 5, len(DATA) + 6)])


async def test_single_range_fallback_has_bounded_concurrency(registry: FakeRegistry) -> None:
    registry.ranges = "reject400"
    digest = registry.add_blob(DATA)
    in_flight, peak = 0, 0

    async def count(request: web.Request) -> web.StreamResponse | None:
        nonlocal in_flight, peak
        if "," not in request.headers.get("Range", ","):
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.02)
            in_flight -= 1
        return None

    registry.intercept = count
    ranges = [(i * 100, i * 100 + 10) for i in range(12)]
    async with make_client(range_concurrency=3) as client:
        assert await client.blob(f"{registry.host}/app", digest, len(DATA)).read_ranges(ranges) == expected(
            ranges
        )
    assert peak == 3


async def test_a_registry_that_redirects_is_followed_from_the_first_read(
    registry: FakeRegistry, object_store: tuple[ObjectStore, str]
) -> None:
    """No probe before the first read (a round trip per layer at mount); a registry that
    redirects answers that read with its redirect, which is followed and kept."""
    store, store_url = object_store
    registry.redirect_base = store_url
    digest = registry.add_blob(DATA)
    store.blobs[digest] = DATA
    async with make_client() as client:
        blob = client.blob(f"{registry.host}/app", digest, len(DATA))
        assert await blob.read_ranges([(10, 20)]) == [DATA[10:20]]
        assert await blob.read_ranges([(30, 40)]) == [DATA[30:40]]
    assert range_headers(registry) == ["bytes=10-19"]  # one request to the registry, then the store
    assert registry.redirects_issued == 1 and len(store.requests) == 2
