"""Stored TOCs: round trip, and a damaged store is discarded rather than trusted."""

from __future__ import annotations

from pathlib import Path

from snapshotter.formats import TocLocation
from snapshotter.formats.index import Compression
from snapshotter.tocstore import StoredToc, TocStore

DIGEST = "sha256:" + "a" * 64


def sample() -> StoredToc:
    location = TocLocation("estargz", Compression.GZIP, offset=1000, length=200, footer_size=51)
    return StoredToc("127.0.0.1:5000/app:1", 1251, "sha256:" + "b" * 64, location, b"\x1f\x8b" + b"x" * 198)


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
