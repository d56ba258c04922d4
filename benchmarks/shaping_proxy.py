"""A loopback TCP proxy that makes a local registry look like a remote one: round-trip latency and a
bandwidth cap, applied in user space because this machine's kernel has no netem (``tc qdisc ... netem``).

Put it between image clients (containerd, lazysnap) and a registry on 127.0.0.1; the benchmark harness
and ``make demo`` use it to compare pulls over "cloud", "slow" and "far" links. It owns only the link
model, nothing about HTTP or registries:

* latency: every chunk, in each direction, is delivered one-way delay (rtt/2) after the proxy read it,
  in order. Chunks wait in a timestamped queue, so a stream keeps flowing (delay, not throttling) and
  one request/response exchange costs one RTT. Connection setup is not charged an RTT.
* bandwidth: one token bucket per direction, shared by all connections, with a small burst; data is
  forwarded in pieces of at most 64 KiB so concurrent connections share the link fairly.

Usable from asyncio (``await proxy.start()`` / ``await proxy.stop()``) or from synchronous code, where it
runs its own event loop in a thread (``start_in_thread()`` / ``stop_thread()``). Standalone::

    python -m benchmarks.shaping_proxy --upstream 127.0.0.1:5000 --profile slow --port 0

prints the listening address (``127.0.0.1:PORT``) on stdout and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import math
import signal
import sys
import threading
from types import TracebackType
from typing import NamedTuple

CHUNK = 64 * 1024  # largest piece forwarded at once: the bucket's unit of fairness
# Token bucket depth: small, so N bytes take ~N/bandwidth, but at least 4 ms of traffic, because asyncio
# sleeps wake up to 1 ms late (epoll's resolution) and a shallower bucket would lose the refill of that
# overshoot: with 64 KiB only, a 1 Gbit/s link delivered ~790 Mbit/s (996 with this floor).
BURST = 64 * 1024
BURST_SECONDS = 0.004
# In-flight bytes per direction are bounded (memory), at twice the bandwidth-delay product so the
# bound never limits throughput, within these limits.
MIN_QUEUE_CHUNKS = 64
MAX_QUEUE_CHUNKS = 1024  # 64 MiB


class Profile(NamedTuple):
    rtt_ms: float
    bandwidth_bps: float  # bits per second


PROFILES: dict[str, Profile] = {
    "cloud": Profile(10.0, 1e9),  # same-region registry
    "slow": Profile(40.0, 100e6),
    "far": Profile(150.0, 1e9),  # another continent
    "none": Profile(0.0, math.inf),  # plain pass-through, for counting only
}


def _loopback(host: str) -> str:
    """The proxy must never reach or expose anything beyond this machine."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not a loopback IPv4 address: {host!r}") from None
    if addr.version != 4 or not addr.is_loopback:
        raise ValueError(f"not a loopback IPv4 address: {host!r}")
    return host


class _TokenBucket:
    """Shared pacing for one direction. Takers reserve tokens up front (the balance may go negative)
    and sleep off their debt, so waiters are served in the order they asked: fair between
    connections, and no drift from sleeps that overshoot."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate  # bytes per second
        self._burst = burst
        self._tokens = burst
        self._last = asyncio.get_running_loop().time()

    async def take(self, n: int) -> None:
        now = asyncio.get_running_loop().time()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self._rate)


# (due time, data); b"" is end of stream, delivered as a half-close after the same delay.
_Queue = asyncio.Queue[tuple[float, bytes]]


class ShapingProxy:
    """Forwards 127.0.0.1:port to an upstream on loopback, adding latency and a bandwidth cap.

    ``bytes_down`` counts bytes forwarded to clients (upstream -> client), ``bytes_up`` the other way,
    ``connections`` the connections accepted.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        rtt_ms: float,
        bandwidth_bps: float,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        if rtt_ms < 0 or math.isnan(rtt_ms):
            raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms}")
        if not bandwidth_bps > 0:
            raise ValueError(f"bandwidth_bps must be > 0, got {bandwidth_bps}")
        self.upstream = (_loopback(upstream_host), upstream_port)
        self.rtt_ms = rtt_ms
        self.bandwidth_bps = bandwidth_bps
        self._listen = (_loopback(listen_host), listen_port)
        self._one_way = rtt_ms / 2000.0
        self._rate = bandwidth_bps / 8  # bytes per second
        # inf bandwidth with zero delay is nothing in flight (and inf * 0 would be NaN).
        bdp_chunks = 2 * self._rate * self._one_way / CHUNK if self._one_way else 0.0
        self._queue_chunks = int(min(max(bdp_chunks, MIN_QUEUE_CHUNKS), MAX_QUEUE_CHUNKS))
        self.port = 0
        self._bytes_down = 0
        self._bytes_up = 0
        self._connections = 0
        self._lock = threading.Lock()  # counters are read and reset from other threads
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._down: _TokenBucket | None = None
        self._up: _TokenBucket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"{self._listen[0]}:{self.port}"

    @property
    def bytes_down(self) -> int:
        return self._bytes_down

    @property
    def bytes_up(self) -> int:
        return self._bytes_up

    @property
    def connections(self) -> int:
        return self._connections

    def reset_counters(self) -> tuple[int, int]:
        """Zero all counters; returns (bytes_down, bytes_up) as they were."""
        with self._lock:
            counts = (self._bytes_down, self._bytes_up)
            self._bytes_down = self._bytes_up = self._connections = 0
        return counts

    # asyncio API

    async def start(self) -> ShapingProxy:
        if self._server is not None:
            raise RuntimeError("proxy already started")
        if not math.isinf(self._rate):
            burst = max(BURST, self._rate * BURST_SECONDS)
            self._down = _TokenBucket(self._rate, burst)
            self._up = _TokenBucket(self._rate, burst)
        self._server = await asyncio.start_server(self._accept, *self._listen)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the listener and every connection, and wait for their tasks to end."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> ShapingProxy:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # Synchronous API: the proxy runs its own event loop in a daemon thread.

    def start_in_thread(self, timeout: float = 10.0) -> ShapingProxy:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="shaping-proxy", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout)
        except BaseException:
            self._close_thread()
            raise
        return self

    def stop_thread(self, timeout: float = 10.0) -> None:
        if self._loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(timeout)
        finally:
            self._close_thread()

    def _close_thread(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def __enter__(self) -> ShapingProxy:
        return self.start_in_thread()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_thread()

    # Forwarding

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine, so the task is tracked from the moment the connection
        # exists and stop() cannot miss one that has not started running yet.
        with self._lock:
            self._connections += 1
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        writers = [client_w]
        clean = False
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
            writers.append(up_w)
            async with asyncio.TaskGroup() as tg:
                for src, dst, bucket, down in (
                    (client_r, up_w, self._up, False),
                    (up_r, client_w, self._down, True),
                ):
                    queue: _Queue = asyncio.Queue(self._queue_chunks)
                    tg.create_task(self._pump(src, queue, bucket))
                    tg.create_task(self._deliver(queue, dst, down))
            clean = True
        except* OSError:
            pass  # a reset, broken pipe or refused upstream ends this connection only
        finally:
            for w in writers:
                await _close(w, clean)

    async def _pump(self, src: asyncio.StreamReader, queue: _Queue, bucket: _TokenBucket | None) -> None:
        """Read, pace through the shared bucket, timestamp. Blocks (TCP backpressure) when the queue
        is full."""
        loop = asyncio.get_running_loop()
        while True:
            data = await src.read(CHUNK)
            if bucket is not None and data:
                await bucket.take(len(data))
            await queue.put((loop.time() + self._one_way, data))
            if not data:
                return

    async def _deliver(self, queue: _Queue, dst: asyncio.StreamWriter, down: bool) -> None:
        """Forward each chunk once its one-way delay has passed; due times never decrease, so the
        chunks behind it are already waiting and the stream stays pipelined."""
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not data:
                # Half-close: the peer may still be sending the other way (request sent, awaiting reply).
                if dst.can_write_eof() and not dst.is_closing():
                    dst.write_eof()
                return
            dst.write(data)
            with self._lock:
                if down:
                    self._bytes_down += len(data)
                else:
                    self._bytes_up += len(data)
            await dst.drain()


async def _close(writer: asyncio.StreamWriter, graceful: bool) -> None:
    """Close after flushing when both directions ended normally; otherwise abort, which also passes a
    reset on to the other side."""
    if graceful:
        writer.close()
    else:
        writer.transport.abort()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    writer.transport.abort()  # no-op if closed; otherwise a peer that stopped reading held the flush


def from_profile(
    name: str, upstream_host: str, upstream_port: int, *, listen_host: str = "127.0.0.1", listen_port: int = 0
) -> ShapingProxy:
    """A proxy with the RTT and bandwidth of one of ``PROFILES``."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}") from None
    return ShapingProxy(
        upstream_host,
        upstream_port,
        rtt_ms=profile.rtt_ms,
        bandwidth_bps=profile.bandwidth_bps,
        listen_host=listen_host,
        listen_port=listen_port,
    )


def _parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


async def _serve(args: argparse.Namespace) -> None:
    host, port = args.upstream
    profile = PROFILES[args.profile]
    rtt_ms = profile.rtt_ms if args.rtt_ms is None else args.rtt_ms
    bandwidth_bps = profile.bandwidth_bps if args.bandwidth_mbps is None else args.bandwidth_mbps * 1e6
    proxy = ShapingProxy(host, port, rtt_ms=rtt_ms, bandwidth_bps=bandwidth_bps, listen_port=args.port)
    await proxy.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    print(proxy.host, flush=True)  # stdout carries only the address, for scripts to read
    print(
        f"shaping 127.0.0.1:{proxy.port} -> {host}:{port}: rtt {rtt_ms:g} ms, "
        f"bandwidth {bandwidth_bps / 1e6:g} Mbit/s",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stopping.wait()
    finally:
        await proxy.stop()
        down, up = proxy.reset_counters()
        print(f"forwarded {down} bytes down, {up} bytes up", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.shaping_proxy", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--upstream", type=_parse_hostport, required=True, help="registry, 127.0.0.1:PORT")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="none")
    parser.add_argument("--port", type=int, default=0, help="listening port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--rtt-ms", type=float, help="override the profile's round-trip time")
    parser.add_argument("--bandwidth-mbps", type=float, help="override the profile's bandwidth (Mbit/s)")
    args = parser.parse_args(argv)
    try:
        _loopback(args.upstream[0])
    except ValueError as e:
        parser.error(str(e))
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
