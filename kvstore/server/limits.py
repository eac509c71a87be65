"""The bounds a store node holds its connections to, as pure rules (no I/O, an injected clock).

A node's resources are bounded per connection and node-wide; the values come from
:class:`~kvstore.server.config.StoreNodeConfig` (each one's default and reason are documented
there and in docs/design/kvstore.md §11.4):

* **Memory per connection is constant.** Every request but a PUT fits one fixed receive buffer
  (:data:`RECV_BUFFER_BYTES`, mapped lazily: an idle connection touches one page of it); a header
  claiming more is a malformed frame (:data:`kvstore.wire.frame.MAX_REQUEST_PAYLOAD`), and a PUT's
  payload lands in the arena space reserved for it or is drained.
* **Connections** beyond ``max_connections`` are closed as soon as they are accepted.
* **Time** (:class:`Deadlines`): a frame begun must be complete within ``header_timeout_s``, a
  PUT's payload (or an open RESERVE_BATCH) within ``put_timeout_s``; a lease may be held for
  ``lease_timeout_s``; a connection with no traffic either way for ``idle_timeout_s`` is closed.
  The server's reaper applies :meth:`Deadlines.expired` to each connection's :class:`Activity`.
* **Pinned arena space** (:class:`PinLimits`): the leases (GET_SHM, LEASE_BATCH) and reservations
  (RESERVE_BATCH) that connections hold keep blocks from being evicted, so their total is capped
  node-wide and per connection, and the rest of the arena always stays evictable for new blocks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvstore.wire.frame import FRAME_HEADER_BYTES, KEY_BYTES, MAX_REQUEST_PAYLOAD

__all__ = [
    "MAX_FETCHES_PER_CONNECTION",
    "MAX_OPEN_PUT_BATCHES",
    "MAX_QUEUED_REPLIES",
    "MAX_SHM_LEASES_PER_CONNECTION",
    "RECV_BUFFER_BYTES",
    "Activity",
    "Deadlines",
    "Expiry",
    "LimitCounters",
    "Pin",
    "PinLimits",
    "split_keys",
]

_PAGE = 4096
RECV_BUFFER_BYTES = -(-(FRAME_HEADER_BYTES + MAX_REQUEST_PAYLOAD) // _PAGE) * _PAGE
"""Each connection's receive buffer: the largest request but a PUT fits whole (68 KiB)."""
MAX_SHM_LEASES_PER_CONNECTION = 4096
MAX_OPEN_PUT_BATCHES = 256
"""RESERVE_BATCHes one connection may have open (not yet committed); a client pipelines a few.
Each open batch holds its reply state even when it reserved nothing (every key refused)."""
MAX_FETCHES_PER_CONNECTION = 8
"""SSD reads one connection may have in flight (the disk wants queue depth)."""
MAX_QUEUED_REPLIES = 64
"""Responses one connection may hold back behind pending SSD reads before it stops reading."""
MAX_REAPER_PERIOD_S = 1.0


def split_keys(payload: memoryview) -> list[bytes]:
    raw = bytes(payload)
    return [raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]


class Expiry(enum.Enum):
    """Which of a connection's deadlines passed (the reaper then closes it)."""

    HEADER = "header"
    """A frame (its header, or the payload of a request other than PUT) stalled half-received."""
    PAYLOAD = "payload"
    """A PUT's payload, or an open RESERVE_BATCH, not finished within the put timeout."""
    LEASE = "lease"
    """A lease held past the lease timeout (or a reply holding one, unread by its client)."""
    IDLE = "idle"
    """Nothing received or sent for the idle timeout."""


@dataclass(frozen=True, slots=True)
class Activity:
    """A connection's clocks at one moment, in loop time; None where that clock is not running.

    ``frame_since`` runs only while the node is reading that connection (a frame the node has not
    read on because the client does not read its replies is not the client's stall)."""

    last_progress: float
    """The last time bytes were received from it or handed to the kernel for it."""
    frame_since: float | None = None
    """Since when a frame has been partly received (header or a non-PUT payload)."""
    payload_since: float | None = None
    """Since when a PUT's payload (or a RESERVE_BATCH's reservation) has been in flight."""
    lease_since: float | None = None
    """Since when it has held its oldest lease."""


@dataclass(frozen=True, slots=True)
class Deadlines:
    """The four time limits of a connection (seconds, all positive)."""

    header_timeout_s: float
    put_timeout_s: float
    lease_timeout_s: float
    idle_timeout_s: float

    def __post_init__(self) -> None:
        if min(self.header_timeout_s, self.put_timeout_s, self.lease_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")
        if self.idle_timeout_s <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def reaper_period_s(self) -> float:
        """How often the reaper looks: a deadline is enforced at most this late (≤ 1 s)."""
        shortest = min(
            self.header_timeout_s, self.put_timeout_s, self.lease_timeout_s, self.idle_timeout_s
        )
        return min(MAX_REAPER_PERIOD_S, shortest / 4)

    def expired(self, activity: Activity, now: float) -> Expiry | None:
        """The first deadline ``activity`` has passed at ``now`` (a stalled transfer before an
        idle connection), or None."""
        if activity.payload_since is not None and now - activity.payload_since > self.put_timeout_s:
            return Expiry.PAYLOAD
        if activity.frame_since is not None and now - activity.frame_since > self.header_timeout_s:
            return Expiry.HEADER
        if activity.lease_since is not None and now - activity.lease_since > self.lease_timeout_s:
            return Expiry.LEASE
        if now - activity.last_progress > self.idle_timeout_s:
            return Expiry.IDLE
        return None

    def reason(self, expiry: Expiry) -> str:
        """Why a connection is closed, for the log."""
        return {
            Expiry.HEADER: f"a frame not complete within {self.header_timeout_s:g}s",
            Expiry.PAYLOAD: f"payload not received within {self.put_timeout_s:g}s; abandoning it",
            Expiry.LEASE: f"a lease held for more than {self.lease_timeout_s:g}s; releasing them",
            Expiry.IDLE: f"idle for more than {self.idle_timeout_s:g}s",
        }[expiry]


class Pin(enum.Enum):
    """The answer to a request to pin arena space (a lease or a reservation)."""

    OK = "ok"
    DEFER = "defer"
    """Over this connection's share: granted once the connection releases what it holds."""
    REFUSE = "refuse"
    """Over the node-wide cap: not now; the client takes the TCP path (no long-lived pin)."""


@dataclass(frozen=True, slots=True)
class PinLimits:
    """Caps on arena bytes held pinned by connections: ``node_bytes`` by all together,
    ``connection_bytes`` by any one.

    A connection that holds nothing may always pin one block within the node-wide cap
    (``at_least_one``), so a reader of blocks larger than its share still makes progress; a
    reader over its share is deferred, not refused, because it is about to release what it holds.
    """

    node_bytes: int
    connection_bytes: int

    @classmethod
    def of_arena(
        cls, arena_bytes: int, node_fraction: float, connection_fraction: float
    ) -> PinLimits:
        return cls(int(arena_bytes * node_fraction), int(arena_bytes * connection_fraction))

    def verdict(
        self, node_pinned: int, connection_pinned: int, nbytes: int, *, at_least_one: bool
    ) -> Pin:
        """May a connection holding ``connection_pinned`` bytes pin ``nbytes`` more, with
        ``node_pinned`` bytes pinned node-wide (its own included)?"""
        if node_pinned + nbytes > self.node_bytes:
            return Pin.REFUSE
        if connection_pinned + nbytes <= self.connection_bytes:
            return Pin.OK
        if at_least_one and connection_pinned == 0:
            return Pin.OK
        return Pin.DEFER


@dataclass(slots=True)
class LimitCounters:
    """What the limits refused or cut (STATS ``limits``): exact counts, for tests and operators."""

    connections_refused: int = 0
    """Connections closed on accept: ``max_connections`` were open."""
    malformed_frames: int = 0
    """Connections closed for a frame that cannot be trusted (bad header, count or length)."""
    header_timeouts: int = 0
    payload_timeouts: int = 0
    idle_closed: int = 0
    pins_deferred: int = 0
    """Leases not granted because the connection held its share (the client asks again)."""
    pins_refused: int = 0
    """Leases and RESERVE_BATCHes refused at the node-wide cap (the client uses TCP)."""
    pinned_bytes: int = 0
    """Arena bytes pinned by connections' leases and reservations (when STATS was answered)."""
    log_lines_suppressed: int = 0
    """Warnings about peers not written because one of their kind was written recently."""

    def count(self, expiry: Expiry) -> None:
        if expiry is Expiry.HEADER:
            self.header_timeouts += 1
        elif expiry is Expiry.PAYLOAD:
            self.payload_timeouts += 1
        elif expiry is Expiry.IDLE:
            self.idle_closed += 1
