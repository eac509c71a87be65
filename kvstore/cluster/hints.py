"""``HintedHolders``: blocks a hinted peer said it holds, before the cluster index knows.

A decode's connector passes its node the id of the node the prefill saved to (the *hint*,
docs/design/kvstore.md §10.9). When the node's own tiers and its index cover fewer than all of a
prompt's keys, it asks that peer ``MATCH_PREFIX`` for the rest and remembers here what the peer
holds, so that the ``LEASE_BATCH`` that follows reads them through even though the index has not
learnt of them yet (the peer publishes in batches; the stream is read a little later).

Entries are ``key -> (node id, tier)`` and expire after ``ttl_s`` (by then the index has the
blocks, or the peer has dropped them); at most ``capacity`` keys are kept, the oldest added
dropped first. A node id, never an address: the caller resolves it through its live members at
use, so an entry of a node that died is ignored at once. Thread-safe (the node's loop adds and
reads; its read-through threads read). The clock is injected for tests.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvstore.blocks.tier import Tier

__all__ = ["DEFAULT_HINT_CAPACITY", "DEFAULT_HINT_TTL_S", "HintedHolders"]

DEFAULT_HINT_TTL_S = 30.0
"""How long a hinted holder is remembered: far beyond the index's lag (10 ms batches, a
blocking stream read), short enough that a block the peer dropped is not asked for long."""
DEFAULT_HINT_CAPACITY = 4096
"""Keys remembered at most: a few long prompts in flight (4096 blocks of 16 tokens are 64 Ki
tokens), 40 bytes of key and entry each."""


class HintedHolders:
    """A bounded, expiring map of block key -> (node id, tier) learnt from hinted peers."""

    def __init__(
        self,
        ttl_s: float = DEFAULT_HINT_TTL_S,
        capacity: int = DEFAULT_HINT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or capacity <= 0:
            raise ValueError("ttl_s and capacity must be positive")
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[str, Tier, float]] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, node_id: str, keys: Sequence[bytes], tiers: Sequence[Tier]) -> None:
        """``node_id`` holds ``keys[i]`` in ``tiers[i]`` (as it answered just now)."""
        if len(keys) != len(tiers):
            raise ValueError("keys and tiers differ in length")
        now = self._clock()
        expires = now + self.ttl_s
        with self._lock:
            entries = self._entries
            for key, tier in zip(keys, tiers, strict=True):
                entries.pop(key, None)  # re-added: moves to the young end
                entries[key] = (node_id, tier, expires)
            # Oldest first is also soonest to expire: drop the expired, then beyond capacity.
            while entries and (
                len(entries) > self.capacity or next(iter(entries.values()))[2] <= now
            ):
                entries.popitem(last=False)

    def holder(self, key: bytes) -> tuple[str, Tier] | None:
        """The node a hint said holds ``key`` and its tier, unless that has expired."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            node_id, tier, expires = entry
            if now >= expires:
                del self._entries[key]
                return None
            return node_id, tier
