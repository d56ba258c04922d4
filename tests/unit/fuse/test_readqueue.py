"""The READ queue: fair over blobs, bounded per blob and in total, cancellable, closable."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from snapshotter.fuse.readqueue import ReadQueue


@dataclass(eq=False)
class Job:
    key: int
    unique: int


def test_blobs_take_turns() -> None:
    q: ReadQueue[Job] = ReadQueue(per_blob=10, limit=100)
    for unique in range(3):
        q.put(Job(1, unique))
    q.put(Job(2, 10))
    q.put(Job(3, 20))
    order = []
    for _ in range(5):
        job = q.get()
        assert job is not None
        order.append(job.unique)
    assert order == [0, 10, 20, 1, 2]


def test_a_blob_runs_at_most_per_blob_jobs_while_others_proceed() -> None:
    q: ReadQueue[Job] = ReadQueue(per_blob=2, limit=100)
    for unique in range(4):
        q.put(Job(1, unique))
    first, second = q.get(), q.get()
    assert first is not None and second is not None
    q.put(Job(2, 99))
    third = q.get()
    assert third is not None and third.unique == 99  # blob 1 is at its limit
    q.done(first)
    fourth = q.get()
    assert fourth is not None and fourth.unique == 2


def test_a_waiting_job_can_be_cancelled_once() -> None:
    q: ReadQueue[Job] = ReadQueue(per_blob=1, limit=100)
    running = Job(1, 1)
    q.put(running)
    q.put(Job(1, 2))
    assert q.get() is running
    assert q.cancel(1) is None  # started: too late
    cancelled = q.cancel(2)
    assert cancelled is not None and cancelled.unique == 2
    assert q.cancel(2) is None and len(q) == 0


def test_put_waits_while_the_queue_is_full() -> None:
    q: ReadQueue[Job] = ReadQueue(per_blob=1, limit=2)
    q.put(Job(1, 1))
    q.put(Job(2, 2))
    done = threading.Event()
    t = threading.Thread(target=lambda: (q.put(Job(3, 3)), done.set()))
    t.start()
    assert not done.wait(0.2)  # full: the producer waits
    assert q.get() is not None
    t.join(10)
    assert done.is_set() and len(q) == 2


def test_closing_drains_or_discards() -> None:
    q: ReadQueue[Job] = ReadQueue(per_blob=4, limit=10)
    q.put(Job(1, 1))
    q.put(Job(1, 2))
    assert q.close(discard=False) == []
    assert not q.put(Job(1, 3))
    drained = [q.get(), q.get(), q.get()]
    assert [j.unique if j else None for j in drained] == [1, 2, None]

    q2: ReadQueue[Job] = ReadQueue(per_blob=4, limit=10)
    q2.put(Job(1, 1))
    assert [j.unique for j in q2.close(discard=True)] == [1]
    assert q2.get() is None


def test_a_closed_queue_wakes_every_idle_worker() -> None:
    q: ReadQueue[Job] = ReadQueue(per_blob=1, limit=10)
    results: list[Job | None] = []
    workers = [threading.Thread(target=lambda: results.append(q.get())) for _ in range(4)]
    for w in workers:
        w.start()
    q.close(discard=True)
    for w in workers:
        w.join(10)
    assert results == [None] * 4
