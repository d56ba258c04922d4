"""Chunk cache on disk: verified, uncompressed chunks addressed by their sha256 digest.

Owns ``ROOT/cache/``. Knows chunks, not files or layers: identical chunks of different layers and
images are stored once. Writes go to a temporary file and are renamed into place, so a reader sees
a whole chunk or none; after a restart each chunk is re-verified against its digest the first time
it is read, so bytes torn by a crash are never served. Thread-safe; all calls block (call them from
worker threads).

The total is bounded by ``max_bytes``. When it is over, chunks go in this order, each group oldest
first: chunks of layers no longer mounted (``release``), then chunks fetched ahead that nobody has
read yet (``put(..., speculative=True)``), then chunks that were read, least recently read first.
Fetching ahead is admitted only while it can stay (``reserve_ahead``): it never pushes out a chunk that
was read to make room for one that was not, which on a cache smaller than the images would turn
into fetching the same chunks again and again; and once reads had to push out a chunk fetched
ahead before anyone read it, none is admitted for a while. A chunk being read stays readable to its reader
even if evicted meanwhile (its file is open).

Local data blobs (layers kept whole on disk, ``ErofsLayers.assemble``) live outside this directory
but count against the same ``max_bytes`` (``set_local_bytes``); they may take at most half of it
(``room_for_local``), so chunks always keep the other half.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")
AHEAD_BACKOFF_SECONDS = 300.0


def _hex_of(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not set(hexpart) <= _HEX:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hexpart


class ChunkCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.dir = root
        self.max_bytes = max_bytes
        self._chunks = self.dir / "chunks"
        self._tmp = self.dir / "tmp"
        self._chunks.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Eviction classes, each hex digest -> size, oldest first; a chunk is in exactly one.
        self._released: OrderedDict[str, int] = OrderedDict()  # of layers no longer mounted
        self._speculative: OrderedDict[str, int] = OrderedDict()  # fetched ahead, not read yet
        self._lru: OrderedDict[str, int] = OrderedDict()  # read, least recently first
        self._released_bytes = 0  # what ``_released`` holds (asked on every fetch ahead)
        # When a chunk fetched ahead was evicted before anyone read it: fetching ahead into this
        # cache wastes the link for a while (reads are pushing it out), so none is admitted then.
        self._ahead_wasted_at = -AHEAD_BACKOFF_SECONDS
        self._reserved = 0  # bytes being fetched ahead, promised room
        self._verified: set[str] = set()  # read back and checked since this process started
        self._total = 0
        self._local = 0  # bytes of local data blobs, counted against max_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._load()

    def _path(self, hexdigest: str) -> Path:
        return self._chunks / hexdigest[:2] / hexdigest

    def _load(self) -> None:
        """Rebuild the LRU from disk, oldest modification first; drop torn temporaries."""
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
        found: list[tuple[float, str, int]] = []
        for sub in self._chunks.iterdir():
            for entry in sub.iterdir():
                st = entry.stat()
                found.append((st.st_mtime, entry.name, st.st_size))
        for _, hexdigest, size in sorted(found):
            self._released[hexdigest] = size  # until a mounted layer reads it again
            self._released_bytes += size
            self._total += size
        self._evict_locked()

    @property
    def total_bytes(self) -> int:
        return self._total

    @property
    def local_bytes(self) -> int:
        return self._local

    def room_for_local(self, nbytes: int) -> bool:
        """Whether a local data blob of ``nbytes`` more may be kept: local blobs take at most half
        of ``max_bytes``."""
        with self._lock:
            return self._local + nbytes <= self.max_bytes // 2

    def set_local_bytes(self, nbytes: int) -> None:
        """What local data blobs take on disk now; chunks are evicted to make room for them."""
        with self._lock:
            self._local = max(0, nbytes)
            self._evict_locked()

    def _class_of(self, hexdigest: str) -> OrderedDict[str, int] | None:
        for group in (self._lru, self._speculative, self._released):
            if hexdigest in group:
                return group
        return None

    def _touch_locked(self, hexdigest: str) -> bool:
        """Mark a chunk as read now (most recently used); False if it is not cached."""
        group = self._class_of(hexdigest)
        if group is None:
            return False
        size = self._pop_locked(group, hexdigest)
        self._lru[hexdigest] = size
        return True

    def _pop_locked(self, group: OrderedDict[str, int], hexdigest: str) -> int:
        size = group.pop(hexdigest)
        if group is self._released:
            self._released_bytes -= size
        return size

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return self._class_of(_hex_of(digest)) is not None

    def reserve_ahead(self, nbytes: int) -> bool:
        """Room for ``nbytes`` about to be fetched ahead, if they can be stored without evicting
        any chunk that was read or fetched ahead earlier (only free space and chunks of unmounted
        layers count, less what other fetches ahead reserved); give it back with
        ``unreserve_ahead`` once they are stored (or failed)."""
        with self._lock:
            if time.monotonic() - self._ahead_wasted_at < AHEAD_BACKOFF_SECONDS:
                return False
            if self._local + self._total - self._released_bytes + self._reserved + nbytes > self.max_bytes:
                return False
            self._reserved += nbytes
            return True

    def unreserve_ahead(self, nbytes: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - nbytes)

    def release(self, digests: list[str]) -> None:
        """These chunks' layer is no longer mounted: evict them before any other."""
        with self._lock:
            for digest in digests:
                hexdigest = _hex_of(digest)
                group = self._class_of(hexdigest)
                if group is not None and group is not self._released:
                    size = self._pop_locked(group, hexdigest)
                    self._released[hexdigest] = size
                    self._released_bytes += size

    def class_bytes(self) -> dict[str, int]:
        with self._lock:
            return {
                "read": sum(self._lru.values()),
                "ahead": sum(self._speculative.values()),
                "released": self._released_bytes,
            }

    def get(self, digest: str) -> bytes | None:
        """The chunk's bytes, or None. A chunk that fails verification is removed, not served."""
        hexdigest = _hex_of(digest)
        with self._lock:
            if not self._touch_locked(hexdigest):
                self.misses += 1
                return None
            verified = hexdigest in self._verified
        try:
            data = self._path(hexdigest).read_bytes()
        except FileNotFoundError:
            self._forget(hexdigest)
            self.misses += 1
            return None
        if not verified:
            if hashlib.sha256(data).hexdigest() != hexdigest:
                log.warning("dropping corrupt cached chunk", extra={"digest": digest})
                self._forget(hexdigest, unlink=True)
                self.misses += 1
                return None
            with self._lock:
                self._verified.add(hexdigest)
        self.hits += 1
        return data

    def read_range(self, digest: str, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of a cached chunk, reading only those once the chunk is verified."""
        hexdigest = _hex_of(digest)
        with self._lock:
            verified = hexdigest in self._verified and self._touch_locked(hexdigest)
        if not verified:
            whole = self.get(digest)
            return None if whole is None else whole[start:end]
        try:
            with open(self._path(hexdigest), "rb", buffering=0) as fh:
                data = os.pread(fh.fileno(), end - start, start)
        except FileNotFoundError:  # evicted meanwhile
            self._forget(hexdigest)
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, digest: str, data: bytes, *, speculative: bool = False) -> None:
        """Store a chunk the caller has verified against ``digest``; ``speculative``: fetched
        ahead of any reader (it becomes a read chunk when first read)."""
        hexdigest = _hex_of(digest)
        with self._lock:
            if self._class_of(hexdigest) is not None:
                if not speculative:
                    self._touch_locked(hexdigest)
                return
        target = self._path(hexdigest)
        tmp = self._tmp / f"{hexdigest}.{threading.get_ident()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            try:
                os.replace(tmp, target)
            except FileNotFoundError:  # its fan-out directory is made on first use
                target.parent.mkdir(exist_ok=True)
                os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            if self._class_of(hexdigest) is None:
                (self._speculative if speculative else self._lru)[hexdigest] = len(data)
                self._total += len(data)
            self._verified.add(hexdigest)
            self._evict_locked(keep=hexdigest)

    def _forget(self, hexdigest: str, *, unlink: bool = False) -> None:
        with self._lock:
            group = self._class_of(hexdigest)
            size = None if group is None else self._pop_locked(group, hexdigest)
            if size is not None:
                self._total -= size
            self._verified.discard(hexdigest)
        if unlink:
            self._path(hexdigest).unlink(missing_ok=True)

    def prune(self, keep_bytes: int = 0) -> tuple[int, int]:
        """Evict least recently used chunks until at most ``keep_bytes`` remain (operators: free
        disk now). Returns (chunks, bytes) removed. A chunk being read stays readable to that
        reader (its file is open); later reads fetch it again."""
        with self._lock:
            before_chunks, before_bytes = self._count_locked(), self._total
            self._evict_to_locked(keep_bytes)
            return before_chunks - self._count_locked(), before_bytes - self._total

    def _count_locked(self) -> int:
        return len(self._lru) + len(self._speculative) + len(self._released)

    def _evict_locked(self, keep: str = "") -> None:
        if self._local + self._total <= self.max_bytes:
            return
        # In batches, not one chunk per put.
        self._evict_to_locked(max(0, self.max_bytes * 9 // 10 - self._local), keep)

    def _evict_to_locked(self, low_water: int, keep: str = "") -> None:
        """Evict, in eviction order, until at most ``low_water`` bytes remain; never ``keep`` (the
        chunk just stored: its reader reads it next, even from a cache smaller than one chunk)."""
        for group in (self._released, self._speculative, self._lru):
            for hexdigest in list(group):
                if self._total <= low_water:
                    return
                if hexdigest == keep:
                    continue
                if group is self._speculative:
                    self._ahead_wasted_at = time.monotonic()
                self._total -= self._pop_locked(group, hexdigest)
                self._verified.discard(hexdigest)
                self.evictions += 1
                with contextlib.suppress(FileNotFoundError):
                    self._path(hexdigest).unlink()
