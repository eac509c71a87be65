"""NodeAgent: a store node's membership, heartbeat and KV events (docs/design/kvstore.md §14.2).

Runs beside the server: the event loop only marks keys dirty and computes event batches (cheap,
in memory); a publisher thread and a heartbeat thread do all metadata-store I/O, so a slow Redis
never blocks a PUT. One FIFO queue keeps the node's messages in seq order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

from kvstore.events import (
    BlocksRemoved,
    BlocksStored,
    KVEvent,
    SourceCleared,
    SourceSnapshot,
    Tier,
    encode_event,
    encode_snapshot,
)
from kvstore.metadata import MetadataStore
from kvstore.tiers import TierManager

__all__ = ["NodeAgent"]

logger = logging.getLogger("kvstore.membership")

_TIER_BITS: Final = ((Tier.DRAM, 1), (Tier.SSD, 2))
BATCH_KEYS: Final = 256


class NodeAgent:
    """Registers the node, heartbeats, and publishes what its tiers hold as KV events."""

    def __init__(
        self,
        store: MetadataStore,
        node_id: str,
        info: Mapping[str, Any],
        tiers: TierManager,
        *,
        heartbeat_interval_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        flush_interval_s: float = 0.01,
        reconcile_interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self._info = dict(info)
        self._tiers = tiers
        self._hb_interval = heartbeat_interval_s
        self._hb_timeout = heartbeat_timeout_s
        self._flush_interval = flush_interval_s
        self._reconcile_interval = reconcile_interval_s
        self._seq = 0  # next seq to publish
        self._announced: dict[bytes, int] = {}  # key -> tier bits announced
        self._dirty: set[bytes] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reconciler: asyncio.Task[None] | None = None
        self.num_published = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register, heartbeat, announce ``SourceCleared(0)`` and what the tiers hold."""
        self._loop = asyncio.get_running_loop()
        info = {**self._info, "started_at": time.time()}
        await self._loop.run_in_executor(None, self._register, info)
        self._emit(SourceCleared(self.node_id, self._next_seq()))
        self.reconcile()
        self._threads = [
            threading.Thread(target=self._publisher, name="kvstore-publish", daemon=True),
            threading.Thread(target=self._heartbeater, name="kvstore-heartbeat", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._reconciler = self._loop.create_task(self._reconcile_loop())

    def _register(self, info: Mapping[str, Any]) -> None:
        self.store.heartbeat(self.node_id, self._hb_timeout)
        self.store.register(self.node_id, info)
        self.store.take_resync_request(self.node_id)  # a stale one from a previous incarnation

    async def stop(self) -> None:
        """Publish ``SourceCleared``, deregister, stop the threads (graceful leave)."""
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        self.flush()
        self._emit(SourceCleared(self.node_id, self._next_seq()))
        self._announced.clear()
        self._outbox.put(None)
        self._stopping.set()
        loop = asyncio.get_running_loop()
        for thread in self._threads:
            await loop.run_in_executor(None, thread.join, 10.0)
        try:
            await loop.run_in_executor(None, self.store.deregister, self.node_id)
        except Exception:
            logger.exception("could not deregister %s", self.node_id)

    # -- hooks from the server (event loop) ----------------------------------------------------

    def note_changed(self, keys: list[bytes] | tuple[bytes, ...]) -> None:
        """``keys`` may have changed tiers (committed, deleted): publish soon."""
        self._dirty.update(keys)
        if len(self._dirty) >= BATCH_KEYS:
            self.flush()
        elif self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_later(self._flush_interval, self.flush)

    def flush(self) -> None:
        """Publish the tier changes of the dirty keys."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        dirty, self._dirty = self._dirty, set()
        if dirty:
            self._publish_diff({key: self._actual_bits(key) for key in dirty})

    def reconcile(self) -> None:
        """Diff everything the tiers hold against what was announced (evictions, spills, ...)."""
        self.flush()
        actual: dict[bytes, int] = {}
        for tier, bit in _TIER_BITS:
            for key in self._tiers.iter_keys(tier):
                actual[key] = actual.get(key, 0) | bit
        for key in self._announced:
            actual.setdefault(key, 0)
        self._publish_diff(actual)

    def snapshot(self) -> None:
        """Reconcile, then put a snapshot of the announced state into the stream."""
        self.reconcile()
        keys: dict[Tier, list[bytes]] = {tier: [] for tier, _bit in _TIER_BITS}
        for key, bits in self._announced.items():
            for tier, bit in _TIER_BITS:
                if bits & bit:
                    keys[tier].append(key)
        snap = SourceSnapshot.of(self.node_id, self._seq - 1, keys)
        self._outbox.put(encode_snapshot(snap))

    def dram_keys(self) -> list[bytes]:
        return list(self._tiers.iter_keys(Tier.DRAM))

    # -- internals --------------------------------------------------------------------------------

    def _actual_bits(self, key: bytes) -> int:
        bits = 1 if self._tiers.node.contains(key) else 0
        ssd = self._tiers.ssd
        if ssd is not None and ssd.contains(key):
            bits |= 2
        return bits

    def _publish_diff(self, actual: Mapping[bytes, int]) -> None:
        stored: dict[Tier, list[bytes]] = {Tier.DRAM: [], Tier.SSD: []}
        removed: dict[Tier, list[bytes]] = {Tier.DRAM: [], Tier.SSD: []}
        announced = self._announced
        for key, bits in actual.items():
            old = announced.get(key, 0)
            if bits == old:
                continue
            for tier, bit in _TIER_BITS:
                if bits & bit and not old & bit:
                    stored[tier].append(key)
                elif old & bit and not bits & bit:
                    removed[tier].append(key)
            if bits:
                announced[key] = bits
            else:
                del announced[key]
        # Every addition goes out before any removal: a block that moved between tiers (a spill,
        # DRAM -> SSD) must never look held by nobody to a reader applying events in between.
        for tier, _bit in _TIER_BITS:
            for start in range(0, len(stored[tier]), 4096):
                chunk = tuple(stored[tier][start : start + 4096])
                self._emit(BlocksStored(self.node_id, self._next_seq(), tier, chunk))
        for tier, _bit in _TIER_BITS:
            for start in range(0, len(removed[tier]), 4096):
                chunk = tuple(removed[tier][start : start + 4096])
                self._emit(BlocksRemoved(self.node_id, self._next_seq(), tier, chunk))

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _emit(self, event: KVEvent) -> None:
        self._outbox.put(encode_event(event))

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reconcile_interval)
            try:
                self.reconcile()
            except Exception:
                logger.exception("reconcile failed")

    def _publisher(self) -> None:
        done = False
        while not done:
            batch: list[bytes] = []
            message = self._outbox.get()
            while True:
                if message is None:
                    done = True
                    break
                batch.append(message)
                if len(batch) >= 512:
                    break
                try:
                    message = self._outbox.get_nowait()
                except queue.Empty:
                    break
            while batch:
                try:
                    self.store.publish(batch)
                    self.num_published += len(batch)
                    break
                except Exception:
                    logger.exception("publishing %d KV events failed; retrying", len(batch))
                    if self._stopping.wait(0.5):
                        break

    def _heartbeater(self) -> None:
        while not self._stopping.wait(self._hb_interval):
            try:
                self.store.heartbeat(self.node_id, self._hb_timeout)
                if self.store.take_resync_request(self.node_id) and self._loop is not None:
                    self._loop.call_soon_threadsafe(self.snapshot)
            except Exception:
                logger.exception("heartbeat failed")
