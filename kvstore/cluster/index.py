"""PrefixIndex: the cluster-wide index of which holder has which block in which tier.

Fed by the :mod:`kvstore.cluster.events` that store nodes and engines publish, asked by the
scheduler with a prompt's key chain: :meth:`PrefixIndex.match` returns how long a prefix is cached
anywhere, how far each tier (or faster) reaches, and how much each single holder can serve. The
semantics, the sequence-number rules and the representation are the design of record in
docs/design/kvstore.md §10.2-10.4; in short:

* **Implicit trie.** A key names its whole prefix (:mod:`kvstore.blocks.hashing`), so the set of
  keys *is* the set of trie nodes and the requester computes children itself; the index is a flat
  map from key to a per-block record and never stores parent links.
* **Compact.** Each block has a dense *slot*: its key as two ``uint64`` and, per tier, a bitmask of
  holders (holder ids are interned into small integers; the mask word widens 8 → 16 → 32 → 64 bits
  and then to several words as holders are added). Key → slot is an open-addressing table of
  ``int32`` in numpy (linear probing, load ¼..½, tombstones, rebuilt on growth). About 30 bytes
  per block with ≤ 16 holders, against ~90 for a bare ``dict[bytes, int]`` of the same keys.
* **Batched.** A chain's keys are looked up together: each probes a window of
  :data:`_WINDOW` cells in one vectorised gather, so a match is a fixed number of numpy calls.
* **Sequence numbers.** Per source, the next expected ``seq``; older events are duplicates, a jump
  is a gap that :meth:`PrefixIndex.apply` reports as :attr:`ApplyResult.GAP` (the caller then
  fetches a :class:`~kvstore.cluster.events.SourceSnapshot` and calls :meth:`PrefixIndex.resync`).

Not thread-safe by design: the index belongs to one thread (the scheduler's loop).
"""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from kvstore.blocks.hashing import BLOCK_KEY_BYTES, BlockKey
from kvstore.blocks.tier import NUM_TIERS, Tier
from kvstore.cluster.events import (
    BlocksRemoved,
    BlocksStored,
    KVEvent,
    SourceCleared,
    SourceSnapshot,
)
from kvstore.cluster.match import (
    NO_MATCH,
    ApplyResult,
    IndexStats,
    MaskArray,
    PrefixMatch,
    unpack_bits,
)

__all__ = ["I64Array", "PrefixIndex", "U64Array"]


_EMPTY: Final = -1
"""Table cell never used since the last rebuild: a probe for a key stops here."""


_DELETED: Final = -2
"""Tombstone: the key was removed; probes continue past it, inserts may reuse it."""


_MAX_LOAD: Final = 0.5
"""Rebuild when live + tombstone cells exceed this fraction of the table."""


_WINDOW: Final = 4
"""Cells probed per key in one vectorised gather (at load ≤ 0.5 nearly every probe ends there)."""


_WINDOW_OFFSETS: Final = np.arange(_WINDOW, dtype=np.uint64)


_KEY_VOID: Final = np.dtype((np.void, BLOCK_KEY_BYTES))


_BATCH: Final = 65536
"""Keys per vectorised step, bounding temporaries for big snapshots."""


_WORD_DTYPES: Final = (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"), np.dtype("<u8"))


_MIN_TABLE: Final = 16


U64Array = npt.NDArray[np.uint64]


I64Array = npt.NDArray[np.int64]


@dataclass(slots=True)
class _Source:
    holder: int
    next_seq: int
    needs_resync: bool = False


class PrefixIndex:
    """Which holder holds which block in which tier, for longest-prefix matching.

    Owns all its state; callers feed events (:meth:`apply`, :meth:`resync`,
    :meth:`remove_source`) and get :class:`PrefixMatch` answers, never slots or masks.
    """

    def __init__(self, initial_capacity: int = 1024) -> None:
        """``initial_capacity``: blocks to allocate room for up front (arrays grow ×2 anyway)."""
        if initial_capacity < 1:
            raise ValueError("initial_capacity must be positive")
        self._sources: dict[str, _Source] = {}
        self._holder_names: list[str | None] = []
        self._free_holder_ids: list[int] = []  # a heap: reuse the smallest id first
        self._names_snapshot: tuple[str | None, ...] | None = ()
        # Per slot: key (2 x uint64) and holder masks (tiers x words).
        self._keys: U64Array = np.zeros((initial_capacity, 2), dtype=np.uint64)
        self._keys_void = self._keys.view(_KEY_VOID)[:, 0]
        self._word_bits = 8
        self._masks: MaskArray = np.zeros((initial_capacity, NUM_TIERS, 1), dtype=_WORD_DTYPES[0])
        self._num_used_slots = 0  # slots [0, _num_used_slots) have been handed out at least once
        self._free_slots: npt.NDArray[np.int64] = np.zeros(16, dtype=np.int64)
        self._num_free_slots = 0
        self._num_blocks = 0
        # Key -> slot table; a key's home cell is a multiply-shift hash with random multipliers.
        self._multipliers = np.array([secrets.randbits(64) | 1 for _ in range(2)], np.uint64)
        table_size = _MIN_TABLE
        while initial_capacity > table_size * _MAX_LOAD / 2:
            table_size *= 2
        self._table: npt.NDArray[np.int32] = np.full(table_size, _EMPTY, dtype=np.int32)
        self._table_mask = np.uint64(table_size - 1)
        self._shift = np.uint64(64 - (table_size.bit_length() - 1))
        self._num_tombstones = 0

    # -- events -------------------------------------------------------------------------------

    def apply(self, event: KVEvent) -> ApplyResult:
        """Apply one event; see :class:`ApplyResult` and docs/design/kvstore.md §10.2."""
        source = self._sources.get(event.source)
        if isinstance(event, SourceCleared):
            if source is None:
                source = self._add_source(event.source)  # new: holds nothing yet
            elif event.seq != 0 and event.seq < source.next_seq:
                return ApplyResult.DUPLICATE
            else:
                # seq 0 is a new incarnation (accepted at any point); a jump needs no resync,
                # since "holds nothing" subsumes whatever was missed.
                self._clear_holder(source.holder)
            source.next_seq = event.seq + 1
            source.needs_resync = False
            return ApplyResult.APPLIED
        if source is None:
            if event.seq != 0:
                return ApplyResult.GAP  # unknown (or removed) source: do not resurrect it
            source = self._add_source(event.source)
        if event.seq < source.next_seq:
            return ApplyResult.DUPLICATE
        result = ApplyResult.APPLIED
        if event.seq > source.next_seq:
            source.needs_resync = True
            result = ApplyResult.GAP
        source.next_seq = event.seq + 1
        if isinstance(event, BlocksStored):
            self._store(source.holder, event.tier, event.keys)
        elif isinstance(event, BlocksRemoved):
            self._remove(source.holder, event.tier, event.keys)
        else:
            raise TypeError(f"not a KV event: {type(event).__name__}")
        return result

    def resync(self, snapshot: SourceSnapshot) -> None:
        """Replace everything ``snapshot.source`` holds by the snapshot's contents.

        The next event expected from the source is ``snapshot.seq + 1``; its resync flag clears.
        """
        source = self._sources.get(snapshot.source)
        if source is None:
            source = self._add_source(snapshot.source)
        else:
            self._clear_holder(source.holder)
        for tier, keys in snapshot.keys_by_tier.items():
            self._store(source.holder, tier, keys)
        source.next_seq = snapshot.seq + 1
        source.needs_resync = False

    def remove_source(self, source: str) -> bool:
        """Forget a holder that left or crashed: its entries vanish. False if it was unknown."""
        state = self._sources.pop(source, None)
        if state is None:
            return False
        self._clear_holder(state.holder)
        self._holder_names[state.holder] = None
        heapq.heappush(self._free_holder_ids, state.holder)
        self._names_snapshot = None
        return True

    def needs_resync(self, source: str) -> bool:
        """True if a gap was seen from this (known) source since its last resync or clear."""
        state = self._sources.get(source)
        return state is not None and state.needs_resync

    def next_seq(self, source: str) -> int:
        """The sequence number expected next from ``source`` (0 for an unknown source)."""
        state = self._sources.get(source)
        return 0 if state is None else state.next_seq

    def sources(self) -> tuple[str, ...]:
        """The known sources, sorted."""
        return tuple(sorted(self._sources))

    # -- queries ------------------------------------------------------------------------------

    def match(self, keys: Sequence[BlockKey]) -> PrefixMatch:
        """Longest-prefix match of a key chain (a lookup: it changes nothing)."""
        n = len(keys)
        if n == 0 or self._num_blocks == 0:
            return NO_MATCH
        _, slots = self._find(_key_array(keys))
        missing = np.flatnonzero(slots < 0)
        depth = int(missing[0]) if missing.size else n
        if depth == 0:
            return NO_MATCH
        rows = self._masks[slots[:depth]]  # a copy: (depth, tiers, words)
        reach = np.logical_or.accumulate(rows.any(axis=2), axis=1)  # held in tier t or faster
        by_tier = np.logical_and.accumulate(reach, axis=0).sum(axis=0)
        return PrefixMatch(depth, tuple(by_tier.tolist()), rows, self._names(), self._word_bits)

    @property
    def num_blocks(self) -> int:
        """Distinct keys held by at least one holder in at least one tier."""
        return self._num_blocks

    def memory_bytes(self) -> int:
        """Bytes held by the index: its arrays exactly, plus ~200 B per source for bookkeeping."""
        arrays = (
            self._keys.nbytes + self._masks.nbytes + self._free_slots.nbytes + self._table.nbytes
        )
        return arrays + 200 * len(self._sources)

    def stats(self) -> IndexStats:
        return IndexStats(
            num_blocks=self._num_blocks,
            num_sources=len(self._sources),
            num_holder_bits=self._word_bits * self._masks.shape[2],
            slot_capacity=len(self._keys),
            table_capacity=len(self._table),
            num_tombstones=self._num_tombstones,
            memory_bytes=self.memory_bytes(),
        )

    def audit(self) -> None:
        """Check every internal invariant (O(size); for tests). Raises AssertionError."""
        used = self._num_used_slots
        live = np.flatnonzero(self._masks[:used].any(axis=(1, 2)))
        free = self._free_slots[: self._num_free_slots]
        assert len(live) == self._num_blocks, (len(live), self._num_blocks)
        assert len(live) + len(free) == used, "every handed-out slot is live or free"
        assert not np.isin(free, live).any(), "a free slot still has holder bits"
        assert not self._masks[used:].any(), "unused slots have no bits"
        cells = self._table[self._table >= 0]
        assert np.array_equal(np.sort(cells), live), "the table names exactly the live slots"
        assert int((self._table == _DELETED).sum()) == self._num_tombstones
        _, found = self._find(self._keys[live])
        assert np.array_equal(found, live), "every live key is found at its own slot"
        named = {h for h, name in enumerate(self._holder_names) if name is not None}
        assert named == {s.holder for s in self._sources.values()}
        if used:
            held = unpack_bits(np.bitwise_or.reduce(self._masks[:used], axis=(0, 1)))
            assert set(np.flatnonzero(held).tolist()) <= named, "bits only for known holders"

    # -- holders ------------------------------------------------------------------------------

    def _add_source(self, source: str) -> _Source:
        if self._free_holder_ids:
            holder = heapq.heappop(self._free_holder_ids)
            self._holder_names[holder] = source
        else:
            holder = len(self._holder_names)
            self._holder_names.append(source)
        self._names_snapshot = None
        self._ensure_holder_bits(holder + 1)
        state = _Source(holder, next_seq=0)
        self._sources[source] = state
        return state

    def _names(self) -> tuple[str | None, ...]:
        if self._names_snapshot is None:
            self._names_snapshot = tuple(self._holder_names)
        return self._names_snapshot

    def _ensure_holder_bits(self, num_holders: int) -> None:
        """Widen the mask words (8 → 16 → 32 → 64 bits), then add 64-bit words."""
        num_words = self._masks.shape[2]
        if num_holders <= self._word_bits * num_words:
            return
        if self._word_bits < 64:
            while self._word_bits < num_holders and self._word_bits < 64:
                self._word_bits *= 2
            dtype = _WORD_DTYPES[self._word_bits.bit_length() - 4]
            self._masks = self._masks.astype(dtype)
            if num_holders <= self._word_bits:
                return
        words = -(-num_holders // 64)
        wider = np.zeros((len(self._masks), NUM_TIERS, words), dtype=self._masks.dtype)
        wider[:, :, : self._masks.shape[2]] = self._masks
        self._masks = wider

    def _holder_bit(self, holder: int) -> tuple[int, Any, Any]:
        """(word, bit value, inverted bit value) of a holder id, in the mask dtype."""
        word, bit = divmod(holder, self._word_bits)
        value = np.array(1 << bit, dtype=self._masks.dtype)
        return word, value, ~value

    # -- blocks -------------------------------------------------------------------------------

    def _store(self, holder: int, tier: Tier, keys: Iterable[BlockKey]) -> None:
        unique = list(dict.fromkeys(keys))
        word, bit, _ = self._holder_bit(holder)
        for start in range(0, len(unique), _BATCH):
            query = _key_array(unique[start : start + _BATCH])
            _, slots = self._find(query)
            new = slots < 0
            if new.any():
                new_keys = query[new]
                self._reserve_table(len(new_keys))
                new_slots = self._allocate_slots(len(new_keys))
                self._keys[new_slots] = new_keys
                self._table_insert(new_keys, new_slots)
                slots[new] = new_slots
                self._num_blocks += len(new_slots)
            self._masks[slots, tier, word] |= bit

    def _remove(self, holder: int, tier: Tier, keys: Iterable[BlockKey]) -> None:
        unique = list(dict.fromkeys(keys))
        word, _, clear = self._holder_bit(holder)
        for start in range(0, len(unique), _BATCH):
            cells, slots = self._find(_key_array(unique[start : start + _BATCH]))
            present = slots >= 0
            cells, slots = cells[present], slots[present]
            self._masks[slots, tier, word] &= clear
            empty = ~self._masks[slots].any(axis=(1, 2))
            if empty.any():
                self._release_slots(slots[empty], cells[empty])

    def _clear_holder(self, holder: int) -> None:
        """Drop every bit of ``holder`` (O(slots), vectorised) and free the slots left empty."""
        used = self._num_used_slots
        word, bit, clear = self._holder_bit(holder)
        held = np.flatnonzero((self._masks[:used, :, word] & bit).any(axis=1))
        if not held.size:
            return
        self._masks[held, :, word] &= clear
        empty = held[~self._masks[held].any(axis=(1, 2))]
        for start in range(0, len(empty), _BATCH):
            batch = empty[start : start + _BATCH]
            cells, found = self._find(self._keys[batch])
            assert np.array_equal(found, batch), "live slots are in the table"
            self._release_slots(batch, cells)

    # -- slots ----------------------------------------------------------------------------------

    def _allocate_slots(self, n: int) -> I64Array:
        reused = min(n, self._num_free_slots)
        top = self._num_free_slots
        parts = [self._free_slots[top - reused : top][::-1].copy()]
        self._num_free_slots -= reused
        fresh = n - reused
        if fresh:
            start = self._num_used_slots
            if start + fresh > len(self._keys):
                self._grow_slots(start + fresh)
            parts.append(np.arange(start, start + fresh, dtype=np.int64))
            self._num_used_slots += fresh
        return np.concatenate(parts)

    def _release_slots(self, slots: I64Array, cells: I64Array) -> None:
        """Return emptied slots (their masks are already zero) and tombstone their cells."""
        self._table[cells] = _DELETED
        self._num_tombstones += len(cells)
        self._num_blocks -= len(slots)
        top = self._num_free_slots
        if top + len(slots) > len(self._free_slots):
            grown = np.zeros(max(2 * len(self._free_slots), top + len(slots)), dtype=np.int64)
            grown[:top] = self._free_slots[:top]
            self._free_slots = grown
        self._free_slots[top : top + len(slots)] = slots
        self._num_free_slots += len(slots)

    def _grow_slots(self, needed: int) -> None:
        capacity = max(needed, 2 * len(self._keys))
        keys = np.zeros((capacity, 2), dtype=np.uint64)
        keys[: len(self._keys)] = self._keys
        masks = np.zeros((capacity, *self._masks.shape[1:]), dtype=self._masks.dtype)
        masks[: len(self._masks)] = self._masks
        self._keys, self._masks = keys, masks
        self._keys_void = keys.view(_KEY_VOID)[:, 0]

    # -- key -> slot table --------------------------------------------------------------------

    def _home(self, query: U64Array) -> U64Array:
        """Home cell of each key: ``(a1 * low + a2 * high) mod 2**64 >> (64 - log2 size)``.

        Both words count (keys from a good hash are uniform anyway, but nothing breaks if a
        source's keys share a word), and the random odd multipliers keep cells unpredictable.
        """
        mixed: U64Array = query[:, 0] * self._multipliers[0]
        mixed += query[:, 1] * self._multipliers[1]
        home: U64Array = mixed >> self._shift
        return home

    def _find(self, query: U64Array) -> tuple[I64Array, I64Array]:
        """(cell, slot) of each key in ``query`` (n x 2 uint64), or (-1, -1) where absent.

        Each key's first :data:`_WINDOW` cells are gathered at once. A present key sits before
        the first empty cell of its run, so a hit in the window is the answer and a window
        without a hit but with an empty cell is a miss; only runs longer than the window (rare at
        load ≤ 0.5) are followed one cell at a time.
        """
        n = len(query)
        home = self._home(query)
        offsets = (home[:, None] + _WINDOW_OFFSETS) & self._table_mask
        cells = self._table[offsets]
        hit = self._keys_void[np.maximum(cells, 0)] == query.view(_KEY_VOID)  # 16 bytes at once
        hit &= cells >= 0
        flat = hit.argmax(axis=1) + np.arange(0, n * _WINDOW, _WINDOW)
        found = hit.ravel()[flat]
        slots = np.where(found, cells.ravel()[flat], -1).astype(np.int64)
        where = offsets.ravel()[flat].astype(np.int64)
        where[~found] = -1
        longer = ~found & (cells != _EMPTY).all(axis=1)
        if longer.any():
            self._find_slowly(query, home, np.flatnonzero(longer), slots, where)
        return where, slots

    def _find_slowly(
        self, query: U64Array, home: U64Array, rows: I64Array, slots: I64Array, where: I64Array
    ) -> None:
        """Continue the probes of ``rows`` past the window, one cell at a time."""
        mask = int(self._table_mask)
        for row in rows.tolist():
            cell = (int(home[row]) + _WINDOW) & mask
            want = query[row].tobytes()
            while (slot := int(self._table[cell])) != _EMPTY:
                if slot >= 0 and self._keys[slot].tobytes() == want:
                    slots[row], where[row] = slot, cell
                    break
                cell = (cell + 1) & mask

    def _reserve_table(self, extra: int) -> None:
        """Make room for ``extra`` new keys: purge tombstones, doubling if live keys need it."""
        size = len(self._table)
        if self._num_blocks + self._num_tombstones + extra <= size * _MAX_LOAD:
            return
        if self._num_blocks + extra > size * _MAX_LOAD / 2:
            size *= 2  # mostly live keys: grow; mostly tombstones: just purge them
        while self._num_blocks + extra > size * _MAX_LOAD:
            size *= 2  # one huge batch
        used = self._num_used_slots
        live = np.flatnonzero(self._masks[:used].any(axis=(1, 2)))
        self._table = np.full(size, _EMPTY, dtype=np.int32)
        self._table_mask = np.uint64(size - 1)
        self._shift = np.uint64(64 - (size.bit_length() - 1))
        self._num_tombstones = 0
        for start in range(0, len(live), _BATCH):
            batch = live[start : start + _BATCH]
            self._table_insert(self._keys[batch], batch)

    def _table_insert(self, keys: U64Array, slots: I64Array) -> None:
        """Insert keys known to be absent (and distinct) at the first free cell of their run."""
        table = self._table
        position = self._home(keys)
        pending = np.arange(len(keys))
        while pending.size:
            offsets = (position[pending, None] + _WINDOW_OFFSETS) & self._table_mask
            free = table[offsets] < 0
            flat = free.argmax(axis=1) + np.arange(0, len(pending) * _WINDOW, _WINDOW)
            has_free = free.ravel()[flat]
            position[pending[~has_free]] += np.uint64(_WINDOW)  # run goes on past the window
            rows, cells = pending[has_free], offsets.ravel()[flat[has_free]]
            # Several keys may pick the same cell: one write lands (whichever), the others see
            # someone else's slot there and retry; that cell is taken now, so they move on.
            reused = table[cells] == _DELETED
            table[cells] = slots[rows]
            won = table[cells] == slots[rows]
            self._num_tombstones -= int(np.count_nonzero(reused & won))
            pending = np.concatenate((pending[~has_free], rows[~won]))


def _key_array(keys: Sequence[BlockKey]) -> U64Array:
    """View a list of 16-byte keys as an (n, 2) uint64 array (one copy, by ``bytes.join``)."""
    joined = b"".join(keys)
    if len(joined) != BLOCK_KEY_BYTES * len(keys) or set(map(len, keys)) != {BLOCK_KEY_BYTES}:
        raise ValueError(f"block keys are {BLOCK_KEY_BYTES} bytes each")
    return np.frombuffer(joined, dtype=np.uint64).reshape(len(keys), 2)
