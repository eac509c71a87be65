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
* **Eviction.** When the arena has no room, the injected :class:`~kvstore.policy.EvictionPolicy`
  proposes victims among committed, unleased blocks until the allocation fits; if none is left the
  put is refused with ``FULL`` (the node never grows past its arena).

Not thread-safe by design: the node belongs to the server's event-loop thread, which makes every
operation atomic without locks.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvstore.arena import Arena, ArenaStats, Extent
from kvstore.hashing import BLOCK_KEY_BYTES
from kvstore.policy import EvictionPolicy, LRUPolicy

__all__ = ["EntryState", "Lease", "NodeStats", "PendingPut", "PutStatus", "StoreNode"]


class PutStatus(enum.IntEnum):
    """Outcome of a put. Values are also the wire status codes (kvstore.protocol)."""

    OK = 0
    """Stored."""
    EXISTS = 1
    """Already stored or being stored under this key; nothing was changed."""
    FULL = 2
    """No room even after evicting every evictable block; nothing was stored."""


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
        self._leases: dict[int, _Entry] = {}
        self._ids = itertools.count(1)
        self._num_writing = 0
        self._stored_bytes = 0
        self._hits = self._misses = 0
        self._puts = self._puts_exists = self._puts_full = self._puts_revoked = 0
        self._evictions = self._deletes = 0

    @property
    def arena(self) -> Arena:
        return self._arena

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

    def revoke(self, pending: PendingPut) -> bool:
        """Abandon a pending put and free its space; False if it was no longer pending."""
        entry = self._writing_entry(pending)
        if entry is None:
            return False
        del self._entries[entry.key]
        self._num_writing -= 1
        self._puts_revoked += 1
        self._arena.free(entry.extent)
        return True

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
        entry.leases += 1
        entry.last_access_s = self._clock()
        self._policy.on_access(key)
        lease_id = next(self._ids)
        self._leases[lease_id] = entry
        view = self._arena.view(entry.extent, entry.nbytes)
        return Lease(lease_id, key, entry.extent.offset, entry.nbytes, view)

    def release(self, lease: Lease) -> None:
        """End a read pin. Releasing twice is a bug and raises ValueError."""
        entry = self._leases.pop(lease.lease_id, None)
        if entry is None:
            raise ValueError(f"lease {lease.lease_id} is not held")
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

    def stats(self) -> NodeStats:
        return NodeStats(
            num_blocks=len(self._entries) - self._num_writing,
            num_writing=self._num_writing,
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

    def _writing_entry(self, pending: PendingPut) -> _Entry | None:
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
