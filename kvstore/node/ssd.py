"""SSDTier: a store node's SSD tier on lmdb -- crash-safe, restartable, bounded, TTL, verified.

The design of record is docs/design/kvstore.md §13; the reasons, in short:

Why lmdb
    A copy-on-write B-tree in one memory-mapped file: commits are atomic (a crash leaves the last
    committed state, never a torn block), reads are a pointer into the page cache (``get`` with
    ``buffers=True``: no copy until we copy into the destination), values of any size are stored
    contiguously (overflow pages), and it releases the GIL in every call. Measured here it puts at
    3-4 GB/s into the page cache and reads warm values at 14-22 GB/s.

Layout
    Three named databases in one environment: ``blocks`` (key -> the block exactly as it sits in
    DRAM, 64-byte header + payload), ``meta`` (key -> ``<QQdd``: block length, write sequence
    number, stored-at and expires-at wall-clock seconds) and ``info`` (format version). A block and
    its meta are written and deleted in the **same transaction**, so they always agree after a
    crash; :meth:`SSDTier.audit` (run at open) checks and repairs that anyway with a merge-join of
    the two key orders, which reads no payload pages.

Index in memory
    Lookups (EXISTS, MATCH_PREFIX, the GET decision) run on the event loop, so they must not touch
    the disk: a dict key -> :class:`_Meta`, kept in write order (= expiry order, so the TTL sweep
    is O(expired)), plus an injected :class:`~kvstore.policy.EvictionPolicy` for capacity. Both are
    rebuilt from ``meta`` at open. Recency is not persisted (a read never costs a write).

Threads
    Every method is thread-safe: one lock guards the index, the policy and the counters and is
    never held across disk I/O. Reads may run on several threads at once. Writes (:meth:`put_many`,
    :meth:`purge_pending`, :meth:`sweep_expired`) must be issued from one thread at a time, in
    order -- lmdb has one writer anyway, and the tier manager's single writer thread gives FIFO
    order, which is what makes "unindex now, purge later" (DELETE, corrupt blocks) correct: a key
    removed from the index is *tombstoned*, a write batch that was already queued does not
    re-index it, and the purge queued behind that batch deletes it from the file.

Cold reads without read amplification
    py-lmdb touches every page of a value it returns (so that page faults happen without the
    GIL), and lmdb touches a value's first page on every lookup. With lmdb's default
    ``readahead=True`` each such fault makes the kernel read ``read_ahead_kb`` around it -- 8 MiB
    on these VMs: a random cold 256 KiB read pulled 12.6x its size from disk, and every eviction or
    audit step read megabytes. So the map is opened with ``readahead=False`` (``MADV_RANDOM``:
    faults read exactly one page), and :meth:`SSDTier.read_into` first locates the value without
    touching it (``cursor.set_key``; the overflow page number follows the key in lmdb's leaf node)
    and asks the kernel for exactly its pages (``madvise(MADV_WILLNEED)``), so the preload finds
    them cached or in flight: one exact I/O per block. If anything about that hint looks wrong the
    hint is skipped -- it is an optimisation, verification does not depend on it.

Checksums
    :meth:`SSDTier.read_into` copies the stored block into the destination (``np.copyto``, which
    releases the GIL, so cold page faults do not stall the event loop) and then checks header,
    key, length and the payload's xxh3_64 *on the destination*. Anything wrong: the read is a
    miss, the block leaves the index at once, is purged, and counted (``corrupt_dropped``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import errno
import fcntl
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import lmdb
import numpy as np

from kvstore.blocks.format import BLOCK_HEADER_BYTES, BlockFormatError, BlockHeader, verify
from kvstore.blocks.hashing import BLOCK_KEY_BYTES
from kvstore.blocks.tier import Tier, TierListener
from kvstore.policy.base import EvictionPolicy
from kvstore.policy.lru import LRUPolicy

__all__ = [
    "SSD_FORMAT",
    "AuditReport",
    "ReadStatus",
    "SSDRead",
    "SSDStats",
    "SSDTier",
    "SSDTierError",
    "tune_malloc_for_lmdb",
    "write_batch_limit",
]

logger = logging.getLogger(__name__)

SSD_FORMAT = b"strata-kvstore-ssd/1"
"""Stored in the ``info`` database; a directory with another format is emptied at open."""
LOCK_FILE = "strata-ssd.lock"
SYNC_MODES = ("data", "full", "none")

_MIB = 1024 * 1024
_META = struct.Struct("<QQdd")  # block length, write sequence number, stored-at, expires-at
_LMDB_PAGE_HEADER = 16  # an overflow run starts with one page header
_ENTRY_OVERHEAD = 128  # leaf nodes in ``blocks`` and ``meta`` (key, node header, page number)
_MAX_WRITE_BATCH = 64 * _MIB
_NODE_HEADER = struct.Struct("<HHHH")  # lmdb MDB_node: mn_lo, mn_hi, mn_flags, mn_ksize
_F_BIGDATA = 0x01  # the value lives on overflow pages; the page number follows the key
_PAGE_NUMBER = struct.Struct("<Q")
_MADV_WILLNEED = 3
_BROKEN_FILE_ERRORS = (
    lmdb.CorruptedError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.PanicError,
    lmdb.PageNotFoundError,
)


class SSDTierError(Exception):
    """The SSD tier cannot be opened (directory in use by another node, unusable path)."""


class ReadStatus(enum.Enum):
    OK = "ok"
    """The block was copied into the destination and verified."""
    MISS = "miss"
    """Not stored (or a disk error: the store is a cache, the caller recomputes)."""
    CORRUPT = "corrupt"
    """Stored but failed verification; it has been dropped from the index and queued for
    deletion (:meth:`SSDTier.purge_pending`)."""


@dataclass(frozen=True, slots=True)
class SSDRead:
    """Outcome of :meth:`SSDTier.read_into`: ``nbytes`` of the destination were filled if OK."""

    status: ReadStatus
    nbytes: int = 0


@dataclass(frozen=True, slots=True)
class SSDStats:
    """Occupancy and counters of the SSD tier (``asdict`` goes into the STATS JSON)."""

    path: str
    sync: str
    ttl_s: float
    capacity_bytes: int
    budget_bytes: int
    num_blocks: int
    stored_bytes: int
    used_bytes: int
    writes: int
    write_bytes: int
    write_failures: int
    reads: int
    read_bytes: int
    evictions: int
    expired: int
    corrupt_dropped: int
    deletes: int
    map_full_retries: int
    recovered_blocks: int
    audit_repaired: int


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What :meth:`SSDTier.audit` found (and, with ``repair``, fixed)."""

    blocks: int
    orphan_meta: int
    orphan_blocks: int
    bad_meta: int
    expired: int
    corrupt: int


@dataclass(slots=True)
class _Meta:
    nbytes: int
    seq: int
    stored_at_s: float
    expires_at_s: float


def write_batch_limit(capacity_bytes: int) -> int:
    """Bytes per write transaction for a tier of ``capacity_bytes``: 1/16 of it, 1-64 MiB.

    Big enough that one ``fdatasync`` per commit is amortised (a 64 MiB batch takes ~30 ms to
    write at disk speed), small enough that the headroom lmdb needs for a batch is a small part
    of a small tier.
    """
    return max(_MIB, min(_MAX_WRITE_BATCH, capacity_bytes // 16))


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _libc_madvise()


def _mapping_start(path: str, length: int) -> int | None:
    """Address at which this process maps ``path`` from offset 0 over ``length`` bytes."""
    try:
        st = os.stat(path)
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or int(fields[4]) != st.st_ino or int(fields[2], 16) != 0:
                    continue
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if (major, minor) == (os.major(st.st_dev), os.minor(st.st_dev)) and (
                    end - start >= length
                ):
                    return start
    except (OSError, ValueError):
        pass
    return None


def tune_malloc_for_lmdb() -> bool:
    """Make glibc keep large allocations on the heap; True if it took effect.

    lmdb (without ``writemap``) ``malloc``s the dirty overflow pages of every put and frees them
    at commit. With glibc's default thresholds each such buffer is a fresh ``mmap`` whose pages
    fault in at ~0.5 GB/s here, so batched puts ran at 0.6 GB/s instead of 2.9 GB/s
    (/work/shared/notes/machine-limits.md). Process-wide, so the server calls it, not the library.
    """
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(m_mmap_threshold, 32 * _MIB)) and bool(mallopt(m_trim_threshold, 1 << 30))


class SSDTier:
    """Blocks in one lmdb environment at ``path``, at most ``capacity_bytes`` on disk.

    Args:
        path: directory (created if missing); one node at a time (an exclusive ``flock``).
        capacity_bytes: lmdb ``map_size``; blocks fill it up to :attr:`budget_bytes`.
        ttl_s: a block expires this long after it was written.
        sync: ``"data"`` (fdatasync per commit; default), ``"full"`` or ``"none"`` -- see
            docs/design/kvstore.md §13.2.
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
        if capacity < 16 * _MIB:
            raise ValueError("capacity_bytes must be at least 16 MiB")
        self.path = path
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._sync = sync
        self._policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._clock = clock
        self._read_threads = read_threads
        self._lock = threading.Lock()
        self._index: dict[bytes, _Meta] = {}  # insertion (= write = expiry) order
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
        self._budget = capacity - (capacity // 20 + 3 * self._batch_limit + _MIB)

        os.makedirs(path, mode=0o700, exist_ok=True)
        self._lock_fd = self._take_directory_lock(path)
        try:
            self._env = self._open_environment()
            self._page_size = int(self._env.stat()["psize"])
            self._blocks = self._env.open_db(b"blocks")
            self._meta = self._env.open_db(b"meta")
            self._info = self._env.open_db(b"info")
            self._check_format()
            self._audit_at_open()
            self._load_index()
            if _madvise is not None:
                self._map_start = _mapping_start(
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
        return math.ceil((nbytes + _LMDB_PAGE_HEADER) / page) * page + _ENTRY_OVERHEAD

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
                if self._map_start is not None:
                    self._prefetch(txn, key)
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
        if not fits or not _is_block(key, dest[:nbytes]):
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

    def touch(self, key: bytes) -> None:
        """Record an access to ``key`` for the SSD policy (no I/O)."""
        with self._lock:
            if key in self._index:
                self._policy.on_access(key)

    # -- writes (one thread at a time) --------------------------------------------------------

    def put_many(self, items: Sequence[tuple[bytes, memoryview | bytes | bytearray]]) -> list[bool]:
        """Store blocks (header + payload each) in one transaction; True per block stored.

        Makes room first by evicting in policy order, in the same transaction. A block bigger
        than the budget, or a batch that fails (disk error; no room even after a retry), is
        reported False and nothing of it is visible. Re-putting a key replaces it and restarts
        its TTL. Never raises for lack of space.
        """
        results = [False] * len(items)
        writes: list[tuple[int, bytes, memoryview, _Meta]] = []
        with self._lock:
            now = self._clock()
            need = 0
            for i, (key, data) in enumerate(items):
                _check_key(key)
                view = memoryview(data).cast("B")
                cost = self.block_cost(view.nbytes)
                if view.nbytes < BLOCK_HEADER_BYTES or cost > self._budget:
                    self._write_failures += 1
                    continue
                old = self._index.get(key)
                need += cost - (self.block_cost(old.nbytes) if old is not None else 0)
                meta = _Meta(view.nbytes, self._next_seq, now, now + self._ttl_s)
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
        now = self._clock()
        doomed: list[bytes] = []
        counts = {"blocks": 0, "orphan_meta": 0, "orphan_blocks": 0, "bad_meta": 0}
        counts |= {"expired": 0, "corrupt": 0}
        with self._env.begin(buffers=True) as txn:
            metas = txn.cursor(db=self._meta)
            blocks = txn.cursor(db=self._blocks)
            has_meta, has_block = metas.first(), blocks.first()
            while has_meta or has_block:
                meta_key = bytes(metas.key()) if has_meta else None
                block_key = bytes(blocks.key()) if has_block else None
                if meta_key is not None and meta_key == block_key:
                    meta = _decode_meta(metas.value())
                    if meta is None or len(meta_key) != BLOCK_KEY_BYTES:
                        counts["bad_meta"] += 1
                        doomed.append(meta_key)
                    elif meta.expires_at_s <= now:
                        counts["expired"] += 1
                        doomed.append(meta_key)
                    elif verify_checksums and (
                        meta.nbytes != len(value := blocks.value())  # reads the block
                        or not _is_block(meta_key, value)
                    ):
                        counts["corrupt"] += 1
                        doomed.append(meta_key)
                    else:
                        counts["blocks"] += 1
                    has_meta, has_block = metas.next(), blocks.next()
                elif meta_key is not None and (block_key is None or meta_key < block_key):
                    counts["orphan_meta"] += 1
                    doomed.append(meta_key)
                    has_meta = metas.next()
                else:
                    assert block_key is not None
                    counts["orphan_blocks"] += 1
                    doomed.append(block_key)
                    has_block = blocks.next()
        report = AuditReport(**counts)
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

    def __enter__(self) -> SSDTier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _take_directory_lock(path: str) -> int:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SSDTierError(f"SSD directory {path} is in use by another store node") from None
        return fd

    def _open_environment(self) -> lmdb.Environment:
        try:
            try:
                return self._lmdb_open()
            except _BROKEN_FILE_ERRORS as exc:
                # A cache: an unreadable file is replaced, not repaired.
                logger.error("SSD tier %s is unreadable (%s); starting it empty", self.path, exc)
                for name in ("data.mdb", "lock.mdb"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.path, name))
                return self._lmdb_open()
        except lmdb.Error as exc:
            raise SSDTierError(f"cannot open the SSD tier {self.path}: {exc}") from exc

    def _lmdb_open(self) -> lmdb.Environment:
        env = lmdb.open(
            self.path,
            map_size=self._capacity,
            subdir=True,
            max_dbs=3,
            sync=self._sync != "none",
            metasync=self._sync == "full",
            readahead=False,  # exact faults; reads prefetch their own pages (_prefetch)
            writemap=False,  # writemap made puts 4x slower here
            meminit=False,  # overflow pages are filled by the value; do not zero them first
            mode=0o600,
            max_readers=126,
            max_spare_txns=self._read_threads + 1,
            lock=True,
        )
        try:
            stale = env.reader_check()  # reader slots of a node that died mid-read
        except lmdb.Error:
            env.close()
            raise
        if stale:
            logger.info("SSD tier %s: cleared %d stale reader slots", self.path, stale)
        return env

    def _check_format(self) -> None:
        with self._env.begin(write=True) as txn:
            found = txn.get(b"format", db=self._info)
            if found == SSD_FORMAT:
                return
            if found is not None or txn.stat(self._blocks)["entries"]:
                logger.warning(
                    "SSD tier %s has format %r, not %r; emptying it", self.path, found, SSD_FORMAT
                )
                txn.drop(self._blocks, delete=False)
                txn.drop(self._meta, delete=False)
            txn.put(b"format", SSD_FORMAT, db=self._info)

    def _load_index(self) -> None:
        now = self._clock()
        horizon = now + self._ttl_s
        loaded: list[tuple[bytes, _Meta]] = []
        expired: list[bytes] = []
        unreadable: list[bytes] = []
        with self._env.begin(db=self._meta, buffers=True) as txn:
            for raw_key, raw_meta in txn.cursor():
                key = bytes(raw_key)
                meta = _decode_meta(raw_meta)
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

    def _index_locked(self, key: bytes, meta: _Meta) -> None:
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
        self, deletes: Sequence[bytes], puts: Sequence[tuple[bytes, memoryview, _Meta]]
    ) -> None:
        """One write transaction: delete ``deletes``, store ``puts`` (block and meta together)."""
        with self._env.begin(write=True) as txn:
            for key in deletes:
                txn.delete(key, db=self._blocks)
                txn.delete(key, db=self._meta)
            for key, view, meta in puts:
                txn.put(key, view, db=self._blocks)
                txn.put(key, _encode_meta(meta), db=self._meta)

    def _retry_after_map_full(
        self,
        victims: list[bytes],
        entries: list[tuple[bytes, memoryview, _Meta]],
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

    def _prefetch(self, txn: lmdb.Transaction, key: bytes) -> None:
        """Ask the kernel for exactly the pages of ``key``'s value before py-lmdb touches them.

        Reads the overflow page number from the key's leaf node (lmdb's ``MDB_node``: data size,
        flags and key size before the key, the page number right after it). Touches only the
        leaf page (and lmdb the value's first page). Skipped on anything unexpected.
        """
        assert self._map_start is not None and _madvise is not None
        cursor = txn.cursor()
        if not cursor.set_key(key):
            return
        found = cursor.key()  # a view of the key inside the leaf node
        address = np.frombuffer(found, dtype=np.uint8).ctypes.data
        lo, hi, flags, ksize = _NODE_HEADER.unpack(
            ctypes.string_at(address - _NODE_HEADER.size, _NODE_HEADER.size)
        )
        if ksize != len(key) or not flags & _F_BIGDATA:
            return  # a small value kept in the leaf, or not the layout we know
        (pgno,) = _PAGE_NUMBER.unpack(ctypes.string_at(address + ksize, _PAGE_NUMBER.size))
        start = self._map_start + pgno * self._page_size
        length = _LMDB_PAGE_HEADER + (lo | hi << 16)
        if pgno < 2 or pgno * self._page_size + length > self._capacity:
            return
        if _madvise(start, length, _MADV_WILLNEED) != 0:
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


def _is_block(key: bytes, block: memoryview) -> bool:
    """True if ``block`` is a well-formed block named ``key`` whose payload matches its checksum."""
    try:
        header = BlockHeader.decode(block)
    except BlockFormatError:
        return False
    return (
        header.key == key
        and BLOCK_HEADER_BYTES + header.payload_nbytes == block.nbytes
        and verify(header, block[BLOCK_HEADER_BYTES:])
    )


def _encode_meta(meta: _Meta) -> bytes:
    return _META.pack(meta.nbytes, meta.seq, meta.stored_at_s, meta.expires_at_s)


def _decode_meta(raw: bytes | memoryview) -> _Meta | None:
    if len(raw) != _META.size:
        return None
    nbytes, seq, stored_at, expires_at = _META.unpack(raw)
    if nbytes < BLOCK_HEADER_BYTES or not (math.isfinite(stored_at) and math.isfinite(expires_at)):
        return None
    return _Meta(nbytes, seq, stored_at, expires_at)


def _check_key(key: bytes) -> None:
    if len(key) != BLOCK_KEY_BYTES:
        raise ValueError(f"block keys are {BLOCK_KEY_BYTES} bytes, got {len(key)}")
