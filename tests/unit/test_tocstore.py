"""Stored TOCs: round trip, and a damaged store is discarded rather than trusted."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.formats import TocLocation
from snapshotter.formats.index import Compression
from snapshotter.tocstore import StoredToc, TocStore

DIGEST = "sha256:" + "a" * 64


def sample() -> StoredToc:
    location = TocLocation("estargz", Compression.GZIP, offset=1000, length=200, footer_size=51)
    return StoredToc(
        "127.0.0.1:5000/app:1", 1251, "sha256:" + "b" * 64, "stargz", location, b"\x1f\x8b" + b"x" * 198
    )


def test_round_trip(tmp_path: Path) -> None:
    store = TocStore(tmp_path)
    store.save(DIGEST, sample())
    assert TocStore(tmp_path).load(DIGEST) == sample()
    store.remove(DIGEST)
    assert store.load(DIGEST) is None


def test_damaged_metadata_is_discarded(tmp_path: Path) -> None:
    store = TocStore(tmp_path)
    store.save(DIGEST, sample())
    (tmp_path / f"{DIGEST.replace(':', '-')}.json").write_text('{"reference": 1')
    assert store.load(DIGEST) is None
    assert list(tmp_path.iterdir()) == []


def test_a_stored_toc_of_the_previous_layout_still_loads(tmp_path: Path) -> None:
    """Roots written before the format registry named formats "stargz"/"nydus" the same way."""
    store = TocStore(tmp_path)
    stem = DIGEST.replace(":", "-")
    (tmp_path / f"{stem}.toc").write_bytes(sample().raw)
    (tmp_path / f"{stem}.json").write_text(
        '{"reference": "127.0.0.1:5000/app:1", "blob_size": 1251, "expected_digest": "sha256:'
        + "b" * 64
        + '", "format": "stargz", "location": {"format": "estargz", "compression": "gzip", '
        '"offset": 1000, "length": 200, "footer_size": 51, "uncompressed_length": null}}'
    )
    assert store.load(DIGEST) == sample()
    assert list(store.digests()) == [DIGEST]


def test_a_digest_that_is_not_one_never_becomes_a_path(tmp_path: Path) -> None:
    """A layer-digest label is untrusted: '..', absolute paths and odd algorithms are refused."""
    store = TocStore(tmp_path / "layers")
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    for bad in (
        "sha256:../../victim",
        "/tmp/x",
        "sha256:" + "A" * 64,
        "md5:" + "a" * 32,
        "sha256:" + "a" * 63,
    ):
        assert not store.has(bad)
        assert store.load(bad) is None
        store.remove(bad)
        with pytest.raises(ValueError):
            store.save(bad, sample())
    assert victim.exists()
    assert list((tmp_path / "layers").iterdir()) == []
