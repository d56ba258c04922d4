"""The chunk cache's eviction order under pressure (issue 15): chunks of unmounted layers first,
then chunks fetched ahead and never read, then read chunks least recently read first; and
fetching ahead is admitted only while it can stay."""

from __future__ import annotations

import hashlib
from pathlib import Path

from snapshotter.cache import ChunkCache


def chunk(tag: str, size: int = 1000) -> tuple[str, bytes]:
    data = tag.encode().ljust(size, b".")
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def test_eviction_order_released_then_ahead_then_least_recently_read(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 10_000)
    read = [chunk(f"read{i}") for i in range(4)]
    ahead = [chunk(f"ahead{i}") for i in range(3)]
    old_layer = [chunk(f"old{i}") for i in range(2)]
    for digest, data in read + old_layer:
        cache.put(digest, data)
    for digest, data in ahead:
        cache.put(digest, data, speculative=True)
    cache.release([d for d, _ in old_layer])
    assert cache.get(read[0][0]) == read[0][1]  # read0 is now the most recently read
    assert cache.class_bytes() == {"read": 4000, "ahead": 3000, "released": 2000}
    cache.put(*chunk("new1"))  # 10,000 bytes: at the bound
    cache.put(*chunk("new2"))  # over: evict down to 90%, the released layer's chunks first
    assert all(d not in cache for d, _ in old_layer)
    assert all(d in cache for d, _ in ahead + read)
    cache.put(*chunk("new3"))
    cache.put(*chunk("new4"))  # over again: then the oldest chunks fetched ahead
    assert ahead[0][0] not in cache and ahead[1][0] not in cache and ahead[2][0] in cache
    assert all(d in cache for d, _ in read)
    cache.prune(5000)  # operators: ahead goes before anything read, then the least recently read
    assert all(d not in cache for d, _ in ahead)
    assert read[0][0] in cache and all(d not in cache for d, _ in read[1:])  # read0 was read last


def test_a_chunk_fetched_ahead_becomes_a_read_chunk_when_read(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 10_000)
    digest, data = chunk("ahead")
    cache.put(digest, data, speculative=True)
    assert cache.read_range(digest, 0, 5) == data[:5]
    assert cache.class_bytes()["read"] == 1000 and cache.class_bytes()["ahead"] == 0


def test_fetching_ahead_is_admitted_only_while_it_can_stay(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 5_000)
    assert cache.reserve_ahead(5_000)
    assert not cache.reserve_ahead(1)  # promised to fetches under way
    cache.unreserve_ahead(5_000)
    for i in range(3):
        cache.put(*chunk(f"read{i}"))
    assert not cache.reserve_ahead(2_001)
    assert cache.reserve_ahead(2_000)
    cache.unreserve_ahead(2_000)
    released = [chunk(f"old{i}") for i in range(2)]
    for digest, data in released:
        cache.put(digest, data, speculative=True)
    assert not cache.reserve_ahead(1)  # full of chunks that stay
    cache.release([d for d, _ in released])
    assert cache.reserve_ahead(2_000)  # unmounted layers' chunks may make room


def test_once_reads_push_out_unread_chunks_fetched_ahead_none_is_admitted(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 3_000)
    ahead = [chunk(f"ahead{i}") for i in range(3)]
    for digest, data in ahead:
        assert cache.reserve_ahead(len(data))
        cache.put(digest, data, speculative=True)
        cache.unreserve_ahead(len(data))
    cache.put(*chunk("read"))  # a read pushes out a chunk nobody read: fetching ahead was waste
    assert ahead[0][0] not in cache
    cache.prune(0)
    assert not cache.reserve_ahead(1)  # for a while, whatever the free space


def test_after_a_restart_every_chunk_is_evicted_before_those_read_since(tmp_path: Path) -> None:
    first = ChunkCache(tmp_path, 10_000)
    kept = [chunk(f"k{i}") for i in range(5)]
    for digest, data in kept:
        first.put(digest, data)
    second = ChunkCache(tmp_path, 10_000)
    assert second.class_bytes() == {"read": 0, "ahead": 0, "released": 5000}
    assert second.get(kept[0][0]) == kept[0][1]
    assert second.class_bytes()["read"] == 1000


def test_local_blobs_count_against_the_bound_and_take_at_most_half(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 10_000)
    chunks = [chunk(f"read{i}") for i in range(8)]
    for digest, data in chunks:
        cache.put(digest, data)
    assert cache.room_for_local(5_000) and not cache.room_for_local(5_001)
    assert cache.reserve_ahead(2_000)
    cache.unreserve_ahead(2_000)
    cache.set_local_bytes(4_000)  # 12,000 with the chunks: evicted down to 90% of the bound
    assert cache.local_bytes == 4_000 and cache.total_bytes == 5_000
    assert all(d not in cache for d, _ in chunks[:3]) and all(d in cache for d, _ in chunks[3:])
    assert not cache.reserve_ahead(1_001)  # 4,000 local + 5,000 read: 1,000 left
    assert not cache.room_for_local(1_001)
    cache.set_local_bytes(0)
    assert cache.reserve_ahead(5_000)
