"""Membership (register, heartbeat, rejoin) and NodeAgent, a store node's side of the cluster
(docs/design/kvstore.md §10.5, §10.7).

:class:`Membership` is one member's registration and heartbeat, whatever its kind: a store node's
:class:`NodeAgent` and an engine worker's HBM event publisher (``dataplane.hbm_events``) both use
it, so a crashed member of either kind is reaped the same way and its entries leave the index
within the heartbeat timeout.

Runs beside the server. The tiers report every change of where a block lives at the point of
change (:meth:`kvstore.node.tiers.TierManager.set_listener`): DRAM changes on the event loop, SSD
changes also on the SSD writer and reader threads, which hand their keys to the loop through a
locked list and one ``call_soon_threadsafe`` per batch. The loop only marks those keys dirty; a
flush (every ``flush_interval_s``, or at once past :data:`BATCH_KEYS` dirty keys) compares each
dirty key's real tiers with what was announced and publishes the difference -- every addition
before any removal. Diffing the *current* state, rather than replaying the notifications, makes
the result independent of the order in which the threads' notifications arrive, and collapses a
key that flips several times within one flush into its final state.

A publisher thread and a heartbeat thread do all metadata-store I/O, so a slow Redis never
blocks a PUT. One FIFO queue keeps the node's messages in seq order.

A full *reconcile* (every key announced or held, diffed the same way) remains as a rare safety
net (``reconcile_interval_s``, default 60 s) and announces what a restarted node recovered from
its SSD. It works in chunks of :data:`RECONCILE_CHUNK_KEYS` and yields to the loop between them;
the SSD key list is copied on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Protocol

from kvstore.blocks.tier import Tier, TierListener
from kvstore.cluster import events
from kvstore.metadata import KIND_KEY, MemberKind, MetadataStore, OutageLog

__all__ = ["BATCH_KEYS", "RECONCILE_CHUNK_KEYS", "Membership", "NodeAgent", "NodeTiers"]

logger = logging.getLogger("kvstore.cluster.membership")

_TIER_BITS: Final = ((Tier.DRAM, 1), (Tier.SSD, 2))
BATCH_KEYS: Final = 256
"""Dirty keys that trigger a flush before ``flush_interval_s`` has passed."""
RECONCILE_CHUNK_KEYS: Final = 4096
"""Keys a reconcile diffs before it yields to the event loop."""
_KEYS_PER_EVENT: Final = 4096

_Outgoing = bytes | Callable[[], bytes] | None


class _DramTier(Protocol):
    def contains(self, key: bytes) -> bool: ...


class _SsdTier(Protocol):
    def contains_many(self, keys: Iterable[bytes]) -> list[bool]: ...


class NodeTiers(Protocol):
    """What a :class:`NodeAgent` needs of its node's tiers (:class:`kvstore.node.tiers.TierManager`
    is the one implementation). A Protocol, so that importing this module (a vLLM worker
    publishing its HBM events does) loads neither the node's state nor the SSD tier (lmdb)."""

    @property
    def node(self) -> _DramTier: ...

    @property
    def ssd(self) -> _SsdTier | None: ...

    def set_listener(self, listener: TierListener | None) -> None: ...

    def iter_keys(self, tier: Tier) -> Iterator[bytes]: ...


class Membership:
    """One member's registration and heartbeat in a metadata store; blocking I/O, call it from a
    thread of the member's own, never from an event loop.

    - :meth:`register`: heartbeat *first*, then register ``{**info, kind, started_at}``: the
      member is alive before it is visible, so a sweep working from a stale member list can never
      reap the new registration (:meth:`MetadataStore.reap` checks both). A resync request left
      by a previous incarnation is dropped.
    - :meth:`beat`: one heartbeat. If the store says the member is not registered -- a sweep
      reaped it while it was alive (a stall past the timeout), or the store lost its state -- it
      registers again and returns True: the caller must restart its event stream (a new
      ``SourceCleared``, then everything it holds), which then lands in the stream after the
      sweeper's ``SourceCleared(SOURCE_GONE_SEQ)``.
    - :meth:`deregister`: graceful leave.
    """

    def __init__(
        self,
        store: MetadataStore,
        member_id: str,
        kind: MemberKind,
        info: Mapping[str, Any],
        *,
        heartbeat_timeout_s: float = 5.0,
    ) -> None:
        if heartbeat_timeout_s <= 0:
            raise ValueError("heartbeat_timeout_s must be positive")
        self.store = store
        self.member_id = member_id
        self.kind = kind
        self._info = {key: value for key, value in info.items() if key != KIND_KEY}
        self.heartbeat_timeout_s = heartbeat_timeout_s

    def registration(self) -> dict[str, Any]:
        """The info registered now: the given info, the kind and the incarnation's start time."""
        return {**self._info, KIND_KEY: self.kind.value, "started_at": time.time()}

    def register(self) -> None:
        self.store.heartbeat(self.member_id, self.heartbeat_timeout_s)  # alive before visible
        self.store.register(self.member_id, self.registration())
        self.store.take_resync_request(self.member_id)  # a stale one from a previous incarnation

    def beat(self, *, rejoin: bool = True) -> bool:
        """One heartbeat; True if the member had been removed and registered again (only with
        ``rejoin``; a member that is leaving passes False)."""
        registered = self.store.heartbeat(self.member_id, self.heartbeat_timeout_s)
        if registered or not rejoin:
            return False
        self.store.register(self.member_id, self.registration())
        return True

    def deregister(self) -> None:
        self.store.deregister(self.member_id)


class NodeAgent:
    """Registers the node, heartbeats, and publishes what its tiers hold as KV events."""

    def __init__(
        self,
        store: MetadataStore,
        node_id: str,
        info: Mapping[str, Any],
        tiers: NodeTiers,
        *,
        heartbeat_interval_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        flush_interval_s: float = 0.01,
        reconcile_interval_s: float = 60.0,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self._membership = Membership(
            store, node_id, MemberKind.STORE, info, heartbeat_timeout_s=heartbeat_timeout_s
        )
        self._tiers = tiers
        self._hb_interval = heartbeat_interval_s
        self._flush_interval = flush_interval_s
        self._reconcile_interval = reconcile_interval_s
        self._seq = 0  # next seq to publish
        self._announced: dict[bytes, int] = {}  # key -> tier bits announced
        self._dirty: set[bytes] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_soon = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        # Keys reported by other threads (SSD writer/readers), handed to the loop in batches.
        self._incoming_lock = threading.Lock()
        self._incoming: list[bytes] = []
        self._incoming_scheduled = False
        self._outbox: queue.Queue[_Outgoing] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reconciler: asyncio.Task[None] | None = None
        self._rejoin: asyncio.Task[None] | None = None
        self.num_rejoins = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register, heartbeat, announce ``SourceCleared(0)`` and what the tiers hold."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        await self._loop.run_in_executor(None, self._membership.register)
        self._tiers.set_listener(self._on_tier_change)
        self._emit(events.SourceCleared(self.node_id, self._next_seq()))
        self._threads = [
            threading.Thread(target=self._publisher, name="kvstore-publish", daemon=True),
            threading.Thread(target=self._heartbeater, name="kvstore-heartbeat", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        await self.reconcile()  # what the tiers already hold (SSD blocks after a restart)
        self._reconciler = self._loop.create_task(self._reconcile_loop())

    async def stop(self) -> None:
        """Publish ``SourceCleared(SOURCE_GONE_SEQ)``, deregister, stop the threads."""
        for task in (self._reconciler, self._rejoin):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tiers.set_listener(None)
        self.flush()
        self._emit(events.SourceCleared(self.node_id, events.SOURCE_GONE_SEQ))
        self._announced.clear()
        self._outbox.put(None)
        self._stopping.set()
        loop = asyncio.get_running_loop()
        for thread in self._threads:
            await loop.run_in_executor(None, thread.join, 10.0)
        try:
            await loop.run_in_executor(None, self._membership.deregister)
        except Exception:
            logger.exception("could not deregister %s", self.node_id)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Flush, then wait until the publisher has handed everything queued to the store."""
        self.flush()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        while self._outbox.unfinished_tasks and time.monotonic() < deadline:
            await loop.run_in_executor(None, time.sleep, 0.005)

    # -- notifications (tier listener; server hooks) ---------------------------------------------

    def _on_tier_change(self, key: bytes, tier: Tier, held: bool) -> None:
        """The tiers' listener: ``key`` entered or left ``tier`` (any thread)."""
        if threading.get_ident() == self._loop_thread:
            self._mark_dirty(key)
            return
        with self._incoming_lock:
            self._incoming.append(key)
            if self._incoming_scheduled:
                return
            self._incoming_scheduled = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: nothing to publish
                loop.call_soon_threadsafe(self._take_incoming)

    def note_changed(self, keys: Iterable[bytes]) -> None:
        """``keys`` may have changed tiers: publish soon. (The tier listener already reports
        every change; this stays for callers that want a key re-checked.)"""
        for key in keys:
            self._mark_dirty(key)

    def _take_incoming(self) -> None:
        with self._incoming_lock:
            keys, self._incoming = self._incoming, []
            self._incoming_scheduled = False
        for key in keys:
            self._mark_dirty(key)

    def _mark_dirty(self, key: bytes) -> None:
        self._dirty.add(key)
        loop = self._loop
        if loop is None:
            return
        if self._flush_handle is None:
            self._flush_handle = loop.call_later(self._flush_interval, self.flush)
        if len(self._dirty) >= BATCH_KEYS and not self._flush_soon:
            self._flush_soon = True  # never flush inside a tier's call: schedule it
            loop.call_soon(self.flush)

    # -- publishing -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Publish the tier changes of the dirty keys (event loop)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._flush_soon = False
        self._take_incoming()
        dirty, self._dirty = self._dirty, set()
        if dirty:
            self._publish_diff(sorted(dirty))  # a deterministic order of keys in an event

    async def reconcile(self) -> None:
        """Diff every key any tier holds, or that was announced, against what was announced.

        The safety net behind the tier listener (and what announces a restarted node's SSD
        blocks). Chunked: the loop runs other work between chunks of
        :data:`RECONCILE_CHUNK_KEYS` keys; the SSD key list is copied on a worker thread.
        """
        loop = asyncio.get_running_loop()
        self.flush()
        sources: list[list[bytes]] = [list(self._announced)]
        sources.append(list(self._tiers.iter_keys(Tier.DRAM)))
        if self._tiers.ssd is not None:
            sources.append(
                await loop.run_in_executor(None, lambda: list(self._tiers.iter_keys(Tier.SSD)))
            )
        for keys in sources:
            for start in range(0, len(keys), RECONCILE_CHUNK_KEYS):
                self._publish_diff(keys[start : start + RECONCILE_CHUNK_KEYS])
                await asyncio.sleep(0)

    def snapshot(self) -> None:
        """Flush, then put a snapshot of the announced state into the stream (in seq order);
        it is encoded on the publisher thread."""
        self.flush()
        keys: dict[Tier, list[bytes]] = {tier: [] for tier, _bit in _TIER_BITS}
        for key, bits in self._announced.items():
            for tier, bit in _TIER_BITS:
                if bits & bit:
                    keys[tier].append(key)
        snap = events.SourceSnapshot.of(self.node_id, self._seq - 1, keys)
        self._outbox.put(lambda: events.encode_snapshot(snap))

    def dram_keys(self) -> list[bytes]:
        return list(self._tiers.iter_keys(Tier.DRAM))

    # -- internals --------------------------------------------------------------------------------

    def _actual_bits(self, keys: list[bytes]) -> list[int]:
        node = self._tiers.node
        bits = [1 if node.contains(key) else 0 for key in keys]
        ssd = self._tiers.ssd
        if ssd is not None:
            for i, present in enumerate(ssd.contains_many(keys)):
                if present:
                    bits[i] |= 2
        return bits

    def _publish_diff(self, keys: list[bytes]) -> None:
        stored: dict[Tier, list[bytes]] = {Tier.DRAM: [], Tier.SSD: []}
        removed: dict[Tier, list[bytes]] = {Tier.DRAM: [], Tier.SSD: []}
        announced = self._announced
        for key, bits in zip(keys, self._actual_bits(keys), strict=True):
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
            for start in range(0, len(stored[tier]), _KEYS_PER_EVENT):
                chunk = tuple(stored[tier][start : start + _KEYS_PER_EVENT])
                self._emit(events.BlocksStored(self.node_id, self._next_seq(), tier, chunk))
        for tier, _bit in _TIER_BITS:
            for start in range(0, len(removed[tier]), _KEYS_PER_EVENT):
                chunk = tuple(removed[tier][start : start + _KEYS_PER_EVENT])
                self._emit(events.BlocksRemoved(self.node_id, self._next_seq(), tier, chunk))

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _emit(self, event: events.KVEvent) -> None:
        self._outbox.put(events.encode_event(event))

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reconcile_interval)
            try:
                await self.reconcile()
            except Exception:
                logger.exception("reconcile failed")

    async def _restart_stream(self) -> None:
        """We were reaped while alive (a stalled heartbeat): the cluster forgot us. Start a new
        incarnation of our stream: ``SourceCleared(0)``, then everything again."""
        logger.warning("%s was removed from the members while alive; re-announcing", self.node_id)
        self.flush()
        self._announced.clear()
        self._seq = 0
        self._emit(events.SourceCleared(self.node_id, self._next_seq()))
        await self.reconcile()
        self.num_rejoins += 1

    def _schedule_rejoin(self) -> None:
        if self._rejoin is None or self._rejoin.done():
            assert self._loop is not None
            self._rejoin = self._loop.create_task(self._restart_stream())

    def _publisher(self) -> None:
        outage = OutageLog(logger, f"publishing KV events of {self.node_id}")
        done = False
        while not done:
            batch: list[bytes] = []
            taken = 0
            message = self._outbox.get()
            while True:
                taken += 1
                if message is None:
                    done = True
                    break
                try:
                    batch.append(message if isinstance(message, bytes) else message())
                except Exception:
                    logger.exception("encoding a snapshot failed")
                if len(batch) >= 512:
                    break
                try:
                    message = self._outbox.get_nowait()
                except queue.Empty:
                    break
            while batch:
                try:
                    self.store.publish(batch)
                    outage.succeeded()
                    break
                except Exception as exc:
                    outage.failed(exc)
                    if self._stopping.wait(0.5):
                        break
            for _ in range(taken):
                self._outbox.task_done()

    def beat(self) -> None:
        """One heartbeat (the heartbeat thread's loop body; blocking I/O, not on the loop).

        If the store says we are not registered, a sweep reaped us while we were alive (a
        heartbeat stalled past the timeout): :meth:`Membership.beat` registers again -- the
        heartbeat just set keeps any stale sweep from reaping the new registration -- and we
        restart the event stream, whose ``SourceCleared(0)`` then follows the sweeper's
        ``SourceCleared(SOURCE_GONE_SEQ)``.
        """
        rejoined = self._membership.beat(rejoin=not self._stopping.is_set())
        loop = self._loop
        if rejoined and loop is not None:
            loop.call_soon_threadsafe(self._schedule_rejoin)
        if self.store.take_resync_request(self.node_id) and loop is not None:
            loop.call_soon_threadsafe(self.snapshot)

    def _heartbeater(self) -> None:
        outage = OutageLog(logger, f"heartbeat of {self.node_id}")
        while not self._stopping.wait(self._hb_interval):
            try:
                self.beat()
            except Exception as exc:
                outage.failed(exc)
            else:
                outage.succeeded()
