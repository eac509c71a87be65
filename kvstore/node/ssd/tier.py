"""``SSDTier``: a store node's SSD tier on lmdb (design notes: :mod:`kvstore.node.ssd`)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import lmdb
import numpy as np

from kvstore.blocks.format import BLOCK_HEADER_BYTES
from kvstore.blocks.hashing import BLOCK_KEY_BYTES
from kvstore.blocks.tier import Tier, TierListener
from kvstore.node.ssd.files import (
    ENTRY_OVERHEAD,
    LMDB_PAGE_HEADER,
    MIB,
    SYNC_MODES,
    audit_files,
    check_format,
    check_key,
    decode_meta,
    encode_meta,
    is_block,
    madvise,
    mapping_start,
    open_environment,
    prefetch,
    take_directory_lock,
    write_batch_limit,
)
from kvstore.node.ssd.types import AuditReport, Meta, ReadStatus, SSDRead, SSDStats
from kvstore.policy.base import EvictionPolicy
from kvstore.policy.lru import LRUPolicy
from strata_common.closing import Closeable

__all__ = ["SSDTier", "logger"]


logger = logging.getLogger("kvstore.node.ssd")


class SSDTier(Closeable):
    """Blocks in one lmdb environment at ``path``, at most ``capacity_bytes`` on disk.

    Args:
        path: directory (created if missing); one node at a time (an exclusive ``flock``).
        capacity_bytes: lmdb ``map_size``; blocks fill it up to :attr:`budget_bytes`.
        ttl_s: a block expires this long after it was written.
        sync: ``"data"`` (fdatasync per commit; default), ``"full"`` or ``"none"`` -- see
            docs/design/kvstore.md §7.2.
        policy: capacity eviction order (default LRU).
        clock: wall-clock seconds (expiry survives restarts); injected by tests.
        read_threads: expected concurrent readers (sizes lmdb's spare read transactions).
    """

    def __init__(
        self,
        path: str,
        capacity_bytes: int,
        ttl_s: float = 24 * 3600.0,
        *,
        sync: str = "data",
        policy: EvictionPolicy | None = None,
        clock: Callable[[], float] = time.time,
        read_threads: int = 8,
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        capacity = capacity_bytes - capacity_bytes % 4096
        if capacity < 16 * MIB:
            raise ValueError("capacity_bytes must be at least 16 MiB")
        self.path = path
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._sync = sync
        self._policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._index: dict[bytes, Meta] = {}  # insertion (= write = expiry) order
        self._tombstones: set[bytes] = set()
        self._next_seq = 1
        self._used = self._stored = 0
        self._writes = self._write_bytes = self._write_failures = 0
        self._reads = self._read_bytes = 0
        self._evictions = self._expired = self._corrupt = self._deletes = 0
        self._map_full_retries = self._audit_repaired = 0
        self._closed = False
        self._listener: TierListener | None = None
        self._map_start: int | None = None
        self._prefetch_failures = 0
        self._batch_limit = write_batch_limit(capacity)
        # lmdb reuses pages freed by transaction N only from N + 2 on (the previous snapshot must
        # stay readable), so at capacity the file holds the live blocks plus the victims of the
        # last two batches plus the batch being written: three batches, plus 5 % for its own use.
        self._budget = capacity - (capacity // 20 + 3 * self._batch_limit + MIB)

        os.makedirs(path, mode=0o700, exist_ok=True)
        self._lock_fd = take_directory_lock(path)
        try:
            self._env = open_environment(path, capacity, sync, read_threads)
            self._page_size = int(self._env.stat()["psize"])
            self._blocks = self._env.open_db(b"blocks")
            self._meta = self._env.open_db(b"meta")
            self._info = self._env.open_db(b"info")
            check_format(self._env, self.path, self._info, self._blocks, self._meta)
            self._audit_at_open()
            self._load_index()
            if madvise is not None:
                self._map_start = mapping_start(
                    os.path.join(path, "data.mdb"), int(self._env.info()["map_size"])
                )
        except BaseException:
            if hasattr(self, "_env"):
                self._env.close()
            os.close(self._lock_fd)
            raise
        self._recovered = len(self._index)

    def set_listener(self, listener: TierListener | None) -> None:
        """Report every block that enters or leaves the SSD index to ``listener`` (None: stop).

        Reported at the change, under this tier's lock, on the thread that made it: a committed
        write (spill, write-behind) on the writer thread; capacity eviction (the writer), TTL
        sweep (the writer), a failed checksum (a reader thread), :meth:`unindex` (the caller).
        Blocks recovered at open are not reported (the listener is set afterwards: list them
        with :meth:`iter_keys`). An expired block is reported when the sweep removes it, though
        lookups miss from the instant it expires.
        """
        with self._lock:
            self._listener = listener

    # -- properties ---------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def budget_bytes(self) -> int:
        """What blocks may occupy (in lmdb pages); the rest of the map is lmdb's headroom."""
        return self._budget

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    @property
    def max_batch_bytes(self) -> int:
        """Bytes a caller should put per :meth:`put_many` call (one transaction)."""
        return self._batch_limit

    def block_cost(self, nbytes: int) -> int:
        """Bytes a block of ``nbytes`` occupies in the file: its overflow pages plus B-tree."""
        page = self._page_size
        return math.ceil((nbytes + LMDB_PAGE_HEADER) / page) * page + ENTRY_OVERHEAD

    # -- lookups (any thread, no disk I/O) -------------------------------------------------

    def lookup(self, key: bytes) -> int | None:
        """The stored block's length if ``key`` is on SSD and unexpired, else None."""
        with self._lock:
            meta = self._index.get(key)
            if meta is None or meta.expires_at_s <= self._clock():
                return None
            return meta.nbytes

    def contains(self, key: bytes) -> bool:
        return self.lookup(key) is not None

    def contains_many(self, keys: Iterable[bytes]) -> list[bool]:
        """``contains`` for each key under one lock acquisition."""
        with self._lock:
            now = self._clock()
            index = self._index
            return [(m := index.get(k)) is not None and m.expires_at_s > now for k in keys]

    def remaining_ttl(self, key: bytes) -> float | None:
        """Seconds until ``key`` expires, or None if it is not (or no longer) stored."""
        with self._lock:
            meta = self._index.get(key)
            if meta is None:
                return None
            left = meta.expires_at_s - self._clock()
            return left if left > 0 else None

    def iter_keys(self) -> Iterator[bytes]:
        """The keys stored and unexpired now (a snapshot, oldest write first)."""
        with self._lock:
            now = self._clock()
            keys = [k for k, m in self._index.items() if m.expires_at_s > now]
        return iter(keys)

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    # -- reads (any thread) --------------------------------------------------------------------

    def read_into(self, key: bytes, dest: memoryview) -> SSDRead:
        """Copy the stored block (header + payload) into ``dest`` and verify it there.

        ``dest`` must be a writable byte view at least as long as the block (:meth:`lookup`
        gives the length; a shorter ``dest`` raises ValueError). A hit counts as an access for
        the SSD policy.
        """
        with self._lock:
            meta = self._index.get(key)
        if meta is not None and dest.nbytes < meta.nbytes:
            raise ValueError(f"destination of {dest.nbytes} bytes < block of {meta.nbytes}")
        try:
            with self._env.begin(db=self._blocks, buffers=True) as txn:
                start, psize = self._map_start, self._page_size
                if start is not None and not prefetch(txn, key, start, psize, self._capacity):
                    self._prefetch_failed()
                value = txn.get(key)
                if value is None and meta is None:
                    return SSDRead(ReadStatus.MISS)
                # Indexed without a block (a meta orphan) is corrupt too: dropped below.
                nbytes = 0 if value is None else len(value)
                fits = value is not None and BLOCK_HEADER_BYTES <= nbytes <= dest.nbytes
                if fits and value is not None:
                    target = np.frombuffer(dest, dtype=np.uint8, count=nbytes)
                    np.copyto(target, np.frombuffer(value, dtype=np.uint8))
        except lmdb.Error as exc:
            logger.error("SSD read of %s failed: %s; treating it as a miss", key.hex(), exc)
            return SSDRead(ReadStatus.MISS)
        if not fits or not is_block(key, dest[:nbytes]):
            self._drop_corrupt(key)
            return SSDRead(ReadStatus.CORRUPT)
        with self._lock:
            self._reads += 1
            self._read_bytes += nbytes
            if key in self._index:
                self._policy.on_access(key)
        return SSDRead(ReadStatus.OK, nbytes)

    def get(self, key: bytes) -> bytes | None:
        """The stored block (header + payload), verified, or None. For tools and tests: it
        allocates, and purges a corrupt block itself (so call it from the writer's thread)."""
        nbytes = self.lookup(key)
        if nbytes is None:
            return None
        buffer = bytearray(nbytes)
        result = self.read_into(key, memoryview(buffer))
        if result.status is ReadStatus.CORRUPT:
            self.purge_pending()
        return bytes(buffer) if result.status is ReadStatus.OK else None

    # -- writes (one thread at a time) --------------------------------------------------------

    def put_many(self, items: Sequence[tuple[bytes, memoryview | bytes | bytearray]]) -> list[bool]:
        """Store blocks (header + payload each) in one transaction; True per block stored.

        Makes room first by evicting in policy order, in the same transaction. A block bigger
        than the budget, or a batch that fails (disk error; no room even after a retry), is
        reported False and nothing of it is visible. Re-putting a key replaces it and restarts
        its TTL. Never raises for lack of space.
        """
        results = [False] * len(items)
        writes: list[tuple[int, bytes, memoryview, Meta]] = []
        with self._lock:
            now = self._clock()
            need = 0
            for i, (key, data) in enumerate(items):
                check_key(key)
                view = memoryview(data).cast("B")
                cost = self.block_cost(view.nbytes)
                if view.nbytes < BLOCK_HEADER_BYTES or cost > self._budget:
                    self._write_failures += 1
                    continue
                old = self._index.get(key)
                need += cost - (self.block_cost(old.nbytes) if old is not None else 0)
                meta = Meta(view.nbytes, self._next_seq, now, now + self._ttl_s)
                self._next_seq += 1
                writes.append((i, key, view, meta))
            if not writes:
                return results
            batch_keys = {key for _, key, _, _ in writes}
            victims = self._evict_locked(self._used + need - self._budget, batch_keys)
        entries = [(key, view, meta) for _, key, view, meta in writes]
        try:
            self._write(victims, entries)
        except lmdb.MapFullError:
            if not self._retry_after_map_full(victims, entries, need, batch_keys):
                return results
        except lmdb.Error as exc:
            logger.error("SSD write of %d blocks failed: %s", len(entries), exc)
            with self._lock:
                self._write_failures += len(entries)
            self._delete_quietly(victims)
            return results
        with self._lock:
            for i, key, view, meta in writes:
                results[i] = True
                self._writes += 1
                self._write_bytes += view.nbytes
                if key not in self._tombstones:  # deleted while queued: the purge follows
                    self._index_locked(key, meta)
        return results

    def put(self, key: bytes, block: memoryview | bytes | bytearray) -> bool:
        """:meth:`put_many` of one block."""
        return self.put_many([(key, block)])[0]

    def unindex(self, keys: Iterable[bytes]) -> list[bytes]:
        """Remove keys from the index now (lookups miss at once); :meth:`purge_pending` deletes
        them from the file. Returns the keys that were present. Callable from any thread."""
        removed = []
        with self._lock:
            for key in keys:
                if key in self._index:
                    self._unindex_locked(key)
                    self._tombstones.add(key)
                    removed.append(key)
            self._deletes += len(removed)
        return removed

    def delete(self, keys: Iterable[bytes]) -> int:
        """Remove blocks (index and file); returns how many were present. Writer thread."""
        removed = self.unindex(keys)
        self.purge_pending()
        return len(removed)

    def purge_pending(self) -> int:
        """Delete from the file every key removed from the index by :meth:`unindex` or a failed
        checksum. Writer thread."""
        with self._lock:
            keys = list(self._tombstones)
        if not keys:
            return 0
        if self._delete_quietly(keys):
            with self._lock:
                self._tombstones.difference_update(keys)
        return len(keys)

    def sweep_expired(self) -> int:
        """Delete every expired block; returns how many. Writer thread. O(expired)."""
        with self._lock:
            now = self._clock()
            expired = []
            for key, meta in self._index.items():
                if meta.expires_at_s > now:
                    break  # write order is expiry order
                expired.append(key)
            for key in expired:
                self._unindex_locked(key)
            self._expired += len(expired)
        if expired:
            self._delete_quietly(expired)
        return len(expired)

    # -- audit, stats, lifecycle ------------------------------------------------------------

    def audit(self, repair: bool = False, verify_checksums: bool = False) -> AuditReport:
        """Check that ``blocks`` and ``meta`` agree (and, optionally, every block's checksum).

        Run at open with ``repair=True``: orphans (a block without meta or meta without a block
        -- impossible with same-transaction writes, but a future format or a manual edit could
        leave them), unreadable meta and expired blocks are deleted. Without
        ``verify_checksums`` no payload page is read (a merge-join of the two key orders).
        Call it from the writer's thread once the tier is open.
        """
        report, doomed = audit_files(
            self._env, self._blocks, self._meta, self._clock(), verify_checksums
        )
        if repair and doomed:
            self._write(doomed, [])
            with self._lock:
                for key in doomed:
                    if key in self._index:
                        self._unindex_locked(key)
                self._expired += report.expired
                self._corrupt += report.corrupt
                self._audit_repaired += len(doomed) - report.expired
            logger.warning(
                "SSD tier %s: audit removed %d entries: %s", self.path, len(doomed), report
            )
        return report

    def _audit_at_open(self) -> None:
        """The full :meth:`audit` only if the two databases disagree in size.

        Walking ``blocks`` costs one random 4 KiB read per block (lmdb checks each value's first
        page), so a clean open -- same-transaction writes keep the counts equal -- only compares
        the counts and lets :meth:`_load_index` drop expired or unreadable meta.
        """
        with self._env.begin() as txn:
            num_blocks = txn.stat(self._blocks)["entries"]
            num_meta = txn.stat(self._meta)["entries"]
        if num_blocks != num_meta:
            logger.warning(
                "SSD tier %s: %d blocks but %d meta records; auditing",
                self.path,
                num_blocks,
                num_meta,
            )
            self.audit(repair=True)

    def stats(self) -> SSDStats:
        with self._lock:
            return SSDStats(
                path=self.path,
                sync=self._sync,
                ttl_s=self._ttl_s,
                capacity_bytes=self._capacity,
                budget_bytes=self._budget,
                num_blocks=len(self._index),
                stored_bytes=self._stored,
                used_bytes=self._used,
                writes=self._writes,
                write_bytes=self._write_bytes,
                write_failures=self._write_failures,
                reads=self._reads,
                read_bytes=self._read_bytes,
                evictions=self._evictions,
                expired=self._expired,
                corrupt_dropped=self._corrupt,
                deletes=self._deletes,
                map_full_retries=self._map_full_retries,
                recovered_blocks=self._recovered,
                audit_repaired=self._audit_repaired,
            )

    def sync(self) -> None:
        """Flush everything committed to disk (also the meta page ``"data"`` mode defers)."""
        self._env.sync(True)

    def close(self) -> None:
        """Flush, close lmdb, release the directory lock. Idempotent. No reads or writes may be
        in flight (the tier manager shuts its threads down first)."""
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(lmdb.Error):
                self._env.sync(True)
            self._env.close()
        finally:
            os.close(self._lock_fd)

    # -- internals --------------------------------------------------------------------------

    def _load_index(self) -> None:
        now = self._clock()
        horizon = now + self._ttl_s
        loaded: list[tuple[bytes, Meta]] = []
        expired: list[bytes] = []
        unreadable: list[bytes] = []
        with self._env.begin(db=self._meta, buffers=True) as txn:
            for raw_key, raw_meta in txn.cursor():
                key = bytes(raw_key)
                meta = decode_meta(raw_meta)
                if meta is None or len(key) != BLOCK_KEY_BYTES:
                    unreadable.append(key)
                elif meta.expires_at_s <= now:
                    expired.append(key)
                else:
                    meta.expires_at_s = min(meta.expires_at_s, horizon)  # a shorter TTL applies
                    loaded.append((key, meta))
        if expired or unreadable:
            self._delete_quietly(expired + unreadable)
            with self._lock:
                self._expired += len(expired)
                self._audit_repaired += len(unreadable)
        with self._lock:
            for key, meta in sorted(loaded, key=lambda item: item[1].stored_at_s):
                self._index_locked(key, meta)  # policy order: oldest write is coldest
            # The index must be in expiry order for the sweep; ``_index_locked`` appended in
            # write order, which differs only where the clamp above applied.
            self._index = dict(sorted(self._index.items(), key=lambda kv: kv[1].expires_at_s))
            self._next_seq = 1 + max((m.seq for _, m in loaded), default=0)
            victims = self._evict_locked(self._used - self._budget, set())
        if victims:
            logger.warning("SSD tier %s over budget: evicted %d blocks", self.path, len(victims))
            self._delete_quietly(victims)

    def _index_locked(self, key: bytes, meta: Meta) -> None:
        replaced = key in self._index
        if replaced:  # a rewrite (TTL refresh): still on SSD, nothing to report
            self._unindex_locked(key, notify=False)
        self._index[key] = meta
        self._policy.on_insert(key)
        self._used += self.block_cost(meta.nbytes)
        self._stored += meta.nbytes
        if not replaced and self._listener is not None:
            self._listener(key, Tier.SSD, True)

    def _unindex_locked(self, key: bytes, notify: bool = True) -> None:
        meta = self._index.pop(key)
        self._policy.on_remove(key)
        self._used -= self.block_cost(meta.nbytes)
        self._stored -= meta.nbytes
        if notify and self._listener is not None:
            self._listener(key, Tier.SSD, False)

    def _evict_locked(self, excess: int, keep: set[bytes]) -> list[bytes]:
        """Unindex victims in policy order until ``excess`` bytes are freed; return them."""
        victims: list[bytes] = []
        while excess > 0:
            victim = self._policy.select_victim(lambda key: key not in keep)
            if victim is None:
                break
            excess -= self.block_cost(self._index[victim].nbytes)
            self._unindex_locked(victim)
            victims.append(victim)
        self._evictions += len(victims)
        return victims

    def _write(
        self, deletes: Sequence[bytes], puts: Sequence[tuple[bytes, memoryview, Meta]]
    ) -> None:
        """One write transaction: delete ``deletes``, store ``puts`` (block and meta together)."""
        with self._env.begin(write=True) as txn:
            for key in deletes:
                txn.delete(key, db=self._blocks)
                txn.delete(key, db=self._meta)
            for key, view, meta in puts:
                txn.put(key, view, db=self._blocks)
                txn.put(key, encode_meta(meta), db=self._meta)

    def _retry_after_map_full(
        self,
        victims: list[bytes],
        entries: list[tuple[bytes, memoryview, Meta]],
        need: int,
        keep: set[bytes],
    ) -> bool:
        """lmdb found no room although the budget said there was (a fragmented free list):
        evict twice the batch in a transaction of its own, commit one more (tiny) transaction so
        that the freed pages become reusable (lmdb frees them for transaction N + 2), then try
        the batch once more."""
        with self._lock:
            self._map_full_retries += 1
            extra = self._evict_locked(2 * max(need, self._batch_limit), keep)
        logger.warning("SSD tier %s is full (lmdb); evicting %d more blocks", self.path, len(extra))
        self._delete_quietly(victims + extra)
        try:
            with self._env.begin(write=True) as txn:
                txn.put(b"evicted_at", struct.pack("<d", self._clock()), db=self._info)
            self._write([], entries)
        except lmdb.Error as exc:
            logger.error("SSD write of %d blocks failed after eviction: %s", len(entries), exc)
            with self._lock:
                self._write_failures += len(entries)
            return False
        return True

    def _delete_quietly(self, keys: Sequence[bytes]) -> bool:
        if not keys:
            return True
        try:
            self._write(keys, [])
        except lmdb.Error as exc:
            # They are out of the index already; a restart's audit/TTL will catch them.
            logger.error("SSD delete of %d blocks failed: %s", len(keys), exc)
            return False
        return True

    def _prefetch_failed(self) -> None:
        self._prefetch_failures += 1
        if self._prefetch_failures == 1:
            err = ctypes.get_errno()
            logger.warning("SSD read prefetch failed: %s", errno.errorcode.get(err, err))

    def _drop_corrupt(self, key: bytes) -> None:
        with self._lock:
            if key not in self._index:
                return
            self._unindex_locked(key)
            self._tombstones.add(key)
            self._corrupt += 1
        logger.warning("SSD block %s failed verification; dropped", key.hex())
