"""A consistent-hash ring with virtual nodes over the peer URLs.

Each peer owns ``VNODES`` points; a key belongs to the first point clockwise
from its own. Removing a peer moves only the keys it owned, adding one takes
about 1/n of the keys, and every sidecar with the same peer list computes the
same owners without talking to the others. The ring holds every known peer,
healthy or not: skipping ineligible peers while walking clockwise gives the
same answer as a ring of the eligible ones, without rebuilding on each health
change.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator

VNODES = 128


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def key_point(key: bytes) -> int:
    """Where a key (a digest already) sits on the ring."""
    return int.from_bytes(key[:8].ljust(8, b"\0"), "big")


class HashRing:
    def __init__(self, urls: Iterable[str], vnodes: int = VNODES) -> None:
        self.urls = tuple(sorted(set(urls)))
        points = sorted((_point(f"{url}#{i}".encode()), url) for url in self.urls for i in range(vnodes))
        self._points = [p for p, _ in points]
        self._owners = [u for _, u in points]

    def walk(self, key: bytes) -> Iterator[str]:
        """Every peer once, in ring order from the key's point: the owner first."""
        n = len(self._points)
        if n == 0:
            return
        start = bisect.bisect_right(self._points, key_point(key))
        seen: set[str] = set()
        for i in range(n):
            url = self._owners[(start + i) % n]
            if url not in seen:
                seen.add(url)
                yield url
                if len(seen) == len(self.urls):
                    return

    def owner(self, key: bytes) -> str | None:
        return next(self.walk(key), None)
