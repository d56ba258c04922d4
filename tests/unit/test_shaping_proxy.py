"""The shaping proxy the benchmarks put in front of the registry: bytes intact, bandwidth cap shared by
connections, one RTT per exchange without serializing a stream, counters, resets and shutdown."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from benchmarks.shaping_proxy import PROFILES, ShapingProxy, from_profile

pytestmark = pytest.mark.timeout(10)

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
PAYLOAD = random.Random(1234).randbytes(8 * MiB)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Whatever reaches the loop's exception handler: a crashed connection task would end up here."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[int]:
    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the proxy aborted us: expected in the reset tests
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def sender(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serves requests of 8 bytes (a length N) with the first N bytes of PAYLOAD, until EOF."""
    while header := await reader.read(8):
        (n,) = struct.unpack(">Q", header)
        writer.write(PAYLOAD[:n])
        await writer.drain()


@asynccontextmanager
async def shaped(port: int, rtt_ms: float, bandwidth_bps: float) -> AsyncIterator[ShapingProxy]:
    proxy = ShapingProxy("127.0.0.1", port, rtt_ms=rtt_ms, bandwidth_bps=bandwidth_bps)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def download(proxy: ShapingProxy, n: int) -> float:
    """Fetch n bytes through the proxy, check them, return the seconds from request to last byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        start = time.perf_counter()
        writer.write(struct.pack(">Q", n))
        data = await reader.readexactly(n)
        elapsed = time.perf_counter() - start
        assert data == PAYLOAD[:n]
        return elapsed
    finally:
        writer.close()
        await writer.wait_closed()


async def test_echo_forwards_bytes_intact_both_ways_and_counts(loop_errors: list[dict[str, Any]]) -> None:
    payload = PAYLOAD[: 3 * MiB + 12345]
    async with serve(echo) as port, shaped(port, rtt_ms=4, bandwidth_bps=1e9) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)

        async def send() -> None:
            for i in range(0, len(payload), 100_000):  # odd sizes: pieces do not align with 64 KiB
                writer.write(payload[i : i + 100_000])
                await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        received = await reader.read(-1)  # to EOF: the half-close travels through the proxy too
        await sending
        writer.close()
        await writer.wait_closed()
        assert received == payload
        assert (proxy.bytes_up, proxy.bytes_down, proxy.connections) == (len(payload), len(payload), 1)
        assert proxy.reset_counters() == (len(payload), len(payload))
        assert (proxy.bytes_up, proxy.bytes_down, proxy.connections) == (0, 0, 0)
    assert loop_errors == []


async def test_download_intact_and_counted() -> None:
    async with serve(sender) as port, shaped(port, rtt_ms=0, bandwidth_bps=float("inf")) as proxy:
        await download(proxy, 5 * MiB + 1)
        await download(proxy, 1)
        assert proxy.bytes_down == 5 * MiB + 2
        assert proxy.bytes_up == 16
        assert proxy.connections == 2


async def test_transfer_takes_size_over_bandwidth() -> None:
    n, bandwidth = 2 * MiB, 20e6
    ideal = n * 8 / bandwidth  # 0.84 s
    async with serve(sender) as port, shaped(port, rtt_ms=0, bandwidth_bps=bandwidth) as proxy:
        elapsed = await download(proxy, n)
    print(f"2 MiB at 20 Mbit/s: {elapsed:.3f} s (ideal {ideal:.3f} s)")
    # The link's pace is a floor (never faster); above it only a gross error is checked: the
    # machine may be loaded, and the benchmark reports the pace it really got.
    assert ideal * 0.9 <= elapsed <= ideal * 5


async def test_exchange_costs_one_rtt() -> None:
    async with serve(echo) as port, shaped(port, rtt_ms=100, bandwidth_bps=1e9) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            times.append(time.perf_counter() - start)
        writer.close()
        await writer.wait_closed()
    print("exchanges at 100 ms RTT:", ", ".join(f"{t * 1000:.1f} ms" for t in times))
    assert all(0.100 <= t < 0.5 for t in times)  # one RTT each, not several


async def test_concurrent_downloads_share_bandwidth() -> None:
    n, bandwidth = 1 * MiB, 20e6
    ideal_total = 2 * n * 8 / bandwidth  # 0.84 s for both; 0.42 s each if they did not share
    async with serve(sender) as port, shaped(port, rtt_ms=0, bandwidth_bps=bandwidth) as proxy:
        start = time.perf_counter()
        a, b = await asyncio.gather(download(proxy, n), download(proxy, n))
        total = time.perf_counter() - start
    print(f"2 x 1 MiB at 20 Mbit/s: {a:.3f} s and {b:.3f} s, total {total:.3f} s (ideal {ideal_total:.3f} s)")
    assert ideal_total * 0.9 <= total <= ideal_total * 5
    # Fair share: each finishes near the end, not one after the other.
    assert min(a, b) >= ideal_total * 0.8


async def test_latency_does_not_divide_throughput() -> None:
    n, rtt = 4 * MiB, 0.050
    serialized = n / (64 * 1024) * rtt  # 3.2 s if every 64 KiB chunk waited out the delay in turn
    async with serve(sender) as port, shaped(port, rtt_ms=rtt * 1000, bandwidth_bps=1e9) as proxy:
        elapsed = await download(proxy, n)
    print(f"4 MiB at 1 Gbit/s, 50 ms RTT: {elapsed:.3f} s (serialized would be {serialized:.1f} s)")
    assert rtt + n * 8 / 1e9 * 0.9 <= elapsed < serialized / 2


async def test_client_reset_mid_transfer_leaves_proxy_serving(loop_errors: list[dict[str, Any]]) -> None:
    async with serve(sender) as port, shaped(port, rtt_ms=10, bandwidth_bps=100e6) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(struct.pack(">Q", 8 * MiB))
        await reader.readexactly(256 * 1024)
        # RST instead of FIN: the proxy meets ConnectionResetError / BrokenPipe on this connection.
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()

        other = asyncio.create_task(download(proxy, 2 * MiB))  # another client, in flight meanwhile
        await other
        await download(proxy, 1000)
        assert proxy.connections == 3
        deadline = asyncio.get_running_loop().time() + 30  # the reset connection's task ends by itself
        while proxy._tasks and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert not proxy._tasks
    assert loop_errors == []


async def test_stop_closes_listener_and_connections(loop_errors: list[dict[str, Any]]) -> None:
    async with serve(sender) as port:
        proxy = ShapingProxy("127.0.0.1", port, rtt_ms=20, bandwidth_bps=10e6)
        await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(struct.pack(">Q", 8 * MiB))  # takes ~7 s at 10 Mbit/s: still running at stop()
        await reader.readexactly(1000)
        await proxy.stop()

        assert not [
            t for t in asyncio.all_tasks() if "ShapingProxy" in getattr(t.get_coro(), "__qualname__", "")
        ]
        with suppress(ConnectionError):
            await asyncio.wait_for(reader.read(-1), 2)  # EOF or reset, not a hang
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
        await proxy.stop()  # idempotent
    assert loop_errors == []


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


@contextmanager
def threaded_echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def sync_echo(port: int, payload: bytes) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        start = time.perf_counter()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b"".join(iter(lambda: sock.recv(65536), b""))
        elapsed = time.perf_counter() - start
    assert received == payload
    return elapsed


def test_runs_in_its_own_thread_for_synchronous_callers() -> None:
    with threaded_echo() as port:
        proxy = ShapingProxy("127.0.0.1", port, rtt_ms=40, bandwidth_bps=100e6).start_in_thread()
        try:
            assert proxy.host == f"127.0.0.1:{proxy.port}"
            elapsed = sync_echo(proxy.port, PAYLOAD[:100_000])
            assert elapsed >= 0.040
            assert (proxy.bytes_down, proxy.bytes_up, proxy.connections) == (100_000, 100_000, 1)
        finally:
            proxy.stop_thread()
        assert not [t for t in threading.enumerate() if t.name == "shaping-proxy"]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


def test_profiles_and_loopback_only() -> None:
    assert PROFILES["cloud"] == (10, 1e9)
    assert PROFILES["slow"] == (40, 100e6)
    assert PROFILES["far"] == (150, 1e9)
    assert PROFILES["none"] == (0, float("inf"))
    proxy = from_profile("far", "127.0.0.1", 5000)
    assert (proxy.rtt_ms, proxy.bandwidth_bps, proxy.upstream) == (150, 1e9, ("127.0.0.1", 5000))
    with pytest.raises(ValueError, match="unknown profile"):
        from_profile("lunar", "127.0.0.1", 5000)
    for host in ("10.0.0.1", "0.0.0.0", "::1", "registry.example.com"):
        with pytest.raises(ValueError, match="loopback"):
            ShapingProxy(host, 5000, rtt_ms=0, bandwidth_bps=1e9)
        with pytest.raises(ValueError, match="loopback"):
            ShapingProxy("127.0.0.1", 5000, rtt_ms=0, bandwidth_bps=1e9, listen_host=host)


def test_standalone_prints_address_and_forwards() -> None:
    with threaded_echo() as port:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "benchmarks.shaping_proxy"),
                *("--upstream", f"127.0.0.1:{port}", "--profile", "slow", "--port", "0"),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert proc.stdout is not None
            address = proc.stdout.readline().strip()
            host, _, listen_port = address.rpartition(":")
            assert host == "127.0.0.1"
            assert sync_echo(int(listen_port), b"hello") >= 0.040  # the "slow" profile's RTT
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=5)
            assert proc.returncode == 0, err
            assert "forwarded 5 bytes down, 5 bytes up" in err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
