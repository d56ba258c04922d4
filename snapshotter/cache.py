"""Chunk cache on disk: verified, uncompressed chunks addressed by their sha256 digest.

Owns ``ROOT/cache/``. Knows chunks, not files or layers: identical chunks of different layers and
images are stored once. Writes go to a temporary file and are renamed into place, so a reader sees
a whole chunk or none; after a restart each chunk is re-verified against its digest the first time
it is read, so bytes torn by a crash are never served. The total is bounded by ``max_bytes`` with
least-recently-used eviction. Thread-safe; all calls block (call them from worker threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")


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
        self._lru: OrderedDict[str, int] = OrderedDict()  # hex digest -> size, oldest first
        self._verified: set[str] = set()  # read back and checked since this process started
        self._total = 0
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
            self._lru[hexdigest] = size
            self._total += size
        self._evict_locked()

    @property
    def total_bytes(self) -> int:
        return self._total

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return _hex_of(digest) in self._lru

    def get(self, digest: str) -> bytes | None:
        """The chunk's bytes, or None. A chunk that fails verification is removed, not served."""
        hexdigest = _hex_of(digest)
        with self._lock:
            if hexdigest not in self._lru:
                self.misses += 1
                return None
            self._lru.move_to_end(hexdigest)
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
            verified = hexdigest in self._verified and hexdigest in self._lru
            if verified:
                self._lru.move_to_end(hexdigest)
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

    def put(self, digest: str, data: bytes) -> None:
        """Store a chunk the caller has verified against ``digest``."""
        hexdigest = _hex_of(digest)
        with self._lock:
            if hexdigest in self._lru:
                self._lru.move_to_end(hexdigest)
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
            if hexdigest not in self._lru:
                self._lru[hexdigest] = len(data)
                self._total += len(data)
            self._verified.add(hexdigest)
            self._evict_locked()

    def _forget(self, hexdigest: str, *, unlink: bool = False) -> None:
        with self._lock:
            size = self._lru.pop(hexdigest, None)
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
            before_chunks, before_bytes = len(self._lru), self._total
            self._evict_to_locked(keep_bytes)
            return before_chunks - len(self._lru), before_bytes - self._total

    def _evict_locked(self) -> None:
        if self._total <= self.max_bytes:
            return
        self._evict_to_locked(self.max_bytes * 9 // 10)  # evict in batches, not one chunk per put

    def _evict_to_locked(self, low_water: int) -> None:
        while self._lru and self._total > low_water:
            hexdigest, size = self._lru.popitem(last=False)
            self._total -= size
            self._verified.discard(hexdigest)
            self.evictions += 1
            with contextlib.suppress(FileNotFoundError):
                self._path(hexdigest).unlink()
