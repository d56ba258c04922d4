"""The fetch scheduler on a simulated link, in virtual time: deterministic, and as fast as the
arithmetic. A link is RTT seconds to the first byte, then bandwidth shared by the transfers in
flight (tests/support/simlink.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from snapshotter.scheduler import (
    FetchScheduler,
    Job,
    RestPolicy,
    SchedulerConfig,
    WorkClass,
)
from tests.support.simlink import SimBlob, SimLink, pattern, virtual_time

MiB = 1 << 20


@dataclass
class BulkFeeder:
    """Offers ``size`` bytes of one blob in pieces of class ``work``, front to back."""

    blob: SimBlob
    size: int
    work: WorkClass
    position: int = 0
    delivered: int = 0
    jobs: list[tuple[float, int]] = field(default_factory=list)  # (start time, bytes)
    errors: list[BaseException] = field(default_factory=list)
    finished_at: float = -1.0
    clock: Callable[[], float] = lambda: 0.0

    def next_job(self, work: WorkClass, max_bytes: int) -> Job | None:
        if work is not self.work or self.position >= self.size:
            return None
        start, end = self.position, min(self.size, self.position + max_bytes)
        self.position = end
        self.jobs.append((self.clock(), end - start))

        async def deliver(result: list[bytes] | BaseException) -> None:
            if isinstance(result, BaseException):
                self.errors.append(result)
                return
            assert result == [pattern(start, end)]
            self.delivered += end - start
            if self.delivered >= self.size:
                self.finished_at = self.clock()

        return Job(self.blob, [(start, end)], work, deliver)


def run(coro: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    with virtual_time() as loop:
        loop.run_until_complete(coro(loop))


def feeder(loop: asyncio.AbstractEventLoop, link: SimLink, size: int, work: WorkClass) -> BulkFeeder:
    return BulkFeeder(SimBlob(link, size), size, work, clock=loop.time)


async def wait_for(
    loop: asyncio.AbstractEventLoop, condition: Callable[[], bool], limit: float = 3600
) -> None:
    deadline = loop.time() + limit
    while not condition():
        assert loop.time() < deadline, "condition never held (in virtual time)"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize(
    ("rtt", "bandwidth"), [(0.010, 125e6), (0.040, 12.5e6), (0.150, 125e6)], ids=["cloud", "slow", "far"]
)
def test_the_rest_of_an_image_arrives_at_link_speed_and_the_link_is_measured(
    rtt: float, bandwidth: float
) -> None:
    """Never slower than a full pull: a bulk transfer keeps the link full once it is measured."""

    async def main(loop: asyncio.AbstractEventLoop) -> None:
        link = SimLink(loop, rtt, bandwidth)
        sched = FetchScheduler(loop)
        size = int(bandwidth * 4)  # four seconds of link
        bulk = feeder(loop, link, size, WorkClass.REST)
        sched.add_feeder(bulk)
        await wait_for(loop, lambda: bulk.finished_at >= 0)
        ideal = rtt + size / bandwidth  # one request for everything, on a link nobody else uses
        assert bulk.finished_at <= ideal * 1.15, (bulk.finished_at, ideal)
        assert sched.link.rtt == pytest.approx(rtt, rel=0.1)
        assert sched.link.bandwidth == pytest.approx(bandwidth, rel=0.15)
        await sched.close()

    run(main)


def test_a_burst_of_misses_under_bulk_load_is_served_without_queueing() -> None:
    """Each miss of a startup burst takes one round trip plus its own bytes and what was in flight
    when it came, never more; the bulk transfer goes on meanwhile (the link is never idle)."""
    rtt, bandwidth = 0.050, 125e6

    async def main(loop: asyncio.AbstractEventLoop) -> None:
        link = SimLink(loop, rtt, bandwidth)
        sched = FetchScheduler(loop)
        bulk = feeder(loop, link, int(bandwidth * 20), WorkClass.REST)
        sched.add_feeder(bulk)
        await asyncio.sleep(2.0)  # the link is measured and full
        blob = SimBlob(link, 1 << 30)
        delivered_before, burst_start = bulk.delivered, loop.time()
        for i, size in enumerate([4 << 10, 64 << 10, 1 * MiB, 4 * MiB] * 5):  # serial, as a startup
            in_flight = sched._lower_bytes + sched._on_demand_bytes  # what the miss shares the link with
            started = loop.time()
            data = await sched.fetch(blob, [(i * 8 * MiB, i * 8 * MiB + size)])
            took = loop.time() - started
            assert data == [pattern(i * 8 * MiB, i * 8 * MiB + size)]
            # A miss shares the link with what is in flight, never more than the budget holds.
            assert took <= rtt + (size + sched.target_in_flight()) / bandwidth, (i, size, took)
            assert in_flight <= sched.target_in_flight()
        burst = loop.time() - burst_start
        # The link stayed busy: the bulk got most of what the misses left of the link.
        misses = sum([4 << 10, 64 << 10, 1 * MiB, 4 * MiB]) * 5
        assert (bulk.delivered - delivered_before) + misses >= 0.7 * bandwidth * burst
        assert sched.stats.on_demand_waits == 0  # a miss never waited for a connection
        await sched.close()

    run(main)


def test_lower_classes_go_in_order_and_leave_connections_for_misses() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        link = SimLink(loop, 0.020, 50e6)
        config = SchedulerConfig(max_connections=6, reserved_for_on_demand=2)
        sched = FetchScheduler(loop, config)
        startup, stream, rest = (feeder(loop, link, 8 * MiB, w) for w in LOWER)
        for f in (startup, stream, rest):
            sched.add_feeder(f)
        peak = 0
        while rest.finished_at < 0:
            peak = max(peak, sched._connections)
            await asyncio.sleep(0.005)
        assert peak <= 4  # two connections are kept for misses
        # Each class starts only once the one above has nothing more to start.
        assert startup.jobs[-1][0] <= stream.jobs[0][0]
        assert stream.jobs[-1][0] <= rest.jobs[0][0]
        await sched.close()

    run(main)


LOWER = (WorkClass.STARTUP, WorkClass.STREAM, WorkClass.REST)


def test_rest_policies_and_the_rate_cap() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        link = SimLink(loop, 0.010, 100e6)
        off = FetchScheduler(loop, SchedulerConfig(rest=RestPolicy.OFF))
        nothing = feeder(loop, link, 4 * MiB, WorkClass.REST)
        startup = feeder(loop, link, 4 * MiB, WorkClass.STARTUP)
        off.add_feeder(nothing)
        off.add_feeder(startup)
        await wait_for(loop, lambda: startup.finished_at >= 0)
        await asyncio.sleep(1)
        assert nothing.jobs == []  # "off": the rest of the image is never fetched
        await off.close()

        idle = FetchScheduler(loop, SchedulerConfig(rest=RestPolicy.IDLE_ONLY, idle_seconds=0.5))
        blob = SimBlob(link, 1 << 30)
        later = feeder(loop, link, 4 * MiB, WorkClass.REST)
        idle.add_feeder(later)
        last_miss = 0.0
        for i in range(10):  # misses every 0.2 s: never idle for 0.5 s
            await idle.fetch(blob, [(i << 20, (i << 20) + 4096)])
            last_miss = loop.time()
            await asyncio.sleep(0.2)
        assert later.jobs == []
        await wait_for(loop, lambda: later.finished_at >= 0)
        assert later.jobs[0][0] >= last_miss + 0.5
        await idle.close()

        rate = 10e6
        capped = FetchScheduler(loop, SchedulerConfig(rate_bytes=int(rate)))
        bulk = feeder(loop, link, 20 * MiB, WorkClass.REST)
        started = loop.time()
        capped.add_feeder(bulk)
        await wait_for(loop, lambda: bulk.finished_at >= 0)
        assert bulk.finished_at - started >= (20 * MiB - capped.piece_bytes()) / rate  # the cap holds
        await capped.close()

    run(main)


def test_a_failing_registry_fails_the_jobs_and_the_scheduler_goes_on() -> None:
    class Broken(SimBlob):
        async def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
            await self.link.transfer(0)
            raise OSError("registry unreachable")

    async def main(loop: asyncio.AbstractEventLoop) -> None:
        link = SimLink(loop, 0.010, 100e6)
        sched = FetchScheduler(loop)
        broken = BulkFeeder(Broken(link, 1 * MiB), 1 * MiB, WorkClass.STARTUP, clock=loop.time)
        good = feeder(loop, link, 1 * MiB, WorkClass.REST)
        sched.add_feeder(broken)
        sched.add_feeder(good)
        await wait_for(loop, lambda: good.finished_at >= 0)
        assert broken.errors and all("unreachable" in str(e) for e in broken.errors)
        with pytest.raises(OSError, match="unreachable"):
            await sched.fetch(Broken(link, 1 * MiB), [(0, 10)])
        assert sched.stats.failures >= 2
        await sched.close()

    run(main)
