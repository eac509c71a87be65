"""TierManager: one store node's tiers in order -- DRAM (StoreNode), then SSD (SSDTier).

The node owns DRAM, the SSD tier owns the SSD; this class is the only one that talks to both and
moves blocks between them (docs/design/kvstore.md §7). It runs on the server's event loop and
never touches the disk there: SSD reads go to a small pool of reader threads, every SSD write
(spill batches, deletes, sweeps, purges of corrupt blocks) to **one** writer thread, in submission
order. lmdb, ``np.copyto`` and xxhash release the GIL on large buffers, so those threads overlap
with the loop.

Call sequence (the server's view)::

    tiers.start()                           # background spill and TTL sweep tasks
    found = tiers.acquire(key)              # GET: Lease (DRAM), Tier.SSD (fetch it), None (miss)
    lease = await tiers.fetch(key)          # SSD -> arena extent -> verified -> Lease (or None)
    tiers.note_commit(key)                  # after each PUT commit: spill above the watermark,
                                            # queue the block for write-behind
    tiers.match_prefix(keys) / exists(keys) / delete(keys)    # across both tiers
    tiers.set_listener(fn)                  # fn(key, tier, held) at every change of either tier
    await tiers.close()                     # stop tasks, drain threads, close the SSD tier

Without an SSD tier (``ssd=None``) every call is the DRAM-only behaviour of :class:`StoreNode`.

Spill (DRAM -> SSD)
    Above ``high_watermark`` of the arena, a background task repeatedly takes the policy's coldest
    committed, unleased block, pins it with a lease, writes a batch in one transaction, and only
    then drops the DRAM copies (:meth:`StoreNode.finish_spill`), until usage is below
    ``low_watermark``. A block already on SSD with more than half its TTL left is dropped without
    a write (tiers are inclusive: a promoted block keeps its SSD copy).

Write-behind (optional, ``write_behind=True``; on in ``strata serve``)
    Every block committed to DRAM is also queued for the SSD. A background task takes the queue
    in batches, pins each block with a lease that does not count as an access, writes the batch in
    the writer thread (the same thread and order as spills), then releases the leases; the DRAM
    copy stays. The SSD tier then holds every block, so a node restarted on the same directory
    (or stopped without a spill) still serves them, and a later spill of a persisted block is a
    clean drop with no write. Blocks deleted or evicted before their turn are skipped.

Write-through (optional, ``write_through=True``; implies write-behind)
    The same queue, but the server answers a PUT (or a COMMIT_BATCH) only once its blocks are
    committed to SSD: :meth:`persisted` gives a future per key, resolved True when the batch
    holding the block is committed to lmdb (or the block was on SSD already), False when it
    could not be written or left DRAM before its turn without reaching SSD. Acknowledged then
    means durable: a node killed at any point loses only writes it had not answered. Batches
    form while the writer thread is busy, so concurrent writers share commits.

Promotion (SSD -> DRAM), inline
    :meth:`fetch` reserves an arena extent for the block (``begin_put``: invisible, unevictable),
    reads the SSD copy straight into it on a reader thread, verifies it there, and commits it: the
    block is a DRAM block and the GET is served from the arena like any DRAM hit. The one copy out
    of lmdb has to land somewhere; landing it in the arena serves and promotes at once, where an
    asynchronous promotion would copy or read the block twice. With ``promote=False`` the read
    goes into a transient extent freed after the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from kvstore.blocks.tier import Tier, TierListener
from kvstore.node.ssd.tier import SSDTier
from kvstore.node.ssd.types import ReadStatus, SSDRead
from kvstore.node.store import Lease, PendingPut, StoreNode
from kvstore.wire.types import PutStatus

__all__ = ["MAX_SPILL_BATCH_BLOCKS", "TierManager", "TierStats"]

logger = logging.getLogger(__name__)

MAX_SPILL_BATCH_BLOCKS = 64
"""Blocks per spill transaction (also bounded by :attr:`SSDTier.max_batch_bytes`)."""
SPILL_BACKOFF_S = 1.0
"""Pause after a failed spill batch, or when nothing could be spilled (everything leased)."""
CLOSE_GRACE_S = 10.0

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class TierStats:
    """Blocks per tier and the traffic between tiers (``asdict`` goes into STATS as "tiers")."""

    dram_blocks: int
    dram_bytes: int
    ssd_blocks: int
    ssd_bytes: int
    dram_hits: int
    ssd_hits: int
    misses: int
    spills: int
    spill_bytes: int
    spills_clean: int
    spill_failures: int
    promotions: int
    persisted: int
    persist_failures: int
    ssd_read_no_space: int
    arena_usage: float
    high_watermark: float
    low_watermark: float
    promote: bool


class TierManager:
    """Lookups, reads, spill and promotion across one node's DRAM and (optional) SSD tier.

    Takes ownership of ``ssd``: :meth:`close` closes it. Not thread-safe: it belongs to the
    event-loop thread, like the node.
    """

    def __init__(
        self,
        node: StoreNode,
        ssd: SSDTier | None = None,
        *,
        high_watermark: float = 0.90,
        low_watermark: float = 0.75,
        promote: bool = True,
        read_threads: int = 8,
        sweep_interval_s: float = 60.0,
        write_behind: bool = False,
        write_through: bool = False,
    ) -> None:
        if not 0.0 < low_watermark < high_watermark <= 1.0:
            raise ValueError("need 0 < low_watermark < high_watermark <= 1")
        self._node = node
        self._ssd = ssd
        self._high = high_watermark
        self._low = low_watermark
        self._promote = promote
        self._sweep_interval_s = sweep_interval_s
        self._readers: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        if ssd is not None:
            self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="kvstore-ssd-read")
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvstore-ssd-write")
        self._promotions: dict[bytes, asyncio.Future[None]] = {}  # key -> done, while promoting
        self._cancelled: set[bytes] = set()  # deleted while their promotion was in flight
        self._reads: set[asyncio.Future[SSDRead]] = set()
        self._write_through = write_through and ssd is not None
        self._write_behind = (write_behind or write_through) and ssd is not None
        self._persist_queue: deque[bytes] = deque()
        self._persist_waiters: dict[bytes, list[asyncio.Future[bool]]] = {}
        self._persist_wanted = asyncio.Event()
        self._persisted = self._persist_failures = 0
        self._spill_wanted = asyncio.Event()
        self._closing = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ssd_hits = self._misses = 0
        self._spills = self._spill_bytes = self._spills_clean = self._spill_failures = 0
        self._promoted = self._no_space = 0

    @property
    def node(self) -> StoreNode:
        return self._node

    @property
    def ssd(self) -> SSDTier | None:
        return self._ssd

    def set_listener(self, listener: TierListener | None) -> None:
        """Report every change of where a block lives, in either tier, to ``listener``.

        The node reports DRAM (commit, promotion, delete, eviction, spill), the SSD tier reports
        SSD (spill and write-behind commits, capacity eviction, TTL sweep, corrupt blocks,
        delete) -- each at the point of change, SSD ones possibly from the SSD threads.
        """
        self._node.set_listener(listener)
        if self._ssd is not None:
            self._ssd.set_listener(listener)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the spill and TTL-sweep tasks (needs the running loop; no-op without SSD)."""
        if self._ssd is None or self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._spill_loop(), name="kvstore-spill"),
            loop.create_task(self._sweep_loop(), name="kvstore-ssd-sweep"),
        ]
        if self._write_behind:
            self._tasks.append(loop.create_task(self._persist_loop(), name="kvstore-persist"))
        self.note_commit()

    async def close(self) -> None:
        """Stop the tasks (letting a spill batch finish), drain reads, join the threads, close
        the SSD tier. The arena must stay open until this returns (threads read from it)."""
        self._closing.set()
        self._spill_wanted.set()
        self._persist_wanted.set()
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, CLOSE_GRACE_S)
            except (TimeoutError, asyncio.CancelledError):
                logger.warning("%s did not stop in %gs; cancelled", task.get_name(), CLOSE_GRACE_S)
            except Exception:
                logger.exception("%s failed", task.get_name())
        self._tasks = []
        for key in list(self._persist_waiters):
            self._resolve_persisted(key, False)
        if self._reads:
            await asyncio.gather(*self._reads, return_exceptions=True)
            for _ in range(3):  # let the fetches that awaited them (through a shield) finish
                await asyncio.sleep(0)
        for pool in (self._readers, self._writer):
            if pool is not None:
                pool.shutdown(wait=True)
        if self._ssd is not None:
            self._ssd.close()

    # -- lookups ----------------------------------------------------------------------------

    def locate(self, key: bytes) -> Tier | None:
        """The fastest tier holding ``key``, or None. A lookup, not an access."""
        if self._node.contains(key):
            return Tier.DRAM
        if self._ssd is not None and self._ssd.contains(key):
            return Tier.SSD
        return None

    def match_prefix(self, keys: Sequence[bytes]) -> list[Tier]:
        """The fastest tier of each leading key of a chain that some tier holds (stops at the
        first miss). Its length is the prefix depth. A lookup, not an access."""
        tiers: list[Tier] = []
        for key in keys:
            tier = self.locate(key)
            if tier is None:
                break
            tiers.append(tier)
        return tiers

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is held by any tier. A lookup, not an access."""
        return [tier is not None for tier in self._tiers_of(keys)]

    def iter_keys(self, tier: Tier) -> Iterator[bytes]:
        """The keys held in ``tier`` now (a snapshot), e.g. to re-announce them after a restart."""
        if tier is Tier.DRAM:
            return self._node.iter_keys()
        if tier is Tier.SSD and self._ssd is not None:
            return self._ssd.iter_keys()
        return iter(())

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove keys from every tier; returns how many were held by at least one.

        Lookups miss at once; the SSD file is purged by the writer thread, after any spill
        already queued (so that spill cannot bring a key back). An in-flight promotion of a
        deleted key serves its waiting readers but is not published.
        """
        in_dram = {key for key in keys if self._node.contains(key)}
        self._node.delete(keys)
        if self._ssd is None:
            return len(in_dram)
        self._cancelled.update(key for key in keys if key in self._promotions)
        on_ssd = self._ssd.unindex(keys)
        if on_ssd:
            self._submit_write(self._ssd.purge_pending)
        return len(in_dram | set(on_ssd))

    # -- reads ------------------------------------------------------------------------------

    def acquire(self, key: bytes) -> Lease | Tier | None:
        """Start a GET: a DRAM lease, ``Tier.SSD`` if the block must be fetched with
        :meth:`fetch`, or None on a miss."""
        lease = self._node.acquire(key)
        if lease is not None:
            return lease
        if self._ssd is not None and (key in self._promotions or self._ssd.contains(key)):
            return Tier.SSD
        self._misses += 1
        return None

    async def fetch(self, key: bytes) -> Lease | None:
        """Read a block from SSD into the arena (promoting it unless ``promote`` is off) and
        lease it; None if it is gone, fails its checksum, or no arena space can be made."""
        ssd = self._ssd
        if ssd is None:
            raise RuntimeError("no SSD tier")
        waiting = self._promotions.get(key)
        if waiting is not None:  # another GET is promoting it: share that read
            await asyncio.shield(waiting)
            lease = self._node.acquire(key)
            if lease is not None:
                return lease
        nbytes = ssd.lookup(key)
        if nbytes is None:
            self._misses += 1
            return None
        reserved = self._reserve(key, nbytes, self._promote and key not in self._promotions)
        if isinstance(reserved, Lease):
            return reserved
        if reserved is None:
            self._no_space += 1
            self._misses += 1
            return None
        pending, publish = reserved
        done: asyncio.Future[None] | None = None
        if publish:
            done = asyncio.get_running_loop().create_future()
            self._promotions[key] = done
        try:
            result = await self._read(key, pending)
            return self._finish_fetch(key, pending, result, publish)
        finally:
            if done is not None:
                del self._promotions[key]
                self._cancelled.discard(key)
                done.set_result(None)

    @property
    def write_through(self) -> bool:
        """Whether PUTs are answered only once their block is on SSD (:meth:`persisted`)."""
        return self._write_through

    def persisted(self, key: bytes) -> asyncio.Future[bool]:
        """With write-through, a future resolved when the block just committed under ``key``
        (:meth:`note_commit` queued it) is on SSD: True, or False if it could not get there."""
        future = asyncio.get_running_loop().create_future()
        if not self._write_through or self._closing.is_set():
            future.set_result(False)
        else:
            self._persist_waiters.setdefault(key, []).append(future)
        return future

    def _resolve_persisted(self, key: bytes, ok: bool) -> None:
        for future in self._persist_waiters.pop(key, ()):
            if not future.done():
                future.set_result(ok)

    # -- spill ------------------------------------------------------------------------------

    def note_commit(self, key: bytes | None = None) -> None:
        """Call after a block is committed to DRAM: queues it for write-behind and wakes the
        spiller above the high watermark."""
        if key is not None and self._write_behind:
            self._persist_queue.append(key)
            self._persist_wanted.set()
        if (
            self._ssd is not None
            and not self._spill_wanted.is_set()
            and self._node.arena_usage() > self._high
        ):
            self._spill_wanted.set()

    async def spill_to_low_watermark(self) -> int:
        """Move cold blocks out of DRAM until usage is below the low watermark (or nothing more
        can move); returns how many blocks left DRAM. The background task calls this."""
        ssd = self._ssd
        if ssd is None:
            return 0
        loop = asyncio.get_running_loop()
        moved = 0
        while not self._closing.is_set():
            batch, dropped = self._pick_spill_batch(ssd)
            moved += dropped
            if not batch:
                if dropped:
                    continue
                break
            items = [(lease.key, lease.view) for lease in batch]
            try:
                stored = await loop.run_in_executor(self._writer, ssd.put_many, items)
            except Exception:
                logger.exception("spill of %d blocks failed", len(batch))
                stored = [False] * len(batch)
            for lease, ok in zip(batch, stored, strict=True):
                if self._node.finish_spill(lease, ok):
                    moved += 1
                    self._spills += 1
                    self._spill_bytes += lease.nbytes
            failed = stored.count(False)
            if failed:
                self._spill_failures += failed
                logger.warning("%d blocks could not be spilled; they stay in DRAM", failed)
                await self._pause(SPILL_BACKOFF_S)
                break
        return moved

    async def persist_pending(self) -> int:
        """Write the queued blocks that are still in DRAM and not yet on SSD (write-behind);
        returns how many were written. The background task calls this; tests may too."""
        ssd = self._ssd
        if ssd is None:
            return 0
        loop = asyncio.get_running_loop()
        written = 0
        while self._persist_queue:
            leases: list[Lease] = []
            batch_bytes = 0
            key = b""
            try:
                while (
                    self._persist_queue
                    and len(leases) < MAX_SPILL_BATCH_BLOCKS
                    and batch_bytes < ssd.max_batch_bytes
                ):
                    key = self._persist_queue.popleft()
                    if ssd.contains(key):
                        self._resolve_persisted(key, True)
                        continue
                    lease = self._node.pin(key)
                    if lease is None:  # deleted, evicted or spilled before its turn
                        self._resolve_persisted(key, ssd.contains(key))
                        continue
                    leases.append(lease)
                    batch_bytes += lease.nbytes
                if not leases:
                    continue
                items = [(lease.key, lease.view) for lease in leases]
                try:
                    stored = await loop.run_in_executor(self._writer, ssd.put_many, items)
                except Exception:
                    logger.exception("write-behind of %d blocks failed", len(leases))
                    stored = [False] * len(leases)
            except BaseException:
                # Whatever this pass took off the queue is answered (a write-through PUT's reply
                # waits on it, and every reply behind that one) and unpinned.
                self._resolve_persisted(key, False)
                for lease in leases:
                    self._node.release(lease)
                    self._resolve_persisted(lease.key, False)
                raise
            for lease in leases:
                self._node.release(lease)
            for lease, ok in zip(leases, stored, strict=True):
                self._resolve_persisted(lease.key, ok)
            written += stored.count(True)
            self._persisted += stored.count(True)
            self._persist_failures += stored.count(False)
        return written

    async def _persist_loop(self) -> None:
        while True:
            await self._persist_wanted.wait()
            self._persist_wanted.clear()
            try:
                await self.persist_pending()
            except Exception:
                logger.exception("write-behind task failed; retrying in %gs", SPILL_BACKOFF_S)
                await self._pause(SPILL_BACKOFF_S)
                self._persist_wanted.set()
            if self._closing.is_set():
                return

    async def sweep(self) -> int:
        """Delete expired SSD blocks now (in the writer thread); returns how many."""
        if self._ssd is None:
            return 0
        return await asyncio.get_running_loop().run_in_executor(
            self._writer, self._ssd.sweep_expired
        )

    def stats(self) -> TierStats:
        node = self._node.stats()
        ssd = self._ssd.stats() if self._ssd is not None else None
        arena = node.arena
        return TierStats(
            dram_blocks=node.num_blocks,
            dram_bytes=node.stored_bytes,
            ssd_blocks=ssd.num_blocks if ssd else 0,
            ssd_bytes=ssd.stored_bytes if ssd else 0,
            dram_hits=node.hits,
            ssd_hits=self._ssd_hits,
            misses=self._misses,
            spills=self._spills,
            spill_bytes=self._spill_bytes,
            spills_clean=self._spills_clean,
            spill_failures=self._spill_failures,
            promotions=self._promoted,
            persisted=self._persisted,
            persist_failures=self._persist_failures,
            ssd_read_no_space=self._no_space,
            arena_usage=arena.used_bytes / arena.capacity_bytes,
            high_watermark=self._high,
            low_watermark=self._low,
            promote=self._promote,
        )

    # -- internals --------------------------------------------------------------------------

    def _tiers_of(self, keys: Sequence[bytes]) -> list[Tier | None]:
        tiers: list[Tier | None] = [Tier.DRAM if self._node.contains(k) else None for k in keys]
        if self._ssd is not None:
            rest = [i for i, tier in enumerate(tiers) if tier is None]
            on_ssd = self._ssd.contains_many(keys[i] for i in rest)
            for i, present in zip(rest, on_ssd, strict=True):
                if present:
                    tiers[i] = Tier.SSD
        return tiers

    def _reserve(
        self, key: bytes, nbytes: int, publish: bool
    ) -> tuple[PendingPut, bool] | Lease | None:
        """An arena extent to read ``key`` into and whether it is in the index (to promote) or
        transient; or a DRAM lease if the block turned up in DRAM; None if there is no room."""
        node = self._node
        pending = node.begin_put(key, nbytes) if publish else node.begin_transient(key, nbytes)
        if pending is PutStatus.EXISTS:
            lease = node.acquire(key)  # a client PUT committed it meanwhile
            if lease is not None:
                return lease
            publish = False
            pending = node.begin_transient(key, nbytes)  # a client is writing it: read ours
        return None if isinstance(pending, PutStatus) else (pending, publish)

    async def _read(self, key: bytes, pending: PendingPut) -> SSDRead:
        """Run the SSD read into ``pending``; never leaves the thread writing into an extent
        that has been given back (a cancelled caller revokes only when the thread is done)."""
        assert self._ssd is not None
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._readers, self._ssd.read_into, key, pending.view)
        self._reads.add(future)
        future.add_done_callback(self._reads.discard)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda _: self._node.revoke(pending))
            raise
        except Exception:
            logger.exception("SSD read of %s failed", key.hex())
            return SSDRead(ReadStatus.MISS)

    def _finish_fetch(
        self, key: bytes, pending: PendingPut, result: SSDRead, publish: bool
    ) -> Lease | None:
        if result.status is ReadStatus.OK:
            self._ssd_hits += 1
            if publish and key not in self._cancelled:
                lease = self._node.promote(pending)
                self._promoted += 1
                self.note_commit()
                return lease
            return self._node.detach(pending)
        self._node.revoke(pending)
        if result.status is ReadStatus.CORRUPT and self._ssd is not None:
            self._submit_write(self._ssd.purge_pending)
        self._misses += 1
        return None

    def _pick_spill_batch(self, ssd: SSDTier) -> tuple[list[Lease], int]:
        """Pin the coldest blocks (up to one write batch) that take usage below the low
        watermark; drop the ones already safe on SSD. Returns (pinned, dropped count)."""
        node = self._node
        arena = node.arena
        target = self._low * arena.size
        batch: list[Lease] = []
        batch_bytes = dropped = 0
        while (
            arena.stats().used_bytes - batch_bytes > target
            and batch_bytes < ssd.max_batch_bytes
            and len(batch) < MAX_SPILL_BATCH_BLOCKS
        ):
            key = node.coldest_evictable()
            if key is None:
                break
            left = ssd.remaining_ttl(key)
            if left is not None and left > ssd.ttl_s / 2 and node.drop_copy(key):
                dropped += 1
                self._spills_clean += 1
                continue
            lease = node.pin_for_spill(key)
            batch.append(lease)
            batch_bytes += lease.nbytes
        return batch, dropped

    async def _spill_loop(self) -> None:
        while True:
            await self._spill_wanted.wait()
            self._spill_wanted.clear()
            if self._closing.is_set():
                return
            try:
                moved = await self.spill_to_low_watermark()
            except Exception:
                logger.exception("spill task failed; retrying in %gs", SPILL_BACKOFF_S)
                moved = 0
            if self._node.arena_usage() > self._high and not self._closing.is_set():
                if not moved:  # everything is leased or being written: try again soon
                    await self._pause(SPILL_BACKOFF_S)
                self._spill_wanted.set()

    async def _sweep_loop(self) -> None:
        while not self._closing.is_set():
            await self._pause(self._sweep_interval_s)
            if self._closing.is_set():
                return
            try:
                expired = await self.sweep()
            except Exception:
                logger.exception("TTL sweep failed")
                continue
            if expired:
                logger.info("TTL sweep removed %d expired SSD blocks", expired)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _submit_write(self, fn: Callable[..., _T], *args: Any) -> None:
        """Queue a write on the writer thread without waiting; failures are logged."""
        assert self._writer is not None
        future = self._writer.submit(fn, *args)
        future.add_done_callback(_log_failure)


def _log_failure(future: Future[Any]) -> None:
    exc = future.exception()
    if exc is not None:
        logger.error("SSD write task failed: %s", exc, exc_info=exc)
