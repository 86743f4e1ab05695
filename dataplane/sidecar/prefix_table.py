"""What a prefix-affinity router remembers: prompt prefix -> the replica it last used.

The consistent-hash ring alone already sends a prefix to the same replica, and
sidecars agree on it without talking. The table adds stickiness when the ring
changes: after a replica joins, a prefix it would now own stays where its KV
blocks are already cached until it is evicted.

The table is bounded state on the hot path of every request, so it is capped
twice: by entries, and by bytes. Keys are fixed-size digests and values are
references to the peer URL strings the sidecar already holds, so every entry
costs the same, ``ENTRY_BYTES`` at most (measured by the unit test with
tracemalloc), and the byte cap becomes an entry cap. Least recently used
entries are evicted first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

DIGEST_SIZE = 16
# Upper bound of the memory one entry costs in CPython 3.11, peaks included: the
# 16-byte bytes object (49 bytes), its slot in the ordered dict's hash table and
# its node in the order list come to 165-250 bytes depending on how full the
# table is, and a resize briefly holds the old table and the new one (up to
# about 340). tests/unit/test_prefix_table.py checks the bound with 1,000,000 keys.
ENTRY_BYTES = 400


def prefix_digest(text: str) -> bytes:
    """A 16-byte key for a prompt prefix: collisions only misplace a cache hint."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=DIGEST_SIZE).digest()


class PrefixTable:
    """LRU map from prefix digest to the URL of the replica that served it last."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.capacity = max(0, min(max_entries, max_bytes // ENTRY_BYTES))
        self._entries: OrderedDict[bytes, str] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> str | None:
        """The replica remembered for ``key`` (and mark it recently used)."""
        url = self._entries.get(key)
        if url is not None:
            self._entries.move_to_end(key)
        return url

    def put(self, key: bytes, url: str) -> None:
        """Remember that ``key`` went to ``url``; evicts the least recently used past the cap."""
        if self.capacity == 0:
            return
        if len(key) != DIGEST_SIZE:
            raise ValueError(f"prefix keys are {DIGEST_SIZE}-byte digests, got {len(key)} bytes")
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
        entries[key] = url
        while len(entries) > self.capacity:
            entries.popitem(last=False)
            self.evictions += 1

    def forget_peer(self, url: str) -> int:
        """Drop every entry of a replica that left the peer set; returns how many."""
        stale = [k for k, v in self._entries.items() if v == url]
        for key in stale:
            del self._entries[key]
        return len(stale)
