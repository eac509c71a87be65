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

Admission -- whether a new block may displace a cached one at all -- is a separate, swappable
part: :class:`AdmittedPolicy` puts any of the above (as *main*) behind an
:class:`AdmissionFilter` with a small LRU window for new keys whose size adapts as ARC's ``p``.
Filters: :class:`TinyLFUAdmission` (a :class:`FrequencySketch` with a doorkeeper: the candidate
must have been accessed more often than the victim) and :class:`GhostAdmission` (second hit: the
candidate was accessed before, within a ghost of recent keys). ``PolicyKind.W_TINYLFU`` and
``PolicyKind.SECOND_HIT_LRU`` build them with an LRU main. A refused block is simply the next
victim, so the node's protocol is unchanged (docs/design/kvstore.md §12.2).

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

import xxhash

__all__ = [
    "ARCPolicy",
    "AdmissionFilter",
    "AdmittedPolicy",
    "EvictionPolicy",
    "FrequencySketch",
    "GhostAdmission",
    "LRUPolicy",
    "PolicyKind",
    "S3FIFOPolicy",
    "SIEVEPolicy",
    "TinyLFUAdmission",
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

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is tracked (a lookup: not an access)."""


class PolicyKind(enum.Enum):
    """The eviction policies :func:`make_policy` builds. Values are the configuration names."""

    LRU = "lru"
    S3_FIFO = "s3fifo"
    ARC = "arc"
    SIEVE = "sieve"
    W_TINYLFU = "w-tinylfu"
    """LRU main behind TinyLFU admission (frequency sketch + doorkeeper), adaptive window."""
    SECOND_HIT_LRU = "second-hit-lru"
    """LRU main behind second-hit admission (a ghost of 4x the cache's keys), adaptive window."""


def make_policy(kind: PolicyKind) -> EvictionPolicy:
    """A fresh policy of ``kind`` with its published (or, for admission, measured) defaults."""
    factories: dict[PolicyKind, Callable[[], EvictionPolicy]] = {
        PolicyKind.LRU: LRUPolicy,
        PolicyKind.S3_FIFO: S3FIFOPolicy,
        PolicyKind.ARC: ARCPolicy,
        PolicyKind.SIEVE: SIEVEPolicy,
        PolicyKind.W_TINYLFU: lambda: AdmittedPolicy(LRUPolicy(), TinyLFUAdmission()),
        PolicyKind.SECOND_HIT_LRU: lambda: AdmittedPolicy(LRUPolicy(), GhostAdmission()),
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

    def __contains__(self, key: object) -> bool:
        return key in self._order


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

    def __contains__(self, key: object) -> bool:
        return key in self._freq

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

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2


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

    def __contains__(self, key: object) -> bool:
        return key in self._nodes


# -- admission ------------------------------------------------------------------------------------


class AdmissionFilter(Protocol):
    """Decides whether a new key may displace a cached one (the *admission* half of a policy).

    It sees every access -- hits through :meth:`record` from ``on_access``, misses through
    :meth:`record` from ``on_insert`` (a block is put after a miss) -- and keeps its own bounded,
    approximate history, including of keys the cache no longer holds.
    """

    def record(self, key: bytes) -> None:
        """One access to ``key``, a hit or a miss."""

    def admit(self, candidate: bytes, victim: bytes) -> bool:
        """Whether ``candidate`` should enter the main cache at the cost of ``victim``."""

    def ensure_capacity(self, num_entries: int) -> None:
        """The cache holds ``num_entries`` keys now; size the history for at least that many."""


_HALVE = bytes(value >> 1 for value in range(256))
"""``bytes.translate`` table that halves every counter of a sketch row in one C-level pass."""


class FrequencySketch:
    """TinyLFU's approximate access counts: a count-min sketch with a doorkeeper, aged by halving.

    * **Counters**: ``depth`` rows of ``width`` 4-bit saturating counters (one byte each here --
      packing two per byte would halve 4 bytes per cache entry at the price of shifts in Python).
      A key's estimate is the minimum of its counters over the rows (count-min: never below the
      truth, above it only on collisions in every row).
    * **Doorkeeper**: a Bloom filter in front of the counters (Einziger et al., TinyLFU, 2017).
      The first access of a key in a period only sets its doorkeeper bits; only later accesses
      reach the counters, so the one-hit wonders that dominate KV traffic (76 % of the
      conversation trace's blocks) do not fill the counters. :meth:`frequency` adds 1 for a key
      in the doorkeeper.
    * **Aging**: after ``sample_factor * width`` recorded accesses every counter is halved (4 → 2,
      1 → 0) and the doorkeeper is cleared -- the *reset* of TinyLFU, so that what was popular an
      hour ago does not lock out what is popular now. The count of recorded accesses is halved
      with the counters.
    * **Hashing**: one xxh3-128 of the key; row ``i`` uses ``(low + i * high) mod width`` and the
      doorkeeper's probes the same double hashing further on (Kirsch & Mitzenmacher). Keys are
      hashes already, but tests use short names, so they are mixed anyway.

    ``width`` is rounded up to a power of two and grows with :meth:`ensure_capacity` (resetting the
    counts, as Caffeine does), since the store does not know its capacity in blocks.
    """

    MAX_COUNT: Final = 15
    DOORKEEPER_PROBES: Final = 3

    __slots__ = (
        "_additions",
        "_depth",
        "_doorkeeper",
        "_doorkeeper_bits",
        "_mask",
        "_rows",
        "_sample_factor",
        "_sample_size",
        "_width",
    )

    def __init__(
        self,
        width: int = 64,
        *,
        depth: int = 4,
        sample_factor: int = 10,
        doorkeeper_bits_per_counter: int = 8,
    ) -> None:
        if width < 1 or depth < 1 or sample_factor < 1 or doorkeeper_bits_per_counter < 0:
            raise ValueError("need width, depth, sample_factor >= 1 and doorkeeper bits >= 0")
        self._depth = depth
        self._sample_factor = sample_factor
        self._doorkeeper_bits = doorkeeper_bits_per_counter
        self._width = 0
        self._mask = 0
        self._rows: list[bytearray] = []
        self._sample_size = 0
        self._doorkeeper: bytearray | None = None
        self._additions = 0
        self._allocate(width)

    @property
    def width(self) -> int:
        """Counters per row (a power of two)."""
        return self._width

    @property
    def sample_size(self) -> int:
        """Recorded accesses between two halvings."""
        return self._sample_size

    @property
    def num_recorded(self) -> int:
        """Accesses recorded since the last halving (itself halved by it)."""
        return self._additions

    def increment(self, key: bytes) -> None:
        """Record one access: the doorkeeper takes a key's first, the counters the rest."""
        low, high = self._hashes(key)
        # A key's first access in this period only sets its doorkeeper bits.
        if self._doorkeeper is None or self._admit_to_doorkeeper(low, high):
            mask, max_count = self._mask, self.MAX_COUNT
            for i, row in enumerate(self._rows):
                index = (low + i * high) & mask
                if row[index] < max_count:
                    row[index] += 1
        self._additions += 1
        if self._additions >= self._sample_size:
            self.halve()

    def frequency(self, key: bytes) -> int:
        """Estimated accesses in the current period (at most ``MAX_COUNT`` + 1)."""
        low, high = self._hashes(key)
        mask = self._mask
        count = min(row[(low + i * high) & mask] for i, row in enumerate(self._rows))
        return count + self._in_doorkeeper(low, high)

    def halve(self) -> None:
        """Age the history: halve every counter and the access count, clear the doorkeeper."""
        for row in self._rows:
            row[:] = row.translate(_HALVE)
        if self._doorkeeper is not None:
            self._doorkeeper = bytearray(len(self._doorkeeper))
        self._additions //= 2

    def ensure_capacity(self, num_entries: int) -> None:
        """Grow (and reset) to at least ``num_entries`` counters per row; never shrinks."""
        if num_entries > self._width:
            self._allocate(num_entries)

    def _allocate(self, width: int) -> None:
        self._width = 1 << max(0, width - 1).bit_length()
        self._mask = self._width - 1
        self._rows = [bytearray(self._width) for _ in range(self._depth)]
        self._sample_size = self._sample_factor * self._width
        bits = self._doorkeeper_bits * self._width
        self._doorkeeper = bytearray((bits + 7) // 8) if bits else None
        self._additions = 0

    @staticmethod
    def _hashes(key: bytes) -> tuple[int, int]:
        digest = xxhash.xxh3_128_intdigest(key)
        return digest & 0xFFFF_FFFF_FFFF_FFFF, (digest >> 64) | 1

    def _doorkeeper_bit(self, low: int, high: int, probe: int) -> tuple[int, int]:
        assert self._doorkeeper is not None
        bit = (low + (self._depth + probe) * high) % (8 * len(self._doorkeeper))
        return bit >> 3, 1 << (bit & 7)

    def _in_doorkeeper(self, low: int, high: int) -> int:
        if self._doorkeeper is None:
            return 0
        for probe in range(self.DOORKEEPER_PROBES):
            byte, bit = self._doorkeeper_bit(low, high, probe)
            if not self._doorkeeper[byte] & bit:
                return 0
        return 1

    def _admit_to_doorkeeper(self, low: int, high: int) -> bool:
        """Set the key's doorkeeper bits; True if they were all set already (seen before)."""
        assert self._doorkeeper is not None
        seen = True
        for probe in range(self.DOORKEEPER_PROBES):
            byte, bit = self._doorkeeper_bit(low, high, probe)
            if not self._doorkeeper[byte] & bit:
                seen = False
                self._doorkeeper[byte] |= bit
        return seen


class TinyLFUAdmission:
    """TinyLFU: admit a candidate only if it was accessed more often than the victim it replaces.

    Ties go to the victim (the incumbent already proved itself once). The counts come from a
    :class:`FrequencySketch` sized to the cache, so the history covers about ``sample_factor``
    cache-fulls of accesses -- including keys the cache never admitted, which is what lets a
    key that keeps coming back in eventually.
    """

    __slots__ = ("_sketch",)

    def __init__(self, sketch: FrequencySketch | None = None) -> None:
        self._sketch = sketch if sketch is not None else FrequencySketch()

    @property
    def sketch(self) -> FrequencySketch:
        return self._sketch

    def record(self, key: bytes) -> None:
        self._sketch.increment(key)

    def admit(self, candidate: bytes, victim: bytes) -> bool:
        return self._sketch.frequency(candidate) > self._sketch.frequency(victim)

    def ensure_capacity(self, num_entries: int) -> None:
        self._sketch.ensure_capacity(num_entries)


class GhostAdmission:
    """Second-hit admission: admit a candidate if it was accessed before, within a ghost FIFO.

    The ghost remembers the last ``ghost_ratio`` × (cache entries) distinct keys recorded (as
    S3-FIFO's ghost queue, and ARC's B1, do for keys they evicted); a candidate it finds has
    been seen at least twice in that window and is admitted whatever the victim. Exact (a set,
    not a sketch), at the cost of a dictionary entry per remembered key (about 150 bytes).

    The default of 4x the cache was measured on the conversation trace at 1 % of its distinct
    blocks: 1x → 27 %, 2x → 31 %, 4x → 42 %, 8x → 41 %, 16x → 38 % of Belady's hits (too short a
    ghost forgets a conversation before its next turn, too long a one admits stale keys).
    """

    __slots__ = ("_ghost", "_ghost_ratio", "_limit")

    def __init__(self, ghost_ratio: float = 4.0) -> None:
        if ghost_ratio <= 0.0:
            raise ValueError("ghost_ratio must be > 0")
        self._ghost_ratio = ghost_ratio
        self._ghost: OrderedDict[bytes, int] = OrderedDict()  # key -> accesses; oldest first
        self._limit = 1

    def record(self, key: bytes) -> None:
        self._ghost[key] = self._ghost.pop(key, 0) + 1
        while len(self._ghost) > self._limit:
            self._ghost.popitem(last=False)

    def admit(self, candidate: bytes, victim: bytes) -> bool:
        return self._ghost.get(candidate, 0) >= 2

    def ensure_capacity(self, num_entries: int) -> None:
        self._limit = max(self._limit, int(self._ghost_ratio * num_entries))

    def accesses(self, key: bytes) -> int:
        """Accesses to ``key`` the ghost remembers (0 once it has fallen out)."""
        return self._ghost.get(key, 0)


class AdmittedPolicy:
    """An eviction policy behind an admission filter, with a window that adapts as ARC's ``p``.

    New keys enter a small LRU *window*; the rest of the cache is the ``main`` policy (W-TinyLFU's
    structure, Einziger et al. 2017, for any main policy and any :class:`AdmissionFilter`). When a
    victim is needed and the window is over its target size, its least recent key -- the
    *candidate* -- is put to the admission filter against main's victim: admitted, the
    candidate moves into main and main's victim is evicted; refused, the candidate is evicted and
    main is untouched. So a block with no history of reuse never pushes a proven one out, yet it
    is still stored on arrival and served from the window while it is recent.

    **Adaptive window** (``adapt_window=True``). How much of the cache should go to unproven keys
    depends on the workload -- on the conversation trace LRU (all window) is best at 20 % of the
    distinct blocks and admission at 1 %. As ARC steers ``p``, two ghost FIFOs of keys evicted
    from the window and from main (each bounded by the tracked keys) steer the window's target:
    a key put again while in the window's ghost means a larger window would have hit, so the
    target grows by ``max(|main ghost| / |window ghost|, 1)``; a key put again while in main's
    ghost shrinks it by the inverse. The target starts at ``window_ratio`` of the cache (default
    0.5: from the middle it reaches either end within a trace; Caffeine's 1 % start adapts too
    slowly at 20 % of the trace, 83 % of Belady against 91 %) and stays in ``[0, tracked + 1]``.
    Without adaptation the target is ``window_ratio`` of the tracked keys.

    Fitting the node's protocol, which stores a block first and asks for victims later:

    * **Admission is decided lazily**, at the eviction that makes room for the candidate's
      successor, not when the candidate is put. A refused key is then the next victim, so the
      node and :class:`~kvstore.tiers.TierManager` need no change: a refused block in DRAM is
      simply the next one spilled (it still lands on SSD) or evicted.
    * **Warm-up**: the arena fills before the first eviction, with every key in the window. The
      first selection moves all but one key over the target into main without a comparison (main
      was not full while they arrived), as Caffeine's ``evictFromWindow`` does.
    * :meth:`select_victim` reorganises (moves keys from window into main) but never drops a key,
      and returns the same key until the next event, as the protocol requires.
    """

    __slots__ = (
        "_adapt",
        "_admission",
        "_main",
        "_main_ghost",
        "_target",
        "_victim",
        "_window",
        "_window_ghost",
        "_window_ratio",
    )

    def __init__(
        self,
        main: EvictionPolicy,
        admission: AdmissionFilter,
        window_ratio: float = 0.5,
        *,
        adapt_window: bool = True,
    ) -> None:
        if not 0.0 <= window_ratio <= 1.0:
            raise ValueError("need 0 <= window_ratio <= 1")
        if len(main):
            raise ValueError("the main policy must start empty")
        self._main = main
        self._admission = admission
        self._window_ratio = window_ratio
        self._adapt = adapt_window
        self._target: float | None = None  # adaptive target in keys; set at the first selection
        self._window: OrderedDict[bytes, None] = OrderedDict()  # least recent first
        self._window_ghost: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._main_ghost: OrderedDict[bytes, None] = OrderedDict()
        self._victim: bytes | None = None

    @property
    def main(self) -> EvictionPolicy:
        return self._main

    @property
    def admission(self) -> AdmissionFilter:
        return self._admission

    @property
    def window_target(self) -> float:
        """The number of keys the window is steered towards now."""
        if self._adapt and self._target is not None:
            return self._target
        return self._window_ratio * len(self)

    def in_window(self, key: bytes) -> bool:
        """Whether ``key`` is in the window (not yet admitted to main)."""
        return key in self._window

    def on_insert(self, key: bytes) -> None:
        if key in self._window or key in self._main:
            self.on_access(key)
            return
        self._victim = None
        if self._adapt:
            self._adapt_target(key)
        self._admission.record(key)
        self._window[key] = None
        self._admission.ensure_capacity(len(self))

    def on_access(self, key: bytes) -> None:
        if key in self._window:
            self._window.move_to_end(key)
        elif key in self._main:
            self._main.on_access(key)
        else:
            return
        self._victim = None
        self._admission.record(key)

    def on_remove(self, key: bytes) -> None:
        if key in self._window:
            del self._window[key]
            ghost = self._window_ghost
        elif key in self._main:
            self._main.on_remove(key)
            ghost = self._main_ghost
        else:
            return
        self._victim = None
        if self._adapt:
            ghost[key] = None
            while len(ghost) > len(self):
                ghost.popitem(last=False)

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        victim = self._victim
        if victim is not None and can_evict(victim):
            return victim
        window, main = self._window, self._main
        if self._adapt and self._target is None:
            self._target = self._window_ratio * len(self)
        target = self.window_target
        while len(window) > target + 1:  # main had room while these arrived
            key, _ = window.popitem(last=False)
            main.on_insert(key)
        victim = None
        if len(window) > target:
            candidate = next((key for key in window if can_evict(key)), None)
            incumbent = main.select_victim(can_evict)
            if candidate is None:
                victim = incumbent
            elif incumbent is None:
                victim = candidate
            elif self._admission.admit(candidate, incumbent):
                del window[candidate]
                main.on_insert(candidate)
                victim = main.select_victim(can_evict)  # main's order may have changed
            else:
                victim = candidate
        if victim is None:
            victim = main.select_victim(can_evict)
        if victim is None:
            victim = next((key for key in window if can_evict(key)), None)
        self._victim = victim
        return victim

    def __len__(self) -> int:
        return len(self._window) + len(self._main)

    def __contains__(self, key: object) -> bool:
        return key in self._window or key in self._main

    def _adapt_target(self, key: bytes) -> None:
        """ARC's adaptation of ``p``, applied to the window: called for a key being put."""
        window_ghost, main_ghost = self._window_ghost, self._main_ghost
        if self._target is None:
            return  # nothing evicted yet
        if key in window_ghost:
            step = max(len(main_ghost) / len(window_ghost), 1.0)
            self._target = min(float(len(self) + 1), self._target + step)
            del window_ghost[key]
        elif key in main_ghost:
            step = max(len(window_ghost) / len(main_ghost), 1.0)
            self._target = max(0.0, self._target - step)
            del main_ghost[key]


_ABSENT: Final = object()
