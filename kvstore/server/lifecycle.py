"""The store node server's lifecycle: listen, serve connections, stop; its STATS and SHM_INFO.

:class:`StoreServer` owns the listening socket, the connections (:mod:`kvstore.server.connection`)
and the node; its cluster side (join, read-through, leave) is :class:`ClusterMember`. It admits at
most ``max_connections`` connections, and its reaper closes those past a deadline
(:class:`kvstore.server.limits.Deadlines`). Warnings a peer can cause go through its one
rate-limited log (``log``: a line per kind per :data:`PEER_LOG_INTERVAL_S`).

A connection admitted under ``max_connections`` (:meth:`StoreServer.admit`) must, on a node with
a cluster key, complete the HELLO handshake (:mod:`kvstore.server.auth`) within the header
timeout of being accepted; until then only the handshake's frames (≤ 176 bytes) are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path

from kvstore.cluster.membership import NodeAgent
from kvstore.cluster.peers import PeerFetcher
from kvstore.cluster.view import ClusterView
from kvstore.metadata.service import MetadataServer
from kvstore.node.store import StoreNode
from kvstore.node.tiers import TierManager
from kvstore.server.cluster_member import ClusterMember
from kvstore.server.config import StoreNodeConfig
from kvstore.server.connection import Connection
from kvstore.server.limits import Deadlines, Expiry, LimitCounters, PinLimits
from kvstore.server.transfer import TransferCounters
from kvstore.transport.base import TransportKind, TransportUnavailable, log_unavailable_once
from kvstore.transport.rdma import RdmaNodeEndpoint
from strata_common.credentials import read_cluster_key
from strata_common.host import boot_id
from strata_common.ratelog import RateLimitedLog
from strata_common.tls import TlsConfig

__all__ = ["PEER_LOG_INTERVAL_S", "StoreServer", "deadlines_of"]

logger = logging.getLogger("kvstore.server")

PEER_LOG_INTERVAL_S = 10.0
"""At most one warning of each kind a peer can cause (a bad frame, a timeout, ...) this often."""


def deadlines_of(config: StoreNodeConfig) -> Deadlines:
    return Deadlines(
        header_timeout_s=config.header_timeout_s,
        put_timeout_s=config.put_timeout_s,
        lease_timeout_s=config.lease_timeout_s,
        idle_timeout_s=config.idle_timeout_s,
    )


class StoreServer(ClusterMember):
    """Owns the listening socket, the connections and the node; start, serve, stop."""

    def __init__(
        self, config: StoreNodeConfig, node: StoreNode, tiers: TierManager | None = None
    ) -> None:
        self.config = config
        self.cluster_key: bytes | None = None
        """Every connection must prove it holds this key before any request (kvstore.server.auth);
        None: no credentials (read from ``config.cluster_key_file``)."""
        if config.cluster_key_file is not None:
            self.cluster_key = read_cluster_key(Path(config.cluster_key_file))
        self.tls: TlsConfig | None = config.tls if config.tls.enabled else None
        """TLS mode (docs/design/security.md §3.1): connections are mutual TLS under the cluster
        CA, and HELLO must name the client certificate's identity."""
        self.node = node
        self.tiers = tiers if tiers is not None else TierManager(node)
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all_closed: asyncio.Event | None = None
        self._boot_id = boot_id()
        # Distribution (docs/design/kvstore.md §10); all None for a standalone node.
        self.agent: NodeAgent | None = None
        self.view: ClusterView | None = None
        self.fetcher: PeerFetcher | None = None
        # This node's embedded metadata, served to the host over gRPC (kvstore.metadata.service).
        self.metadata_server: MetadataServer | None = None
        self.transfers = TransferCounters()
        self.limits = LimitCounters()
        self.deadlines = deadlines_of(config)
        self.pin_limits = PinLimits.of_arena(
            node.arena.size, config.max_pinned_fraction, config.max_pinned_per_connection
        )
        self.log = RateLimitedLog(logger, PEER_LOG_INTERVAL_S)
        self._rdma: RdmaNodeEndpoint | str | None = None  # endpoint, or why there is none

    @property
    def authenticates(self) -> bool:
        """Whether every connection must pass HELLO before anything else (a key, or TLS)."""
        return self.cluster_key is not None or self.tls is not None

    def rdma_endpoint(self) -> RdmaNodeEndpoint | str:
        """The arena registered for RDMA (on first use), or the reason RDMA is unavailable."""
        if self._rdma is None:
            try:
                self._rdma = RdmaNodeEndpoint(self.node.arena.address, self.node.arena.size)
            except TransportUnavailable as exc:
                self._rdma = str(exc)
                log_unavailable_once(TransportKind.RDMA, str(exc))
        return self._rdma

    def drop_rdma(self, handle: object) -> None:
        if isinstance(self._rdma, RdmaNodeEndpoint):
            self._rdma.drop(handle)

    async def start(self) -> tuple[str, int]:
        """Listen and return the bound (host, port) -- the port is real even if 0 was asked."""
        self._loop = asyncio.get_running_loop()
        self._all_closed = asyncio.Event()
        self._server = await self._loop.create_server(
            lambda: Connection(self),
            self.config.host,
            self.config.port,
            reuse_address=True,
            backlog=1024,
            ssl=None if self.tls is None else self.tls.server_context(),
            # A client that never finishes the TLS handshake is dropped like a stalled header.
            ssl_handshake_timeout=None if self.tls is None else self.config.header_timeout_s,
        )
        self._reaper = self._loop.create_task(self._reap())
        self.tiers.start()
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop accepting, let connections flush for up to ``grace_s``, then drop the rest;
        then stop the tiers' background work and close the SSD tier."""
        await self.leave_cluster()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self.connections and self._all_closed is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace_s)
        for conn in list(self.connections):
            conn.abort("shutting down")
        if self._server is not None:
            # After the connections: some loops' wait_closed also waits for them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), grace_s)
        await asyncio.sleep(0)  # let connection_lost callbacks run
        await self.tiers.close()

    def loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def admit(self, conn: Connection) -> bool:
        """Take a new connection unless ``max_connections`` are open (it is closed then)."""
        limit = self.config.max_connections
        if len(self.connections) >= limit:
            self.limits.connections_refused += 1
            self.log.warning(
                "connection refused",
                "refusing connection from %s: %d connections open (max_connections)",
                conn.peer,
                limit,
            )
            return False
        self.connections.add(conn)
        return True

    def pinned_bytes(self) -> int:
        """Arena bytes all connections hold leased or reserved (what ``pin_limits`` caps)."""
        return sum(conn.pinned_bytes() for conn in self.connections)

    def connection_closed(self) -> None:
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def stats(self) -> dict[str, object]:
        stats = dataclasses.asdict(self.node.stats())
        stats["num_connections"] = len(self.connections)
        stats["transfers"] = dataclasses.asdict(self.transfers)
        self.limits.pinned_bytes = self.pinned_bytes()
        self.limits.log_lines_suppressed = self.log.total_suppressed
        stats["limits"] = dataclasses.asdict(self.limits)
        stats["tiers"] = dataclasses.asdict(self.tiers.stats())
        ssd = self.tiers.ssd
        stats["ssd"] = dataclasses.asdict(ssd.stats()) if ssd is not None else None
        stats["cluster"] = self.cluster_stats()
        return stats

    def shm_info(self) -> dict[str, object]:
        arena = self.node.arena
        return {
            "path": arena.path,
            "size": arena.size,
            "device": arena.device,
            "inode": arena.inode,
            "boot_id": self._boot_id,
        }

    async def _reap(self) -> None:
        """Close every connection past one of its deadlines, every ``reaper_period_s``."""
        deadlines = self.deadlines
        while True:
            await asyncio.sleep(deadlines.reaper_period_s)
            now = self.loop_time()
            for conn in list(self.connections):
                expiry = deadlines.expired(conn.activity(), now)
                if expiry is None:
                    continue
                if expiry is Expiry.LEASE:
                    self.transfers.lease_timeouts += 1
                else:
                    self.limits.count(expiry)
                level = logging.INFO if expiry is Expiry.IDLE else logging.WARNING
                conn.abort(deadlines.reason(expiry), f"deadline {expiry.value}", level)
