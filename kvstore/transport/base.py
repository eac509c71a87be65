"""Transports: how a block's bytes move between a client and a store node, chosen per pair.

Every client talks to its node over one TCP connection (the *control channel*, kvstore.wire).
What differs is the *data path*:

==========  =====================================================  ==============================
kind        bytes move by                                          chosen when
==========  =====================================================  ==============================
``SHM``     a memory copy through the node's arena, mapped from    same host: the arena file the
            /dev/shm (kernel boot id, device, inode, size match)   client opens is provably the
            (:mod:`kvstore.transport.shm`)                         node's
``RDMA``    one-sided RDMA READ / WRITE of the node's registered   both ends have a usable RDMA
            arena into / from the client's registered staging      device (pyverbs) and the node
            buffer (:mod:`kvstore.transport.rdma`)                 accepts RDMA_CONNECT
``TCP``     the payload inside the frames (kvstore.wire;           always (the fallback)
            :mod:`kvstore.transport.tcp`)
==========  =====================================================  ==============================

SHM and RDMA are the same protocol with a different copy engine: a batch of GETs is one
``LEASE_BATCH`` round trip (the node pins the blocks and says where they are), the client moves
the bytes itself, and one ``RELEASE_BATCH`` (no reply) unpins them; a batch of PUTs is
``RESERVE_BATCH`` (two-phase put: space reserved, invisible), the client writes the blocks, and
``COMMIT_BATCH`` (the node verifies each checksum, then makes the blocks visible). So both
implement one small interface, :class:`RemoteMemory` -- "copy these arena spans into my
buffers / my buffers into these arena spans" -- and the client code above it is shared.

Selection (:func:`select_transport`) walks an ordered preference (default SHM, RDMA, TCP) and
takes the first data path that attaches; each one that does not is skipped with its reason,
logged once per process per (kind, reason) so that a fleet of clients on a machine without RDMA
does not log the same line per connection. TCP needs nothing and always attaches.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "DEFAULT_PREFERENCE",
    "Attacher",
    "RemoteMemory",
    "SkippedTransport",
    "TransportKind",
    "TransportSelection",
    "TransportUnavailable",
    "log_unavailable_once",
    "logger",
    "select_transport",
]


logger = logging.getLogger(__name__)


class TransportKind(enum.StrEnum):
    """A data path. String values so that ``client.transport == "shm"`` reads naturally."""

    SHM = "shm"
    RDMA = "rdma"
    TCP = "tcp"


DEFAULT_PREFERENCE: tuple[TransportKind, ...] = (
    TransportKind.SHM,
    TransportKind.RDMA,
    TransportKind.TCP,
)


class TransportUnavailable(Exception):
    """A data path cannot be used for this pair of endpoints; ``str(exc)`` is the reason."""


class RemoteMemory(Protocol):
    """The data half of a one-sided transport: copies between the node's arena and the caller.

    Offsets are byte offsets into the node's arena as the node reports them (LEASE_BATCH,
    RESERVE_BATCH). The control messages that make those offsets safe to touch (leases,
    reservations) are the caller's business.
    """

    @property
    def kind(self) -> TransportKind: ...

    @property
    def writable(self) -> bool:
        """Whether :meth:`write_from` may be used (PUTs); reads are always possible."""
        ...

    def mapped(self) -> memoryview | None:
        """The whole arena if it is mapped into this process (shared memory), else None.

        Lets a reader check a block's header in place and copy the payload in one step; a
        transport that must move bytes first (RDMA) answers None and is used via
        :meth:`read_into`.
        """
        ...

    def read_into(
        self,
        spans: Sequence[tuple[int, memoryview]],
        on_copied: Callable[[int], None] | None = None,
    ) -> None:
        """For each ``(offset, target)``: fill ``target`` with arena bytes from ``offset``.

        ``on_copied(i)``, if given, runs once span ``i`` is in place and before any span after
        the next batch of transfers: the shared-memory path calls it right after each copy, so
        that a checksum reads the block while it is still in the CPU cache.
        """
        ...

    def write_from(self, spans: Sequence[tuple[int, Sequence[memoryview]]]) -> None:
        """For each ``(offset, parts)``: write the parts, back to back, into the arena."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SkippedTransport:
    """A data path that was tried for an endpoint and not used, and why."""

    kind: TransportKind
    reason: str


@dataclass(frozen=True, slots=True)
class TransportSelection:
    """The outcome of :func:`select_transport`: the data path to use (``memory`` is None for
    TCP) and every preferred one skipped before it."""

    kind: TransportKind
    memory: RemoteMemory | None
    skipped: tuple[SkippedTransport, ...]


Attacher = Callable[[], RemoteMemory]
"""Attaches one data path to the node (may talk over the control channel); raises
:class:`TransportUnavailable` (or ``OSError``) with the reason if it cannot."""


_logged: set[tuple[TransportKind, str]] = set()


_logged_lock = threading.Lock()


def log_unavailable_once(kind: TransportKind, reason: str) -> bool:
    """Log that ``kind`` is unavailable, once per process per reason; True if it logged."""
    with _logged_lock:
        if (kind, reason) in _logged:
            return False
        _logged.add((kind, reason))
    logger.info("%s transport unavailable: %s; falling back", kind.value, reason)
    return True


def select_transport(
    preference: Sequence[TransportKind], attachers: Mapping[TransportKind, Attacher]
) -> TransportSelection:
    """Attach the first preferred data path that works; TCP ends every list implicitly.

    A kind without an attacher is skipped as "not offered" (e.g. RDMA when the client was built
    without it). Exceptions other than :class:`TransportUnavailable` and ``OSError`` propagate:
    they are bugs or a broken control channel, not an absent transport.
    """
    skipped: list[SkippedTransport] = []
    for kind in preference:
        if kind is TransportKind.TCP:
            return TransportSelection(kind, None, tuple(skipped))
        attach = attachers.get(kind)
        if attach is None:
            skipped.append(SkippedTransport(kind, "not offered"))
            continue
        try:
            memory = attach()
        except (TransportUnavailable, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            log_unavailable_once(kind, reason)
            skipped.append(SkippedTransport(kind, reason))
            continue
        return TransportSelection(kind, memory, tuple(skipped))
    return TransportSelection(TransportKind.TCP, None, tuple(skipped))
