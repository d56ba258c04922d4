"""Blobs for blob-server tests: deterministic content of any size, and sources that fail or stall."""

from __future__ import annotations

import errno
import hashlib
import threading
from collections.abc import Callable

BLOCK = 4096


def blob_name(label: str) -> str:
    """A valid blob file name derived from ``label``."""
    return "sha256-" + hashlib.sha256(label.encode()).hexdigest()


def _block(salt: bytes, index: int) -> bytes:
    # Every 4 KiB block differs from every other (and between salts): a misplaced range shows.
    return hashlib.sha256(salt + index.to_bytes(8, "little")).digest() * (BLOCK // 32)


def pattern(salt: bytes, offset: int, size: int) -> bytes:
    """Bytes [offset, offset + size) of the endless pattern named by ``salt``."""
    if size <= 0:
        return b""
    first, last = offset // BLOCK, (offset + size - 1) // BLOCK
    data = b"".join(_block(salt, i) for i in range(first, last + 1))
    start = offset - first * BLOCK
    return data[start : start + size]


class PatternSource:
    """A blob of ``size`` bytes of ``pattern(salt)``; records each read's (offset, size).

    ``fail(offset, size)`` returning True makes that read raise EIO; ``gate`` (cleared) makes reads
    for which ``stall(offset, size)`` is True wait until it is set; ``entered`` is set when such a
    read has begun waiting.
    """

    def __init__(
        self,
        salt: bytes,
        size: int,
        *,
        fail: Callable[[int, int], bool] | None = None,
        stall: Callable[[int, int], bool] | None = None,
    ) -> None:
        self.salt = salt
        self._size = size
        self.fail = fail
        self.stall = stall
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.reads: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            self.reads.append((offset, size))
        if self.stall is not None and self.stall(offset, size):
            self.entered.set()
            self.gate.wait()
        if self.fail is not None and self.fail(offset, size):
            raise OSError(errno.EIO, f"chunk at {offset} failed verification")
        return pattern(self.salt, offset, size)

    def read_sizes(self) -> list[int]:
        with self._lock:
            return [size for _, size in self.reads]
