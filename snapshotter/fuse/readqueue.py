"""The queue between the threads that read FUSE requests and the workers that answer READs.

Owns fairness and bounds: jobs wait per blob and are taken round-robin over blobs; at most
``per_blob`` jobs of one blob run at once, so a blob whose fetches stall cannot take every worker
from the others; at most ``limit`` jobs wait, beyond which ``put`` blocks (the requests then stay
queued in the kernel, and memory stays bounded). A job that has not started can be cancelled.
"""

from __future__ import annotations

import collections
import threading
from typing import Generic, Protocol, TypeVar


class Job(Protocol):
    @property
    def key(self) -> int: ...  # the blob it reads

    @property
    def unique(self) -> int: ...  # the FUSE request it answers


J = TypeVar("J", bound=Job)


class ReadQueue(Generic[J]):
    """See the module docstring. ``get`` returns None once the queue is closed and drained."""

    def __init__(self, per_blob: int, limit: int) -> None:
        self._per_blob = max(1, per_blob)
        self._limit = max(1, limit)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._space = threading.Condition(self._lock)
        self._waiting: dict[int, collections.deque[J]] = {}
        self._turns: collections.deque[int] = collections.deque()  # keys with waiting jobs
        self._running: collections.Counter[int] = collections.Counter()
        self._by_unique: dict[int, J] = {}
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_unique)

    def put(self, job: J) -> bool:
        """Queue ``job``, waiting while ``limit`` jobs wait; False once closed."""
        with self._lock:
            while len(self._by_unique) >= self._limit and not self._closed:
                self._space.wait()
            if self._closed:
                return False
            if job.key not in self._waiting:
                self._waiting[job.key] = collections.deque()
                self._turns.append(job.key)
            self._waiting[job.key].append(job)
            self._by_unique[job.unique] = job
            self._work.notify()
            return True

    def get(self) -> J | None:
        """The next job to run (call ``done`` after it), or None once closed with nothing left."""
        with self._lock:
            while True:
                job = self._pick()
                if job is not None:
                    return job
                if self._closed and not self._by_unique:
                    return None
                self._work.wait()

    def _pick(self) -> J | None:
        for _ in range(len(self._turns)):
            key = self._turns[0]
            self._turns.rotate(-1)
            if self._running[key] >= self._per_blob:
                continue
            job = self._waiting[key].popleft()
            self._forget(job)
            self._running[key] += 1
            return job
        return None

    def _forget(self, job: J) -> None:
        del self._by_unique[job.unique]
        if not self._waiting[job.key]:
            del self._waiting[job.key]
            self._turns.remove(job.key)
        self._space.notify()

    def done(self, job: J) -> None:
        with self._lock:
            self._running[job.key] -= 1
            if self._running[job.key] <= 0:
                del self._running[job.key]
            self._work.notify()

    def cancel(self, unique: int) -> J | None:
        """Take a job that has not started out of the queue."""
        with self._lock:
            job = self._by_unique.get(unique)
            if job is not None:
                self._waiting[job.key].remove(job)
                self._forget(job)
            return job

    def close(self, *, discard: bool) -> list[J]:
        """Accept no more jobs; with ``discard`` drop (and return) those waiting."""
        with self._lock:
            self._closed = True
            dropped: list[J] = []
            if discard:
                dropped = list(self._by_unique.values())
                self._by_unique.clear()
                self._waiting.clear()
                self._turns.clear()
            self._work.notify_all()
            self._space.notify_all()
            return dropped
