"""The fetch scheduler: for one registry, the only place that decides which bytes move and when.

Every byte lazysnap fetches from a registry belongs to one of four classes of work, served in
this order of priority:

- **on demand**: a reader is blocked on it (the kernel asked for bytes that are not local);
- **startup**: the layer's startup working set (its prefetch list, a recorded profile, the
  eStargz landmark region), wanted before the container asks for it;
- **stream**: ahead of a file that is being read front to back (model weights, a JAR);
- **rest**: the rest of the image, so that it is complete soon and never slower than a full pull.

Requests on demand are sent at once, on connections of their own (a few are kept for them), so a
miss never queues behind lower-class work: it shares the link only with bytes already in flight.
Those, on-demand bytes included, are kept near one and a half bandwidth-delay products (enough to
keep the link full), in pieces of a quarter BDP, so a miss is served within about one round trip
plus its own transfer plus what was in flight when it came. Whenever that budget has room, the
scheduler asks the layers that have lower-class work (``Feeder``) for their next piece, highest
class first and round robin across layers: the link is never idle while any layer is incomplete,
unless the operator said otherwise (``RestPolicy``, a byte-rate cap).

The scheduler knows the link (``LinkModel``: round-trip time and throughput measured from its own
requests) and priorities, not formats or files: a feeder hands it a ``Job`` (ranges of one blob and
what to do with the bytes). Everything runs on the event loop; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from snapshotter.fetcher.timing import on_response

log = logging.getLogger(__name__)

Range = tuple[int, int]


class WorkClass(enum.IntEnum):
    """Classes of work, most urgent first; ``name_for_stats`` is how stats and metrics name them."""

    ON_DEMAND = 0
    STARTUP = 1
    STREAM = 2
    REST = 3

    @property
    def name_for_stats(self) -> str:
        return _STATS_NAMES[self]


_STATS_NAMES = {
    WorkClass.ON_DEMAND: "on_demand",
    WorkClass.STARTUP: "prefetch",
    WorkClass.STREAM: "readahead",
    WorkClass.REST: "background",
}
LOWER_CLASSES = (WorkClass.STARTUP, WorkClass.STREAM, WorkClass.REST)


class RestPolicy(enum.Enum):
    """What to do with the rest of an image once its startup set is local."""

    EAGER = "eager"  # keep the link busy until every layer is complete (default)
    IDLE_ONLY = "idle-only"  # only once nothing was fetched on demand (or mounted) for a while
    OFF = "off"  # never: only what is read (and its startup set, and streams) is fetched


class BlobSource(Protocol):
    """Byte ranges of one blob; the fetcher's BlobReader satisfies it."""

    async def read_ranges(self, ranges: list[Range]) -> list[bytes]: ...


@dataclass
class Job:
    """Ranges of one blob to fetch, and the callback that takes the bytes (or the error)."""

    source: BlobSource
    ranges: list[Range]
    work: WorkClass
    deliver: Callable[[list[bytes] | BaseException], Awaitable[None]]

    @property
    def nbytes(self) -> int:
        return sum(b - a for a, b in self.ranges)


class Feeder(Protocol):
    """A layer with lower-class work: asked for its next job when the link has room."""

    def next_job(self, work: WorkClass, max_bytes: int) -> Job | None:
        """Its next job of class ``work`` of at most ``max_bytes`` (one chunk stream may exceed
        it), its chunks now counted as in flight; None when it has none of that class now."""


@dataclass(frozen=True)
class SchedulerConfig:
    rest: RestPolicy = RestPolicy.EAGER
    rate_bytes: int = 0  # cap on bytes/s of startup, stream and rest work; 0 = none
    max_connections: int = 16  # concurrent requests to the registry
    reserved_for_on_demand: int = 4  # of those, never used by lower-class work
    min_piece_bytes: int = 256 << 10
    max_piece_bytes: int = 8 << 20
    idle_seconds: float = 1.0  # idle-only: this long after the last on-demand fetch
    # Before the link is measured: what to assume (a cloud link: 10 ms, 1 Gbit/s).
    initial_rtt: float = 0.010
    initial_bandwidth: float = 125e6


SMALL_REQUEST_BYTES = 16 << 10
PACING_GAIN = 1.25


class LinkModel:
    """Round-trip time and throughput of the link to one registry, from the requests made on it.

    RTT: the time from sending a request to its response's first byte, as a windowed minimum
    (queueing only ever adds to it, as TCP and BBR reason). Throughput: transfers under way at the
    same time share the link, each getting 1/k of it while k are under way; a transfer of n bytes
    therefore measures the link at n / ∫(1/k)dt over its duration. The largest such sample of
    recent transfers of at least ``min_sample_bytes`` is the estimate (a windowed maximum: a link
    never delivers more than it can). Both forget after ``memory`` seconds, so a changed link is
    followed.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        rtt: float,
        bandwidth: float,
        memory: float = 30.0,
        min_sample_bytes: int = 128 << 10,
    ) -> None:
        self._clock = clock
        self._memory = memory
        self._min_sample = min_sample_bytes
        self._rtts: collections.deque[tuple[float, float]] = collections.deque()  # (when, rtt)
        self._rates: collections.deque[tuple[float, float]] = collections.deque()  # (when, bytes/s)
        self._initial = (rtt, bandwidth)
        self._transferring = 0  # transfers between first byte and last
        self._share = 0.0  # integral over time of 1 / ``_transferring`` (while it is not 0)
        self._share_at = clock()
        self.requests = 0

    @property
    def rtt(self) -> float:
        return min((r for _, r in self._rtts), default=self._initial[0])

    @property
    def bandwidth(self) -> float:
        return max((r for _, r in self._rates), default=self._initial[1])

    @property
    def bdp(self) -> float:
        """Bytes the link holds in flight: round-trip time times throughput."""
        return self.rtt * self.bandwidth

    def _integrate(self) -> float:
        now = self._clock()
        if self._transferring:
            self._share += (now - self._share_at) / self._transferring
        self._share_at = now
        return self._share

    def _forget(self, now: float) -> None:
        for samples in (self._rtts, self._rates):
            while samples and now - samples[0][0] > self._memory:
                samples.popleft()

    def transfer_began(self) -> float:
        """A response's first byte arrived; returns a mark to give ``transfer_ended``."""
        mark = self._integrate()
        self._transferring += 1
        return mark

    def transfer_ended(self, mark: float) -> float:
        """That transfer ended; returns its share of the link meanwhile (seconds of whole link)."""
        share = self._integrate() - mark
        self._transferring -= 1
        return share

    def observe(self, started: float, first_byte: float | None, share: float, nbytes: int) -> None:
        """A request sent at ``started`` whose response began at ``first_byte`` (None: unknown)
        brought ``nbytes``; ``share`` is ``transfer_ended``'s answer."""
        now = self._clock()
        self.requests += 1
        self._forget(now)
        if first_byte is None:
            if nbytes <= SMALL_REQUEST_BYTES:  # all latency: a usable round-trip sample
                self._rtts.append((now, max(1e-6, now - started)))
            return
        self._rtts.append((now, max(1e-6, first_byte - started)))
        if nbytes >= self._min_sample and share > 0:
            self._rates.append((now, nbytes / share))


@dataclass
class ClassStats:
    bytes: int = 0
    requests: int = 0


@dataclass
class SchedulerStats:
    by_class: dict[WorkClass, ClassStats] = field(
        default_factory=lambda: {w: ClassStats() for w in WorkClass}
    )
    on_demand_waits: int = 0  # on-demand requests that had to wait for a connection
    failures: int = 0


class FetchScheduler:
    """One registry's fetch scheduler; see the module docstring. Create and use on the loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, config: SchedulerConfig | None = None, *, name: str = ""
    ) -> None:
        self.loop = loop
        self.config = config or SchedulerConfig()
        self.name = name
        self.link = LinkModel(loop.time, rtt=self.config.initial_rtt, bandwidth=self.config.initial_bandwidth)
        self.stats = SchedulerStats()
        self._feeders: list[Feeder] = []
        self._turn = {w: 0 for w in LOWER_CLASSES}  # round robin position per class
        self._connections = 0
        self._lower_bytes = 0  # bytes of lower-class requests in flight
        self._lower_requests = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()  # on demand
        self._last_on_demand = -1e9
        self._on_demand_in_flight = 0
        self._on_demand_bytes = 0  # bytes of on-demand requests in flight
        self._rate_free_at = 0.0  # rate cap: when the next lower-class byte may start
        self._paced_at = 0.0  # pacing: when the next lower-class piece may start
        self._wakeup: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- sizes from the link --------------------------------------------------------------------

    def piece_bytes(self) -> int:
        """The size of one lower-class request: a quarter of the link's BDP, within bounds, so
        that a few are in flight at once and a miss never waits behind much."""
        cfg = self.config
        return int(min(cfg.max_piece_bytes, max(cfg.min_piece_bytes, self.link.bdp / 4)))

    def target_in_flight(self) -> int:
        """Lower-class bytes kept in flight: one BDP and a half, and at least two pieces."""
        return int(2 * self.link.bdp + 2 * self.piece_bytes())

    # --- feeders --------------------------------------------------------------------------------

    def add_feeder(self, feeder: Feeder) -> None:
        self._feeders.append(feeder)
        # A layer just mounted is about to be read: "idle" starts counting now.
        self._last_on_demand = max(self._last_on_demand, self.loop.time())
        self.pump()

    def remove_feeder(self, feeder: Feeder) -> None:
        if feeder in self._feeders:
            self._feeders.remove(feeder)

    # --- on demand ------------------------------------------------------------------------------

    async def fetch(self, source: BlobSource, ranges: list[Range]) -> list[bytes]:
        """Fetch ``ranges`` for a blocked reader, ahead of every other class of work."""
        nbytes = sum(b - a for a, b in ranges)
        self._on_demand_in_flight += 1
        self._on_demand_bytes += nbytes
        self._last_on_demand = self.loop.time()
        try:
            if self._connections >= self.config.max_connections:
                self.stats.on_demand_waits += 1
                waiter = self.loop.create_future()
                self._waiting.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if not waiter.cancelled() and waiter.done():
                        self._release_connection()  # granted, then cancelled: give it back
                    else:
                        self._waiting.remove(waiter)
                    raise
            else:
                self._take_connection()
            try:
                return await self._request(source, ranges, WorkClass.ON_DEMAND)
            finally:
                self._release_connection()
        finally:
            self._on_demand_in_flight -= 1
            self._on_demand_bytes -= nbytes
            self._last_on_demand = self.loop.time()
            self.pump()

    # --- the pump -------------------------------------------------------------------------------

    def pump(self) -> None:
        """Start lower-class jobs while the link has room (call after anything that may add work)."""
        if self._closed:
            return
        while True:
            piece = self.piece_bytes()
            if self._room() < piece:  # whole pieces only: a sliver would cost a round trip too
                return
            job = self._next_job(piece)
            if job is None:
                return
            self._start(job)

    def _room(self) -> int:
        """Bytes of lower-class work that may start now (0: none)."""
        cfg = self.config
        if self._connections >= cfg.max_connections - cfg.reserved_for_on_demand:
            return 0
        now = self.loop.time()
        free_at = max(self._paced_at, self._rate_free_at if cfg.rate_bytes > 0 else 0.0)
        if free_at > now:
            self._wake_at(free_at)
            return 0
        # On-demand bytes count against the budget: while misses are being served, fewer new
        # lower-class pieces start, so what a miss shares the link with stays bounded.
        return self.target_in_flight() - self._lower_bytes - self._on_demand_bytes

    def _rest_allowed(self) -> bool:
        policy = self.config.rest
        if policy is RestPolicy.OFF:
            return False
        if policy is RestPolicy.IDLE_ONLY:
            quiet_until = self._last_on_demand + self.config.idle_seconds
            if self._on_demand_in_flight or self.loop.time() < quiet_until:
                self._wake_at(quiet_until)
                return False
        return True

    def _next_job(self, max_bytes: int) -> Job | None:
        for work in LOWER_CLASSES:
            if work is WorkClass.REST and not self._rest_allowed():
                continue
            feeders = self._feeders
            for i in range(len(feeders)):
                turn = (self._turn[work] + i) % len(feeders)
                job = feeders[turn].next_job(work, max_bytes)
                if job is not None:
                    self._turn[work] = (turn + 1) % len(feeders)
                    return job
        return None

    def _start(self, job: Job) -> None:
        nbytes = job.nbytes
        self._take_connection()
        self._lower_bytes += nbytes
        self._lower_requests += 1
        now = self.loop.time()
        if self.config.rate_bytes > 0:
            self._rate_free_at = max(self._rate_free_at, now) + nbytes / self.config.rate_bytes
        # Pieces start paced at a little above the measured throughput, not in bursts: equal
        # pieces started together also finish together, and the link would then idle for a
        # round trip between waves. Paced, they finish one after another and the link stays full;
        # the margin lets the throughput estimate find a faster link.
        self._paced_at = max(self._paced_at, now) + nbytes / (self.link.bandwidth * PACING_GAIN)
        task = self.loop.create_task(self._run(job, nbytes))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Job, nbytes: int) -> None:
        result: list[bytes] | BaseException
        try:
            result = await self._request(job.source, job.ranges, job.work)
        except asyncio.CancelledError:
            result = asyncio.CancelledError()
        except Exception as exc:  # the fetcher's errors: the feeder fails those chunks
            result = exc
        finally:
            self._release_connection()
            self._lower_bytes -= nbytes
            self._lower_requests -= 1
        try:
            await job.deliver(result)
        finally:
            self.pump()

    # --- connections and measurement ------------------------------------------------------------

    def _take_connection(self) -> None:
        self._connections += 1

    def _release_connection(self) -> None:
        self._connections -= 1
        while self._waiting and self._connections < self.config.max_connections:
            waiter = self._waiting.popleft()
            if not waiter.done():
                self._take_connection()
                waiter.set_result(None)

    async def _request(self, source: BlobSource, ranges: list[Range], work: WorkClass) -> list[bytes]:
        started = self.loop.time()
        first: list[float] = []  # when the response began, and the link model's mark then
        link = self.link

        def began() -> None:
            if not first:
                first.extend((self.loop.time(), link.transfer_began()))

        token = on_response.set(began)
        try:
            data = await source.read_ranges(ranges)
        except Exception:
            self.stats.failures += 1
            raise
        finally:
            on_response.reset(token)
            share = link.transfer_ended(first[1]) if first else 0.0
        nbytes = sum(len(d) for d in data)
        link.observe(started, first[0] if first else None, share, nbytes)
        stats = self.stats.by_class[work]
        stats.bytes += nbytes
        stats.requests += 1
        return data

    def _wake_at(self, when: float) -> None:
        if self._wakeup is not None and self._wakeup.when() <= when:
            return
        if self._wakeup is not None:
            self._wakeup.cancel()
        self._wakeup = self.loop.call_at(when, self._woken)

    def _woken(self) -> None:
        self._wakeup = None
        self.pump()

    # --- life -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Stats for the admin endpoint and metrics."""
        return {
            "rtt_ms": round(self.link.rtt * 1000, 2),
            "bandwidth_mbps": round(self.link.bandwidth * 8 / 1e6, 1),
            "piece_bytes": self.piece_bytes(),
            "in_flight_bytes": self._lower_bytes,
            "connections": self._connections,
            "on_demand_waits": self.stats.on_demand_waits,
            "bytes": {w.name_for_stats: s.bytes for w, s in self.stats.by_class.items()},
            "requests": {w.name_for_stats: s.requests for w, s in self.stats.by_class.items()},
        }

    async def close(self) -> None:
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):  # cancelled jobs end here; their feeders are told
                await task
