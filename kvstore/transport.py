"""Transports: how a block's bytes move between a client and a store node, chosen per pair.

Every client talks to its node over one TCP connection (the *control channel*, kvstore.wire).
What differs is the *data path*:

==========  =====================================================  ==============================
kind        bytes move by                                          chosen when
==========  =====================================================  ==============================
``SHM``     a memory copy through the node's arena, mapped from    same host: the arena file the
            /dev/shm (kernel boot id, device, inode, size match)   client opens is provably the
                                                                   node's
``RDMA``    one-sided RDMA READ / WRITE of the node's registered   both ends have a usable RDMA
            arena into / from the client's registered staging      device (pyverbs) and the node
            buffer (kvstore.rdma)                                  accepts RDMA_CONNECT
``TCP``     the payload inside the frames (kvstore.wire)       always (the fallback)
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
import mmap
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from strata_common.host import boot_id

__all__ = [
    "DEFAULT_PREFERENCE",
    "RemoteMemory",
    "ShmMemory",
    "SkippedTransport",
    "TransportKind",
    "TransportSelection",
    "TransportUnavailable",
    "log_unavailable_once",
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


class ShmMemory:
    """The node's arena file mapped into this process (same host only).

    Mapped read-write when the file can be opened so (PUTs then go through shared memory too),
    else read-only (GETs only). The mapping is made only if the opened file is provably the one
    the node describes in its ``SHM_INFO`` reply: same kernel boot, device, inode and size --
    an address comparison would be fooled by containers, NAT and port forwarding.
    """

    def __init__(self, mapping: mmap.mmap, writable: bool) -> None:
        self._mmap = mapping
        self._view = memoryview(mapping)
        self._writable = writable

    @classmethod
    def attach(cls, info: Mapping[str, Any], local_boot_id: str | None = None) -> ShmMemory:
        """Map the arena described by ``info``; :class:`TransportUnavailable` says why not."""
        local = boot_id() if local_boot_id is None else local_boot_id
        if not local or info.get("boot_id") != local:
            raise TransportUnavailable("the node runs under another kernel (boot id differs)")
        path = str(info.get("path", ""))
        writable = True
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            writable = False
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise TransportUnavailable(f"cannot open the arena file {path!r}: {exc}") from exc
        try:
            stat = os.fstat(fd)
            if (info.get("device"), info.get("inode"), info.get("size")) != (
                stat.st_dev,
                stat.st_ino,
                stat.st_size,
            ):
                raise TransportUnavailable(f"{path!r} is not the node's arena file")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mapping = mmap.mmap(fd, stat.st_size, flags=mmap.MAP_SHARED, prot=prot)
        except OSError as exc:
            raise TransportUnavailable(f"cannot map the arena file {path!r}: {exc}") from exc
        finally:
            os.close(fd)
        return cls(mapping, writable)

    @property
    def kind(self) -> TransportKind:
        return TransportKind.SHM

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def size(self) -> int:
        return self._view.nbytes

    def mapped(self) -> memoryview:
        return self._view

    def view(self, offset: int, nbytes: int) -> memoryview:
        """A view of arena bytes (zero copy); ValueError if outside the arena."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self._view.nbytes:
            raise ValueError(f"span [{offset}, {offset + nbytes}) outside the arena")
        return self._view[offset : offset + nbytes]

    def read_into(
        self,
        spans: Sequence[tuple[int, memoryview]],
        on_copied: Callable[[int], None] | None = None,
    ) -> None:
        for i, (offset, target) in enumerate(spans):
            target[:] = self.view(offset, target.nbytes)
            if on_copied is not None:
                on_copied(i)

    def write_from(self, spans: Sequence[tuple[int, Sequence[memoryview]]]) -> None:
        if not self._writable:
            raise PermissionError("the arena is mapped read-only")
        for offset, parts in spans:
            position = offset
            for part in parts:
                self.view(position, part.nbytes)[:] = part
                position += part.nbytes

    def close(self) -> None:
        self._view.release()
        self._mmap.close()


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


def recv_exact(sock: socket.socket, target: memoryview) -> None:
    """Fill ``target`` from a blocking socket (the one receive loop of every sync kvstore socket).

    Raises :class:`ConnectionError` if the peer closes first; a timeout (:class:`TimeoutError`)
    or another :class:`OSError` propagates for the caller to map onto its errors."""
    while target.nbytes:
        received = sock.recv_into(target)
        if not received:
            raise ConnectionError("connection closed by the node")
        target = target[received:]
