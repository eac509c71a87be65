"""Eviction policies: which committed block to drop when the arena is full.

A policy is a separate object injected into :class:`kvstore.node.StoreNode` so that policies can be
swapped and compared without touching the node; :func:`make_policy` builds one from a
:class:`PolicyKind`. A policy only orders keys. The node alone decides whether a key *may* go -- it
passes a ``can_evict`` predicate that rejects leased blocks -- and only committed blocks are ever
tracked (the node calls :meth:`EvictionPolicy.on_insert` at commit), so a block being written or
read is never chosen.

Policies (docs/design/kvstore.md §12; compared against Belady's optimum on the conversation trace
by benchmarks/bench_trace_eviction.py):

* :class:`LRUPolicy` -- least recently used.
* :class:`S3FIFOPolicy` -- S3-FIFO (Yang et al., SOSP '23): a small FIFO that filters one-hit
  wonders, a main FIFO with CLOCK-like 2-bit frequencies, and a ghost FIFO.
* :class:`ARCPolicy` -- Adaptive Replacement Cache (Megiddo & Modha, FAST '03).
* :class:`SIEVEPolicy` -- SIEVE (Zhang et al., NSDI '24): one FIFO, a visited bit and a hand.

Two adaptations to a store that sizes itself in bytes, shared by all of them:

* **No capacity in entries.** Eviction only happens when the arena is full, so the number of
  tracked blocks is the cache size at that moment, and S3-FIFO's 10 % / 90 % split, its ghost size
  and ARC's ``c`` are taken relative to it (with uniform blocks that is the textbook algorithm).
* **Every removal counts as an eviction** for the ghost lists. The protocol does not say why a key
  left, and evictions and spills to a lower tier are by far the common cause; a DELETE'd key also
  leaves a ghost, which only changes which queue the key enters if it is stored again.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Protocol

__all__ = [
    "ARCPolicy",
    "EvictionPolicy",
    "LRUPolicy",
    "PolicyKind",
    "S3FIFOPolicy",
    "SIEVEPolicy",
    "make_policy",
]


class EvictionPolicy(Protocol):
    """What the store node needs from an eviction policy. Keys are block keys (16 bytes)."""

    def on_insert(self, key: bytes) -> None:
        """``key`` was committed and is now a candidate for eviction."""

    def on_access(self, key: bytes) -> None:
        """``key`` was read (or re-put) -- a hint of future use."""

    def on_remove(self, key: bytes) -> None:
        """``key`` left the store (evicted, spilled or deleted); forget it."""

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        """Return the best key to evict among those with ``can_evict(key)``, or None.

        Must not change which keys are tracked: the node calls :meth:`on_remove` once it has
        actually removed the block. A policy may reorganise its order while looking (S3-FIFO and
        SIEVE promote and reinsert lazily -- that is the algorithm), but calling it again without
        other events in between returns the same key.
        """

    def __len__(self) -> int:
        """Number of keys tracked."""


class PolicyKind(enum.Enum):
    """The eviction policies :func:`make_policy` builds. Values are the configuration names."""

    LRU = "lru"
    S3_FIFO = "s3fifo"
    ARC = "arc"
    SIEVE = "sieve"


def make_policy(kind: PolicyKind) -> EvictionPolicy:
    """A fresh policy of ``kind`` with its published default parameters."""
    factories: dict[PolicyKind, Callable[[], EvictionPolicy]] = {
        PolicyKind.LRU: LRUPolicy,
        PolicyKind.S3_FIFO: S3FIFOPolicy,
        PolicyKind.ARC: ARCPolicy,
        PolicyKind.SIEVE: SIEVEPolicy,
    }
    if not isinstance(kind, PolicyKind):
        raise TypeError(f"expected a PolicyKind, got {kind!r}")
    return factories[kind]()


class LRUPolicy:
    """Least recently used first, in O(1) per event.

    An ``OrderedDict`` is a hash map over a doubly linked list, which is what LRU needs: O(1)
    ``move_to_end`` on access and O(1) removal from the middle when a block is deleted. Victim
    selection walks from the cold end and skips keys the node refuses (leased blocks), so its cost
    is 1 + the number of leased blocks colder than the victim.
    """

    __slots__ = ("_order",)

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def on_insert(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        for key in self._order:
            if can_evict(key):
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)


class S3FIFOPolicy:
    """S3-FIFO: small FIFO (10 %), main FIFO (2-bit frequency, reinsertion), ghost FIFO.

    * **Insert**: into the small queue -- or straight into main if the key is a ghost (it was
      evicted from small recently and came back, so it is not a one-hit wonder).
    * **Access**: frequency + 1, capped at 3 (two bits). Nothing moves: a hit costs no reordering.
    * **Select** (the published eviction loop, done lazily here): if the small queue holds at
      least ``small_ratio`` of the tracked keys, look at its oldest key: accessed at least
      ``move_to_main_threshold`` times → it moves to main with its frequency cleared, try the next;
      otherwise it is the victim (and becomes a ghost when removed). Else look at main's oldest
      key: frequency > 0 → reinsert it at the new end with frequency - 1 (CLOCK), try the next;
      otherwise it is the victim. If one queue has no evictable key the other is tried.
    * **Ghost**: keys evicted from small, oldest dropped beyond ``ghost_ratio`` × tracked keys.
    * **Refused keys** (leased) are passed over by moving them to the new end of their queue, so
      a long-leased block is not rescanned on every selection.

    Defaults are the paper's: 10 % small, ghost 90 % of the cache, promotion after 1 access
    (libCacheSim's newer ``S3FIFO.c`` uses 2; the SOSP '23 version, ``S3FIFOv0``, uses 1).
    """

    MAX_FREQ: Final = 3

    __slots__ = (
        "_freq",
        "_ghost",
        "_ghost_ratio",
        "_main",
        "_small",
        "_small_ratio",
        "_threshold",
        "_victim",
    )

    def __init__(
        self,
        small_ratio: float = 0.1,
        ghost_ratio: float = 0.9,
        move_to_main_threshold: int = 1,
    ) -> None:
        if not 0.0 < small_ratio < 1.0 or ghost_ratio < 0.0 or move_to_main_threshold < 1:
            raise ValueError("need 0 < small_ratio < 1, ghost_ratio >= 0, threshold >= 1")
        self._small_ratio = small_ratio
        self._ghost_ratio = ghost_ratio
        self._threshold = move_to_main_threshold
        self._small: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._main: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._ghost: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._freq: dict[bytes, int] = {}  # every tracked key
        self._victim: bytes | None = None  # the last selection, while nothing else happened

    def on_insert(self, key: bytes) -> None:
        if key in self._freq:
            self.on_access(key)
            return
        self._victim = None
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
        self._freq[key] = 0

    def on_access(self, key: bytes) -> None:
        freq = self._freq.get(key)
        if freq is not None:
            self._victim = None
            self._freq[key] = min(freq + 1, self.MAX_FREQ)

    def on_remove(self, key: bytes) -> None:
        if self._freq.pop(key, None) is None:
            return
        self._victim = None
        if key in self._small:
            del self._small[key]
            self._ghost[key] = None
            limit = int(self._ghost_ratio * len(self._freq))
            while len(self._ghost) > limit:
                self._ghost.popitem(last=False)
        else:
            del self._main[key]

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        victim = self._victim
        if victim is not None and can_evict(victim):
            return victim
        if len(self._small) >= self._small_ratio * len(self._freq):
            victim = self._select_small(can_evict)
            if victim is None:
                victim = self._select_main(can_evict)
        else:
            victim = self._select_main(can_evict)
            if victim is None:
                victim = self._select_small(can_evict)
        self._victim = victim
        return victim

    def __len__(self) -> int:
        return len(self._freq)

    def _select_small(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        small, freq = self._small, self._freq
        for _ in range(len(small)):
            key = next(iter(small))
            if freq[key] >= self._threshold:
                del small[key]
                self._main[key] = None
                freq[key] = 0
            elif can_evict(key):
                return key
            else:
                small.move_to_end(key)
        return None

    def _select_main(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        main, freq = self._main, self._freq
        # Each pass lowers every frequency by one, so after MAX_FREQ + 1 passes only refused
        # keys can be left.
        for _ in range(len(main) * (self.MAX_FREQ + 1)):
            key = next(iter(main))
            if freq[key] > 0:
                freq[key] -= 1
            elif can_evict(key):
                return key
            main.move_to_end(key)
        return None


class ARCPolicy:
    """ARC: recency list T1, frequency list T2, ghosts B1/B2 adapting T1's target size ``p``.

    * **Insert**: a key that is a ghost in B1 (evicted from T1 recently: recency was too short)
      grows ``p`` by ``max(|B2| / |B1|, 1)`` and enters T2; a ghost in B2 shrinks ``p`` by
      ``max(|B1| / |B2|, 1)`` and enters T2; a new key enters T1. Then the ghosts are trimmed to
      ``|T1| + |B1| <= c`` and ``|T1| + |T2| + |B1| + |B2| <= 2c``, oldest first, where ``c`` is
      the number of tracked keys.
    * **Access**: a key in T1 moves to T2's most recent end; a key in T2 moves to its end.
    * **Select** (ARC's REPLACE): the least recent evictable key of T1 if ``|T1| > p`` (or T2 is
      empty), else of T2; if that list has no evictable key, the other one. Does not mutate.
    * **Remove**: from T1 into B1, from T2 into B2.

    The textbook REPLACE also evicts from T1 when ``|T1| == p`` and the incoming key is in B2; the
    node chooses victims before it commits the new key, so that tie rule is not applied.
    """

    __slots__ = ("_b1", "_b2", "_p", "_t1", "_t2")

    def __init__(self) -> None:
        self._t1: OrderedDict[bytes, None] = OrderedDict()  # least recent first
        self._t2: OrderedDict[bytes, None] = OrderedDict()
        self._b1: OrderedDict[bytes, None] = OrderedDict()
        self._b2: OrderedDict[bytes, None] = OrderedDict()
        self._p = 0.0

    @property
    def target_t1(self) -> float:
        """ARC's ``p``: the size T1 is steered towards."""
        return self._p

    def on_insert(self, key: bytes) -> None:
        if key in self._t1 or key in self._t2:
            self.on_access(key)
            return
        capacity = len(self._t1) + len(self._t2) + 1
        if key in self._b1:
            self._p = min(capacity, self._p + max(len(self._b2) / len(self._b1), 1.0))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self._p = max(0.0, self._p - max(len(self._b1) / len(self._b2), 1.0))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        while len(self._t1) + len(self._b1) > capacity and self._b1:
            self._b1.popitem(last=False)
        while capacity + len(self._b1) + len(self._b2) > 2 * capacity and self._b2:
            self._b2.popitem(last=False)

    def on_access(self, key: bytes) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def on_remove(self, key: bytes) -> None:
        if key in self._t1:
            del self._t1[key]
            self._b1[key] = None
        elif key in self._t2:
            del self._t2[key]
            self._b2[key] = None

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        if self._t1 and (len(self._t1) > self._p or not self._t2):
            order = (self._t1, self._t2)
        else:
            order = (self._t2, self._t1)
        for keys in order:
            for key in keys:
                if can_evict(key):
                    return key
        return None

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)


class _SieveNode:
    __slots__ = ("key", "newer", "older", "visited")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.visited = False
        self.newer: _SieveNode | None = None
        self.older: _SieveNode | None = None


class SIEVEPolicy:
    """SIEVE: a FIFO of keys with a visited bit, and a hand sweeping from oldest to newest.

    * **Insert** at the new end, not visited. **Access** sets the visited bit (no reordering).
    * **Select**: from the hand (initially the oldest key), clear visited bits while moving toward
      newer keys (wrapping to the oldest), and stop at the first unvisited key ``can_evict``
      accepts; the hand stays there. Keys are never moved, so survivors keep their age -- what
      distinguishes SIEVE from CLOCK.
    * **Remove** unlinks the key; a hand on it moves to the next newer key.

    A hand-made doubly linked list (not an ``OrderedDict``) because the hand must continue from a
    key in the middle of the queue.
    """

    __slots__ = ("_hand", "_newest", "_nodes", "_oldest")

    def __init__(self) -> None:
        self._nodes: dict[bytes, _SieveNode] = {}
        self._newest: _SieveNode | None = None
        self._oldest: _SieveNode | None = None
        self._hand: _SieveNode | None = None

    def on_insert(self, key: bytes) -> None:
        if key in self._nodes:
            self.on_access(key)
            return
        node = _SieveNode(key)
        node.older = self._newest
        if self._newest is not None:
            self._newest.newer = node
        else:
            self._oldest = node
        self._newest = node
        self._nodes[key] = node

    def on_access(self, key: bytes) -> None:
        node = self._nodes.get(key)
        if node is not None:
            node.visited = True

    def on_remove(self, key: bytes) -> None:
        node = self._nodes.pop(key, None)
        if node is None:
            return
        if self._hand is node:
            self._hand = node.newer
        if node.newer is not None:
            node.newer.older = node.older
        else:
            self._newest = node.older
        if node.older is not None:
            node.older.newer = node.newer
        else:
            self._oldest = node.newer

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        node = self._hand
        # Each node is seen at most twice: once to clear its bit, once as a candidate.
        for _ in range(2 * len(self._nodes)):
            if node is None:
                node = self._oldest
            assert node is not None
            if node.visited:
                node.visited = False
            elif can_evict(node.key):
                self._hand = node
                return node.key
            node = node.newer
        self._hand = node
        return None

    def __len__(self) -> int:
        return len(self._nodes)
