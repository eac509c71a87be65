"""ClusterView: a PrefixIndex kept current from the metadata store, plus membership.

See docs/design/kvstore.md §10.8-10.9. A background thread reads the event stream, applies events
and snapshots in stream order, asks sources for snapshots after a gap, and removes members whose
heartbeat expired (a crashed node's blocks leave the index within the heartbeat timeout plus one
poll). Members are store nodes or engines (:class:`~kvstore.metadata.MemberKind`): both are
sources whose entries leave with their heartbeat, only store nodes are peers
(:meth:`ClusterView.live_nodes`). :class:`PeerFetcher` reads raw blocks from other store nodes
(read-through, migration). Imports nothing outside :mod:`kvstore`: the control plane's
scheduler can use it as is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from kvstore.blocks.hashing import BlockKey
from kvstore.blocks.tier import Tier
from kvstore.cluster.events import (
    SOURCE_GONE_SEQ,
    SourceCleared,
    decode_event,
    decode_snapshot,
    encode_event,
)
from kvstore.cluster.index import PrefixIndex
from kvstore.cluster.match import ApplyResult, PrefixMatch
from kvstore.metadata import START, MemberKind, MetadataStore, OutageLog, member_kind

__all__ = ["ClusterView"]

logger = logging.getLogger("kvstore.cluster")

_SNAPSHOT_KIND: Final = 4
_RESYNC_RETRY_S: Final = 1.0
_UNHEARD_WAIT_S: Final = 5.0
"""A live member unknown to the index this long is asked for its snapshot (refresh_membership)."""


class ClusterView:
    """Cluster-wide index of blocks by holder and tier, and which nodes are alive.

    Thread-safe: the background thread applies, callers query, under one lock.
    """

    def __init__(
        self,
        store: MetadataStore,
        *,
        poll_interval_s: float = 0.1,
        start_cursor: str = START,
        clock: Callable[[], float] = time.monotonic,
        reap_dead: bool = True,
    ) -> None:
        self._store = store
        self._reap_dead = reap_dead
        self._poll = poll_interval_s
        self._cursor = start_cursor
        self._clock = clock
        self._lock = threading.Lock()
        self._index = PrefixIndex()
        self._live: dict[str, tuple[MemberKind | None, str]] = {}  # member -> (kind, endpoint)
        self._members_seen: set[str] = set()
        self._owed: dict[str, float] = {}  # source -> when a snapshot was last requested
        self._greeted: set[str] = set()  # live members known, or asked once (see refresh)
        self._unheard: dict[str, float] = {}  # live member -> since when unknown to the index
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition(self._lock)
        self.num_reaped = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> ClusterView:
        """Catch up once (synchronously), then follow in a daemon thread."""
        self.refresh_membership()
        self.poll_once(block_s=0.001)
        self._thread = threading.Thread(target=self._run, name="kvstore-cluster-view", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def __enter__(self) -> ClusterView:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        outage = OutageLog(logger, "cluster view update")
        while not self._stop.is_set():
            try:
                self.poll_once(self._poll)
                self.refresh_membership()
            except Exception as exc:
                outage.failed(exc)
                self._stop.wait(self._poll)
            else:
                outage.succeeded()

    # -- updates ----------------------------------------------------------------------------------

    def poll_once(self, block_s: float) -> int:
        """Read and apply what the stream has (waiting up to ``block_s``); returns how many."""
        cursor, messages = self._store.read(self._cursor, block_s)
        self._cursor = cursor
        if messages:
            with self._changed:
                for message in messages:
                    self._apply(message)
                self._changed.notify_all()
        return len(messages)

    def _apply(self, message: bytes) -> None:
        try:
            if len(message) > 1 and message[1] == _SNAPSHOT_KIND:
                snapshot = decode_snapshot(message)
                # In stream order a snapshot is the source's state, and later entries are newer.
                # A dead member's is dropped -- unless the index knows the source again, i.e. a
                # new incarnation's SourceCleared came first (a member re-registering after it
                # was reaped while alive publishes both before this view next sees it live).
                source = snapshot.source
                if (
                    source in self._live
                    or source not in self._members_seen
                    or self._index.next_seq(source) > 0
                ):
                    self._index.resync(snapshot)
                    self._owed.pop(snapshot.source, None)
                return
            event = decode_event(message)
        except ValueError as exc:
            logger.warning("dropping a malformed message from the event stream: %s", exc)
            return
        # A removed (dead) source is unknown to the index again, which then refuses its
        # straggling events (GAP, not applied); only a new incarnation (seq 0) comes back.
        source = event.source
        if isinstance(event, SourceCleared) and event.seq == SOURCE_GONE_SEQ:
            self._index.remove_source(source)  # left, or reaped after a crash: forget it
            self._owed.pop(source, None)
            return
        result = self._index.apply(event)
        if result is ApplyResult.GAP and source not in self._owed:
            self._owed[source] = float("-inf")
        elif isinstance(event, SourceCleared) and source in self._owed:
            del self._owed[source]

    def refresh_membership(self) -> None:
        """Re-read members and heartbeats: drop dead ones, (re)ask owed snapshots.

        With ``reap_dead`` (the default) a member whose heartbeat expired is also removed from
        the registry, with its final ``SourceCleared(SOURCE_GONE_SEQ)`` published, by
        :meth:`MetadataStore.reap` -- atomic and conditional on the incarnation seen here, so
        whichever participant notices first does it, the others' attempts are no-ops, and a
        node that restarted meanwhile is left alone.
        """
        members = self._store.members()
        alive = self._store.alive(members)
        if self._reap_dead:
            for node, info in members.items():
                if node not in alive and self._reap(node, info):
                    self.num_reaped += 1
                    logger.info("reaped dead member %s", node)
        with self._changed:
            self._members_seen.update(members)
            self._live = {
                n: (member_kind(members[n]), str(members[n].get("endpoint", ""))) for n in alive
            }
            for source in self._index.sources():
                if source in self._members_seen and source not in self._live:
                    self._index.remove_source(source)
                    self._owed.pop(source, None)
                    logger.info("node %s is gone; its blocks left the index", source)
            # A live member this view has not heard from for a while (its events were trimmed
            # off the stream before this view read it, and it has been quiet since): ask its
            # state once, as after a gap -- else a late reader would not know a quiet source at
            # all. (A member that just joined publishes its first event within the wait.)
            now = self._clock()
            for member in list(self._unheard):
                if member not in self._live or self._index.next_seq(member) > 0:
                    del self._unheard[member]
                elif now - self._unheard[member] >= _UNHEARD_WAIT_S:
                    del self._unheard[member]
                    self._greeted.add(member)
                    self._owed.setdefault(member, float("-inf"))
            self._greeted &= self._live.keys()
            for member in self._live.keys() - self._greeted - self._unheard.keys():
                if self._index.next_seq(member) > 0:
                    self._greeted.add(member)
                else:
                    self._unheard[member] = now
            due = [s for s, at in self._owed.items() if now - at >= _RESYNC_RETRY_S]
            for source in due:
                self._owed[source] = now
            self._changed.notify_all()
        for source in due:
            if source in self._live or source not in self._members_seen:
                self._store.request_resync(source)

    def _reap(self, node: str, info: dict[str, Any]) -> bool:
        try:
            gone = encode_event(SourceCleared(node, SOURCE_GONE_SEQ))
        except ValueError:  # not a valid source id: it never published, just unregister it
            gone = None
        return self._store.reap(node, info, [gone] if gone is not None else [])

    # -- queries ----------------------------------------------------------------------------------

    def match(self, keys: Sequence[BlockKey]) -> PrefixMatch:
        with self._lock:
            return self._index.match(keys)

    def holders(self, key: BlockKey) -> list[tuple[str, Tier]]:
        """Live holders of ``key``, fastest tier first."""
        with self._lock:
            match = self._index.match([key])
            found = match.holders_at(0) if match.depth else ()
            return sorted(found, key=lambda holder: (holder[1], holder[0]))

    def live_nodes(self) -> dict[str, str]:
        """Live store nodes (the only members that serve blocks): node id -> endpoint.

        Every choice of a peer to read from or hand blocks to goes through this; engines are
        members too (:meth:`live_engines`) but never peers."""
        return self.live_members(MemberKind.STORE)

    def live_engines(self) -> dict[str, str]:
        """Live engine members (workers publishing their HBM blocks): instance id -> endpoint."""
        return self.live_members(MemberKind.ENGINE)

    def live_members(self, kind: MemberKind) -> dict[str, str]:
        """Live members of ``kind``: id -> endpoint (as registered; may be empty)."""
        with self._lock:
            return {n: endpoint for n, (k, endpoint) in self._live.items() if k is kind}

    def sources(self) -> tuple[str, ...]:
        with self._lock:
            return self._index.sources()

    def num_blocks(self) -> int:
        with self._lock:
            return self._index.num_blocks

    def wait_for(self, predicate: Callable[[ClusterView], bool], timeout_s: float = 10.0) -> bool:
        """Wait until ``predicate(self)`` holds (checked after each update); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._changed:
                self._changed.wait(min(left, 0.05))
        return True
