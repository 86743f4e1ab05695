"""The prefix table is bounded state: capped by entries and by bytes, LRU-evicted."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from modelfleet.dataplane.sidecar.prefix_table import DIGEST_SIZE, ENTRY_BYTES, PrefixTable, prefix_digest

URLS = [f"http://10.0.0.{i}:9000" for i in range(4)]


def test_a_million_distinct_prefixes_stay_under_the_byte_cap():
    """1,000,000 distinct prefixes through a table capped at 32 MiB (the spec's default)."""
    cap_bytes = 32 * 1024 * 1024
    started = time.monotonic()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        table = PrefixTable(max_entries=10**9, max_bytes=cap_bytes)  # the byte cap binds
        for i in range(1_000_000):
            table.put(prefix_digest(f"prefix number {i}"), URLS[i & 3])
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(table) == table.capacity == cap_bytes // ENTRY_BYTES
    assert table.evictions == 1_000_000 - table.capacity
    assert peak - base <= cap_bytes, f"peak {peak - base} bytes over the {cap_bytes} cap"
    print(f"{len(table)} entries: {(current - base) / len(table):.0f} B/entry now, peak {peak - base} B")
    assert time.monotonic() - started < 60


def test_the_entry_cap_binds_when_smaller():
    table = PrefixTable(max_entries=100, max_bytes=1 << 30)
    for i in range(1000):
        table.put(prefix_digest(str(i)), URLS[0])
    assert len(table) == 100
    assert table.get(prefix_digest("899")) is None
    assert table.get(prefix_digest("999")) == URLS[0]


def test_least_recently_used_goes_first():
    table = PrefixTable(max_entries=3, max_bytes=1 << 20)
    a, b, c, d = (prefix_digest(x) for x in "abcd")
    table.put(a, URLS[0])
    table.put(b, URLS[1])
    table.put(c, URLS[2])
    assert table.get(a) == URLS[0]  # a is now the most recent
    table.put(d, URLS[3])
    assert table.get(b) is None
    assert [table.get(k) for k in (a, c, d)] == [URLS[0], URLS[2], URLS[3]]


def test_zero_capacity_remembers_nothing_and_keys_are_digests():
    table = PrefixTable(max_entries=0, max_bytes=1 << 20)
    table.put(prefix_digest("x"), URLS[0])
    assert len(table) == 0
    assert len(prefix_digest("x" * 10_000)) == DIGEST_SIZE
    with pytest.raises(ValueError):
        PrefixTable(10, 1 << 20).put(b"too short", URLS[0])
