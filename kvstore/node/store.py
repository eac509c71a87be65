"""StoreNode: the single owner of a node's blocks (index, arena space, leases, eviction).

Everything that changes which blocks exist goes through this class; the server and the tests call
its methods and get small frozen results back, never its entries. The object lifecycle it enforces
is the design of record in docs/design/kvstore.md; in short:

* **Two-phase put.** :meth:`begin_put` reserves arena space and records the key as ``WRITING``
  (invisible to readers and to eviction); the caller fills the returned view (the server receives
  the socket payload straight into it) and then calls :meth:`commit` -- the block becomes visible
  and evictable -- or :meth:`revoke` -- the space is returned. A put whose writer disappears
  (connection lost, put timeout) is revoked by the server, so a half-written block is never read.
* **Leases.** :meth:`acquire` pins a committed block for a reader and returns a :class:`Lease`;
  eviction skips leased blocks, and :meth:`delete` of a leased block unlinks it at once but frees
  its space only at the last :meth:`release`. So a block can never be overwritten while a transfer
  reads it.
* **Eviction.** When the arena has no room, the injected
  :class:`~kvstore.policy.base.EvictionPolicy` proposes victims among committed, unleased blocks
  until the allocation fits; if none is left the put is refused with ``FULL`` (the node never
  grows past its arena).
* **Lower tiers** (kvstore.node.tiers drives these; the node never sees the SSD): a spill pins the
  coldest block with a lease (:meth:`pin_for_spill`), and :meth:`finish_spill` drops the DRAM copy
  only after the lower tier has committed it -- unless the block was read meanwhile. A read from a
  lower tier lands in a reserved extent: :meth:`promote` makes it a DRAM block, :meth:`detach`
  serves it once from a *transient* extent that never enters the index (``--no-promote``, or a
  promotion cancelled by DELETE); :meth:`begin_transient` reserves such an extent directly.

**Tier-change notifications.** With a listener (:meth:`set_listener`, a
:data:`~kvstore.blocks.tier.TierListener`) the node reports every change of what DRAM holds at the
point of change: ``(key, Tier.DRAM, True)`` when a block becomes visible (:meth:`commit`,
:meth:`promote`), ``(key, Tier.DRAM, False)`` when it leaves the index (:meth:`delete`, eviction,
:meth:`finish_spill`, :meth:`drop_copy`). Reservations, revokes and transient extents never were
visible, so they report nothing. The store's :class:`~kvstore.cluster.membership.NodeAgent` turns
these into KV events.

Not thread-safe by design: the node belongs to the server's event-loop thread, which makes every
operation atomic without locks.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from kvstore.blocks.hashing import BLOCK_KEY_BYTES
from kvstore.blocks.tier import Tier, TierListener
from kvstore.node.arena import Arena, ArenaStats, Extent
from kvstore.policy.base import EvictionPolicy
from kvstore.policy.lru import LRUPolicy
from kvstore.wire.types import PutStatus

__all__ = ["EntryState", "Lease", "NodeStats", "PendingPut", "StoreNode"]


class EntryState(enum.Enum):
    WRITING = "writing"
    COMMITTED = "committed"


@dataclass(slots=True)
class _Entry:
    key: bytes
    extent: Extent
    nbytes: int
    state: EntryState
    write_id: int
    leases: int = 0
    last_access_s: float = 0.0
    unlinked: bool = False  # removed from the index while leased; freed at the last release
    transient: bool = False  # reserved outside the index (begin_transient); never committed


@dataclass(frozen=True, slots=True)
class PendingPut:
    """A reserved, not yet visible block: fill ``view`` (exactly ``nbytes``), then commit/revoke."""

    key: bytes
    nbytes: int
    view: memoryview
    write_id: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A read pin on a committed block. ``view`` is valid until :meth:`StoreNode.release`."""

    lease_id: int
    key: bytes
    offset: int
    nbytes: int
    view: memoryview


@dataclass(frozen=True, slots=True)
class NodeStats:
    """Counters and occupancy of a node (``asdict`` gives the STATS JSON)."""

    num_blocks: int
    num_writing: int
    num_leases: int
    stored_bytes: int
    arena: ArenaStats
    hits: int
    misses: int
    puts: int
    puts_exists: int
    puts_full: int
    puts_revoked: int
    evictions: int
    deletes: int


class StoreNode:
    """Index of the blocks held in one :class:`Arena`, with two-phase puts, leases and eviction."""

    def __init__(
        self,
        arena: Arena,
        policy: EvictionPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._arena = arena
        self._policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._clock = clock
        self._entries: dict[bytes, _Entry] = {}
        self._transient: dict[int, _Entry] = {}  # write_id -> entry filled outside the index
        self._leases: dict[int, _Entry] = {}
        self._spill_stamps: dict[int, float] = {}  # spill lease id -> last access when pinned
        self._ids = itertools.count(1)
        self._num_writing = 0
        self._stored_bytes = 0
        self._hits = self._misses = 0
        self._puts = self._puts_exists = self._puts_full = self._puts_revoked = 0
        self._evictions = self._deletes = 0
        self._listener: TierListener | None = None

    def set_listener(self, listener: TierListener | None) -> None:
        """Report every block that enters or leaves DRAM to ``listener`` (None: stop)."""
        self._listener = listener

    @property
    def arena(self) -> Arena:
        return self._arena

    def arena_usage(self) -> float:
        """Fraction of the arena allocated (blocks, reservations and transient extents)."""
        stats = self._arena.stats()
        return stats.used_bytes / stats.capacity_bytes

    # -- writes -------------------------------------------------------------------------------

    def begin_put(self, key: bytes, nbytes: int) -> PendingPut | PutStatus:
        """Reserve ``nbytes`` for ``key``, evicting if needed.

        Returns a :class:`PendingPut` to fill, or ``EXISTS`` (committed, or another writer is
        storing it: keys name content, so the other writer stores the same bytes) or ``FULL``.
        """
        _check_key(key)
        if nbytes <= 0:
            raise ValueError(f"block size must be positive, got {nbytes}")
        entry = self._entries.get(key)
        if entry is not None:
            self._puts_exists += 1
            if entry.state is EntryState.COMMITTED:
                entry.last_access_s = self._clock()
                self._policy.on_access(key)
            return PutStatus.EXISTS
        extent = self._allocate(nbytes)
        if extent is None:
            self._puts_full += 1
            return PutStatus.FULL
        write_id = next(self._ids)
        self._entries[key] = _Entry(key, extent, nbytes, EntryState.WRITING, write_id)
        self._num_writing += 1
        return PendingPut(key, nbytes, self._arena.view(extent, nbytes), write_id)

    def commit(self, pending: PendingPut) -> None:
        """Make a filled block visible to readers and to eviction."""
        entry = self._writing_entry(pending)
        if entry is None:
            raise ValueError(f"no pending put {pending.write_id} for key {pending.key.hex()}")
        entry.state = EntryState.COMMITTED
        entry.last_access_s = self._clock()
        self._num_writing -= 1
        self._stored_bytes += entry.nbytes
        self._puts += 1
        self._policy.on_insert(entry.key)
        if self._listener is not None:
            self._listener(entry.key, Tier.DRAM, True)

    def revoke(self, pending: PendingPut) -> bool:
        """Abandon a pending put and free its space; False if it was no longer pending."""
        entry = self._writing_entry(pending)
        if entry is None:
            return False
        self._forget_writing(entry)
        if not entry.transient:
            self._puts_revoked += 1
        self._arena.free(entry.extent)
        return True

    def begin_transient(self, key: bytes, nbytes: int) -> PendingPut | PutStatus:
        """Reserve an extent outside the index (evicting if needed) to stage a block for one read.

        The staged block is invisible to lookups and never committed: fill it, then :meth:`detach`
        it (a lease that frees the extent at release) or :meth:`revoke` it. Returns ``FULL`` if
        no room can be made.
        """
        _check_key(key)
        if nbytes <= 0:
            raise ValueError(f"block size must be positive, got {nbytes}")
        extent = self._allocate(nbytes)
        if extent is None:
            return PutStatus.FULL
        write_id = next(self._ids)
        entry = _Entry(key, extent, nbytes, EntryState.WRITING, write_id, transient=True)
        self._transient[write_id] = entry
        return PendingPut(key, nbytes, self._arena.view(extent, nbytes), write_id)

    def promote(self, pending: PendingPut) -> Lease:
        """Commit a block filled from a lower tier and lease it to the reader that asked for it.

        Like :meth:`commit` then :meth:`acquire`, but counted as neither a put nor a hit (the
        tier manager counts promotions and lower-tier hits).
        """
        entry = self._writing_entry(pending)
        if entry is None or entry.transient:
            raise ValueError(f"no pending put {pending.write_id} for key {pending.key.hex()}")
        entry.state = EntryState.COMMITTED
        entry.last_access_s = self._clock()
        self._num_writing -= 1
        self._stored_bytes += entry.nbytes
        self._policy.on_insert(entry.key)
        if self._listener is not None:
            self._listener(entry.key, Tier.DRAM, True)
        return self._lease(entry)

    def detach(self, pending: PendingPut) -> Lease:
        """Turn a filled pending block into a one-off read: leased, out of the index, freed at
        the last release. For reads from a lower tier that must not (or may no longer) be
        promoted."""
        entry = self._writing_entry(pending)
        if entry is None:
            raise ValueError(f"no pending put {pending.write_id} for key {pending.key.hex()}")
        self._forget_writing(entry)
        entry.state = EntryState.COMMITTED
        entry.unlinked = True
        return self._lease(entry)

    def put(self, key: bytes, data: bytes | bytearray | memoryview) -> PutStatus:
        """Store ``data`` under ``key`` in one call (begin, copy, commit)."""
        source = memoryview(data).cast("B")
        pending = self.begin_put(key, source.nbytes)
        if isinstance(pending, PutStatus):
            return pending
        pending.view[:] = source
        self.commit(pending)
        return PutStatus.OK

    # -- reads --------------------------------------------------------------------------------

    def acquire(self, key: bytes) -> Lease | None:
        """Pin a committed block for reading (counts as an access); None on a miss."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not EntryState.COMMITTED:
            self._misses += 1
            return None
        self._hits += 1
        entry.last_access_s = self._clock()
        self._policy.on_access(key)
        return self._lease(entry)

    def pin(self, key: bytes) -> Lease | None:
        """Lease a committed block for a background copy (write-behind to SSD) without counting
        an access: a copy made for durability must not make the block look hot."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not EntryState.COMMITTED:
            return None
        return self._lease(entry)

    def release(self, lease: Lease) -> None:
        """End a read pin. Releasing twice is a bug and raises ValueError."""
        entry = self._leases.pop(lease.lease_id, None)
        if entry is None:
            raise ValueError(f"lease {lease.lease_id} is not held")
        self._spill_stamps.pop(lease.lease_id, None)
        entry.leases -= 1
        if entry.leases == 0 and entry.unlinked:
            self._arena.free(entry.extent)

    def get(self, key: bytes) -> bytes | None:
        """Return a copy of the block, or None (convenience for in-process use and tests)."""
        lease = self.acquire(key)
        if lease is None:
            return None
        try:
            return bytes(lease.view)
        finally:
            self.release(lease)

    def contains(self, key: bytes) -> bool:
        """True if ``key`` is committed. Does not count as an access."""
        entry = self._entries.get(key)
        return entry is not None and entry.state is EntryState.COMMITTED

    def iter_keys(self) -> Iterator[bytes]:
        """The committed keys now (a snapshot)."""
        return iter([k for k, e in self._entries.items() if e.state is EntryState.COMMITTED])

    def exists(self, keys: Iterable[bytes]) -> list[bool]:
        """``contains`` for each key. Does not count as an access."""
        return [self.contains(key) for key in keys]

    def match_prefix(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys of a key chain that are committed here.

        A lookup, not an access: the scheduler probes several nodes per request and only the one
        it picks will read, so probing must not distort recency.
        """
        for i, key in enumerate(keys):
            if not self.contains(key):
                return i
        return len(keys)

    # -- removal ------------------------------------------------------------------------------

    def delete(self, keys: Iterable[bytes]) -> int:
        """Remove committed blocks; returns how many were removed.

        Blocks being written are not touched (their writer commits or revokes them). A leased
        block disappears from the index now and its space is freed at the last release.
        """
        removed = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry.state is EntryState.COMMITTED:
                self._unlink(entry)
                removed += 1
        self._deletes += removed
        return removed

    # -- spilling to a lower tier -------------------------------------------------------------

    def coldest_evictable(self) -> bytes | None:
        """The block the policy would evict next (committed, unleased), or None. A lookup only."""
        return self._policy.select_victim(self._can_evict)

    def pin_for_spill(self, key: bytes) -> Lease:
        """Lease a committed block so that a spill can copy it out; not an access.

        The lease keeps eviction, DELETE and new puts from freeing or reusing its bytes while a
        writer thread reads them. End it with :meth:`finish_spill`.
        """
        entry = self._entries.get(key)
        if entry is None or entry.state is not EntryState.COMMITTED:
            raise KeyError(f"no committed block {key.hex()}")
        lease = self._lease(entry)
        self._spill_stamps[lease.lease_id] = entry.last_access_s
        return lease

    def finish_spill(self, lease: Lease, stored: bool) -> bool:
        """End a spill pin; drop the DRAM copy if the lower tier ``stored`` it. True if dropped.

        The copy stays if the block was read (an access) since it was pinned -- it is hot again
        and the lower tier's copy will make its next spill free -- or if it was deleted or
        replaced meanwhile.
        """
        entry = self._leases.get(lease.lease_id)
        stamp = self._spill_stamps.get(lease.lease_id)
        self.release(lease)
        if not stored or entry is None or self._entries.get(entry.key) is not entry:
            return False  # not written, or deleted/replaced meanwhile
        if entry.last_access_s != stamp:
            return False  # read since it was pinned: hot again
        self._unlink(entry)
        return True

    def drop_copy(self, key: bytes) -> bool:
        """Remove a committed, unleased block whose data is safe in a lower tier (a clean spill).

        Not counted as an eviction or a delete. False if the block is absent, being written, or
        leased.
        """
        entry = self._entries.get(key)
        if entry is None or entry.state is not EntryState.COMMITTED or entry.leases:
            return False
        self._unlink(entry)
        return True

    def stats(self) -> NodeStats:
        return NodeStats(
            num_blocks=len(self._entries) - self._num_writing,
            num_writing=self._num_writing + len(self._transient),
            num_leases=len(self._leases),
            stored_bytes=self._stored_bytes,
            arena=self._arena.stats(),
            hits=self._hits,
            misses=self._misses,
            puts=self._puts,
            puts_exists=self._puts_exists,
            puts_full=self._puts_full,
            puts_revoked=self._puts_revoked,
            evictions=self._evictions,
            deletes=self._deletes,
        )

    # -- internals ----------------------------------------------------------------------------

    def _allocate(self, nbytes: int) -> Extent | None:
        if nbytes > self._arena.size:
            return None
        while (extent := self._arena.allocate(nbytes)) is None:
            victim = self._policy.select_victim(self._can_evict)
            if victim is None:
                return None
            self._unlink(self._entries[victim])
            self._evictions += 1
        return extent

    def _can_evict(self, key: bytes) -> bool:
        return self._entries[key].leases == 0

    def _unlink(self, entry: _Entry) -> None:
        del self._entries[entry.key]
        self._policy.on_remove(entry.key)
        self._stored_bytes -= entry.nbytes
        if entry.leases:
            entry.unlinked = True
        else:
            self._arena.free(entry.extent)
        if self._listener is not None:
            self._listener(entry.key, Tier.DRAM, False)

    def _lease(self, entry: _Entry) -> Lease:
        entry.leases += 1
        lease_id = next(self._ids)
        self._leases[lease_id] = entry
        view = self._arena.view(entry.extent, entry.nbytes)
        return Lease(lease_id, entry.key, entry.extent.offset, entry.nbytes, view)

    def _forget_writing(self, entry: _Entry) -> None:
        """Take a WRITING entry out of the index (or the transient table)."""
        if entry.transient:
            del self._transient[entry.write_id]
        else:
            del self._entries[entry.key]
            self._num_writing -= 1

    def _writing_entry(self, pending: PendingPut) -> _Entry | None:
        transient = self._transient.get(pending.write_id)
        if transient is not None:
            return transient if transient.key == pending.key else None
        entry = self._entries.get(pending.key)
        if (
            entry is None
            or entry.state is not EntryState.WRITING
            or entry.write_id != pending.write_id
        ):
            return None
        return entry


def _check_key(key: bytes) -> None:
    if len(key) != BLOCK_KEY_BYTES:
        raise ValueError(f"block keys are {BLOCK_KEY_BYTES} bytes, got {len(key)}")
