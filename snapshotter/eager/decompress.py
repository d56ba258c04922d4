"""A layer blob's uncompressed stream, read in order as its compressed bytes arrive, with both of
its digests computed on the way: the blob's (compressed) digest and its DiffID.

Which layers qualify (``compression_of``) and how they are decompressed follow containerd 1.6
(``images.DiffCompression``, ``archive/compression``): OCI ``tar`` is read as it is; OCI
``tar+gzip`` and ``tar+zstd`` and Docker's ``diff.tar.gzip`` and ``diff.tar`` are decompressed by
what their first bytes say (gzip, zstd, or none). gzip streams may have several members, as Go's
reader allows, and nothing after the last one; zstd streams may have several frames. Memory stays
bounded whatever the input: every read returns at most what was asked (a small piece of a
decompression bomb inflates only as far as it is read), and a zstd frame may not ask for a window
over ``MAX_ZSTD_WINDOW``.

``finish`` reads what the tar reader left (the DiffID covers the whole stream, as containerd
hashes it) and checks both digests; nothing is trusted before it returned.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Callable
from typing import IO, cast

import zstandard

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
COMPRESSIONS = {
    OCI_TAR: "none",
    OCI_TAR + "+gzip": "detect",
    OCI_TAR + "+zstd": "detect",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "detect",
    "application/vnd.docker.image.rootfs.diff.tar": "detect",
}
GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_ZSTD_WINDOW = 128 << 20  # zstd's own default limit (window log 27)
_ZSTD_READ = 128 << 10


class StreamError(Exception):
    """The blob does not decompress, or a digest does not match."""


class DigestError(StreamError):
    """The blob's digest or its DiffID is not the one the image names."""


def compression_of(media_type: str) -> str | None:
    """ "none" or "detect" for a layer media type the eager fallback unpacks, else None."""
    return COMPRESSIONS.get(media_type)


def _hasher(digest: str) -> hashlib._Hash:
    algorithm = digest.partition(":")[0]
    if algorithm not in ("sha256", "sha512"):
        raise StreamError(f"unsupported digest algorithm in {digest[:80]!r}")
    return hashlib.new(algorithm)


class _Compressed:
    """The compressed bytes, in order, hashed as they are handed out (a file-like ``read`` for
    zstandard's stream reader)."""

    def __init__(self, parts: Callable[[], bytes], digest: str) -> None:
        self._parts = parts
        self._hash = _hasher(digest)
        self._pending = b""
        self.count = 0
        self.ended = False

    def part(self) -> bytes:
        """The next piece of the stream (b"" at its end)."""
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        if self.ended:
            return b""
        data = self._parts()
        if not data:
            self.ended = True
            return b""
        self._hash.update(data)
        self.count += len(data)
        return data

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending

    def read(self, n: int = -1) -> bytes:
        data = self.part()
        if 0 <= n < len(data):
            self.unread(data[n:])
            data = data[:n]
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class LayerStream:
    """The uncompressed bytes of one layer blob. ``parts()`` returns its compressed bytes in order,
    b"" at the end. Used from one thread."""

    def __init__(self, parts: Callable[[], bytes], compression: str, digest: str, diff_id: str) -> None:
        self.digest = digest
        self.diff_id = diff_id
        self._compressed = _Compressed(parts, digest)
        self._hash = _hasher(diff_id)
        self.uncompressed_bytes = 0
        self._kind = "none" if compression == "none" else ""  # "" until the first bytes tell
        self._gzip: zlib._Decompress | None = None
        self._gzip_input = b""
        self._zstd: zstandard.ZstdDecompressionReader | None = None

    @property
    def compressed_bytes(self) -> int:
        return self._compressed.count

    def read(self, n: int) -> bytes:
        """Up to ``n`` uncompressed bytes; b"" at the end of the stream."""
        if not self._kind:
            self._kind = self._detect()
        try:
            if self._kind == "gzip":
                data = self._read_gzip(n)
            elif self._kind == "zstd":
                assert self._zstd is not None
                data = self._zstd.read(n)
            else:
                data = self._compressed.read(n)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise StreamError(f"{self.digest}: {self._kind} data is corrupt: {exc}") from None
        self._hash.update(data)
        self.uncompressed_bytes += len(data)
        return data

    def _detect(self) -> str:
        head = b""
        while len(head) < len(ZSTD_MAGIC):
            more = self._compressed.part()
            if not more:
                break
            head += more
        self._compressed.unread(head)
        if head.startswith(GZIP_MAGIC):
            return "gzip"
        if head.startswith(ZSTD_MAGIC):
            decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
            source = cast(IO[bytes], self._compressed)  # it has the one method zstandard calls: read
            self._zstd = decompressor.stream_reader(source, read_size=_ZSTD_READ, read_across_frames=True)
            return "zstd"
        return "none"

    def _read_gzip(self, n: int) -> bytes:
        """Members one after another (Go's multistream reader): after one ends, another may
        start; the stream must not end inside one."""
        while True:
            if self._gzip is None or self._gzip.eof:
                rest = self._gzip.unused_data if self._gzip is not None else b""
                if not rest and not self._gzip_input:
                    rest = self._compressed.part()
                    if not rest:
                        if self._gzip is None:
                            raise StreamError(f"{self.digest}: empty gzip stream")
                        return b""
                self._gzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._gzip_input = rest
            if not self._gzip_input:
                self._gzip_input = self._compressed.part()
                if not self._gzip_input:
                    raise StreamError(f"{self.digest}: the gzip stream ends inside a member")
            data = self._gzip.decompress(self._gzip_input, n)
            # At a member's end what is left is in unused_data (and may still be in
            # unconsumed_tail too): take it from unused_data only.
            self._gzip_input = b"" if self._gzip.eof else self._gzip.unconsumed_tail
            if data:
                return data

    def finish(self) -> None:
        """Read the rest of the stream (hashing it) and check both digests; DigestError when the
        blob or its DiffID is not the one named."""
        while self.read(1 << 20):
            pass
        if self._compressed.part():  # compressed bytes past the end of the decompressed stream
            raise StreamError(f"{self.digest}: data after the end of the compressed stream")
        algorithm = self.digest.partition(":")[0]
        got = f"{algorithm}:{self._compressed.hexdigest()}"
        if got != self.digest:
            raise DigestError(f"layer blob has digest {got}, the manifest says {self.digest}")
        got_diff = f"{self.diff_id.partition(':')[0]}:{self._hash.hexdigest()}"
        if got_diff != self.diff_id:
            raise DigestError(
                f"layer {self.digest} has DiffID {got_diff}, the image config says {self.diff_id}"
            )


class ReadAhead:
    """Runs a ``LayerStream`` in a thread of its own, up to ``depth`` reads of ``chunk`` bytes ahead
    of the consumer: decompressing and hashing (which release the GIL) overlap with unpacking.
    ``finish`` waits for the stream's end and its digest checks. Used from one consumer thread."""

    def __init__(self, stream: LayerStream, *, chunk: int = 1 << 20, depth: int = 8) -> None:
        self._stream = stream
        self._chunk = chunk
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
        self._closed = threading.Event()
        self._buffer = b""
        self._ended = False
        self._thread = threading.Thread(target=self._produce, name="lazysnap-eager-inflate", daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            while data := self._stream.read(self._chunk):
                if not self._put(data):
                    return
            self._stream.finish()
        except BaseException as exc:  # handed to the consumer
            self._put(exc)
            return
        self._put(None)

    def read(self, n: int) -> bytes:
        """Up to ``n`` uncompressed bytes; b"" at the end of the stream."""
        while not self._buffer and not self._ended:
            item = self._queue.get()
            if item is None:
                self._ended = True
            elif isinstance(item, BaseException):
                self._ended = True
                raise item
            else:
                self._buffer = item
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def finish(self) -> None:
        """Read to the end of the stream; raises what the stream raised (a digest mismatch...)."""
        while self.read(self._chunk):
            pass
        self._thread.join()

    def close(self) -> None:
        """Stop the producer (it ends at its next read or hand-over)."""
        self._closed.set()
        self._thread.join()
