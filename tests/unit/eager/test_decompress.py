"""A layer blob's uncompressed stream: gzip (several members), zstd (several frames), plain tar,
both digests checked, every read bounded, memory bounded whatever the compression ratio."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable

import pytest
import zstandard

from snapshotter.eager.decompress import DigestError, LayerStream, StreamError, compression_of
from tests.support.memory import peak_growth


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parts(blob: bytes, size: int = 1000) -> Callable[[], bytes]:
    pieces = iter([blob[i : i + size] for i in range(0, len(blob), size)])
    return lambda: next(pieces, b"")


def read_all(stream: LayerStream, n: int = 4096) -> bytes:
    out = bytearray()
    while chunk := stream.read(n):
        assert len(chunk) <= n
        out += chunk
    return bytes(out)


RAW = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(4000)) + bytes(100_000)


@pytest.mark.parametrize(
    ("media_type", "encode"),
    [
        ("application/vnd.oci.image.layer.v1.tar+gzip", lambda raw: gzip.compress(raw)),
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            lambda raw: b"".join(gzip.compress(raw[i : i + 7000]) for i in range(0, len(raw), 7000)),
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            lambda raw: b"".join(
                zstandard.ZstdCompressor().compress(raw[i : i + 9000]) for i in range(0, len(raw), 9000)
            ),
        ),
        ("application/vnd.oci.image.layer.v1.tar", lambda raw: raw),
        ("application/vnd.docker.image.rootfs.diff.tar", lambda raw: gzip.compress(raw)),  # detected
        ("application/vnd.oci.image.layer.v1.tar+gzip", lambda raw: raw),  # containerd detects: none
    ],
    ids=["gzip", "gzip-members", "zstd-frames", "tar", "docker-detect", "mislabeled-plain"],
)
def test_streams_decompress_and_verify(media_type: str, encode: Callable[[bytes], bytes]) -> None:
    blob = encode(RAW)
    compression = compression_of(media_type)
    assert compression is not None
    stream = LayerStream(parts(blob), compression, digest(blob), digest(RAW))
    assert read_all(stream) == RAW
    stream.finish()
    assert stream.compressed_bytes == len(blob) and stream.uncompressed_bytes == len(RAW)


def test_other_media_types_are_not_taken() -> None:
    assert compression_of("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip") is None
    assert compression_of("application/vnd.oci.image.layer.v1.tar+gzip+encrypted") is None


def test_digest_and_diff_id_mismatches() -> None:
    blob = gzip.compress(RAW)
    stream = LayerStream(parts(blob), "detect", digest(b"other"), digest(RAW))
    read_all(stream)
    with pytest.raises(DigestError, match="layer blob has digest"):
        stream.finish()
    stream = LayerStream(parts(blob), "detect", digest(blob), digest(b"other"))
    with pytest.raises(DigestError, match="DiffID"):
        stream.finish()  # finish reads what was not read yet: the DiffID covers all of it


@pytest.mark.parametrize(
    "blob",
    [gzip.compress(RAW)[:-100], gzip.compress(RAW) + b"junk", gzip.compress(RAW) + bytes(1024)],
    ids=["truncated", "trailing-junk", "trailing-zeros"],
)
def test_corrupt_gzip_is_refused(blob: bytes) -> None:
    stream = LayerStream(parts(blob), "detect", digest(blob), digest(RAW))
    with pytest.raises(StreamError):
        read_all(stream)
        stream.finish()


def test_trailing_data_after_a_zstd_stream_is_refused() -> None:
    blob = zstandard.ZstdCompressor().compress(RAW) + b"junk"
    stream = LayerStream(parts(blob), "detect", digest(blob), digest(RAW))
    with pytest.raises(StreamError):
        read_all(stream)
        stream.finish()


def test_memory_stays_bounded_for_a_decompression_bomb() -> None:
    """512 MiB of zeros in one tar entry, gzip members of 1 MiB each (about 1 KiB compressed):
    streaming it through the tar reader costs a few MiB, not the layer."""
    setup = """
import gzip, io, tarfile, hashlib
from snapshotter.eager.decompress import LayerStream
from snapshotter.eager.tarreader import TarReader
size = 512 << 20
info = tarfile.TarInfo("zeros"); info.size = size
header = info.tobuf(format=tarfile.PAX_FORMAT)
member = gzip.compress(bytes(1 << 20))
blob_parts = [gzip.compress(header)] + [member] * (size >> 20) + [gzip.compress(bytes(1024))]
h = hashlib.sha256()
for p in blob_parts: h.update(p)
d = hashlib.sha256(header)
zero = bytes(1 << 20)
for _ in range(size >> 20): d.update(zero)
d.update(bytes(1024))
blob_digest, diff_id = "sha256:" + h.hexdigest(), "sha256:" + d.hexdigest()
del zero
"""
    measured = """
it = iter(blob_parts)
stream = LayerStream(lambda: next(it, b""), "detect", blob_digest, diff_id)
tar = TarReader(stream.read)
entry = tar.next()
total = 0
while chunk := tar.read(1 << 20):
    total += len(chunk)
assert tar.next() is None
stream.finish()
result = total
"""
    measured_run = peak_growth(setup, measured)
    assert measured_run.error is None, measured_run.error
    assert measured_run.result == 512 << 20
    assert measured_run.growth_mib < 24, measured_run.growth_mib


def test_reads_are_bounded_by_what_is_asked() -> None:
    """32 MiB of zeros arrive as one 1 MiB piece of gzip; no read returns more than asked."""
    blob = gzip.compress(bytes(32 << 20))
    stream = LayerStream(parts(blob, 1 << 20), "detect", digest(blob), digest(bytes(32 << 20)))
    first = stream.read(1000)
    assert len(first) == 1000
    assert len(first) + len(read_all(stream, 65536)) == 32 << 20  # read_all checks every read
    stream.finish()
