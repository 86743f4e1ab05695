"""The prompt-prefix keys a replica served recently, reported in /load for the sidecars.

A sidecar routing with PrefixAffinity sends each request's prefix key (a
16-byte digest of the prompt's first ``prefixChars`` characters, as 32 hex
characters) in the ``x-modelfleet-prefix-key`` header. The engine keeps the
keys it served, with how many requests each brought, and /load reports them
as ``"prefix_keys": {hex: requests}``. Every sidecar reads every replica's
/load, so all of them see the same map of which replica holds which prefix
and can agree on placements without a central store (sidecar/placement.py).

Bounded twice, so /load stays small and cheap: at most ``max_keys`` keys
(256 by default; the least recently served goes first) and only keys served
within the last ``max_age_s`` seconds (120 by default). A key's count is the
number of requests since its entry was created; the entry lives while the key
keeps coming back within ``max_age_s``. The engine does not check that a key
matches the prompt: it is a routing hint, and a wrong one only misplaces one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

KEY_HEX_CHARS = 32  # 16-byte digests (sidecar/prefix_table.py)
MAX_KEYS = 256
MAX_AGE_S = 120.0
_HEX = frozenset("0123456789abcdef")


class RecentPrefixKeys:
    """Prefix key (hex) -> [requests, last served], least recently served first."""

    def __init__(
        self, max_keys: int = MAX_KEYS, max_age_s: float = MAX_AGE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_keys = max_keys
        self.max_age_s = max_age_s
        self._clock = clock
        self._keys: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def note(self, key: str | None) -> None:
        """One request with this key was served here; a missing or malformed key is ignored."""
        if key is None or len(key) != KEY_HEX_CHARS or not _HEX.issuperset(key):
            return
        now = self._clock()
        entry = self._keys.get(key)
        if entry is None or now - entry[1] > self.max_age_s:
            self._keys[key] = [1, now]
        else:
            entry[0] += 1
            entry[1] = now
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        self._expire(now)

    def report(self) -> dict[str, int]:
        """The keys served within ``max_age_s``, with their request counts (what /load carries)."""
        self._expire(self._clock())
        return {key: int(entry[0]) for key, entry in self._keys.items()}

    def _expire(self, now: float) -> None:
        keys = self._keys
        while keys:
            key, entry = next(iter(keys.items()))
            if now - entry[1] <= self.max_age_s:
                return
            del keys[key]
