"""A store node's cluster side: join (register, publish, follow), read-through, the hinted
peer of a MATCH_PREFIX, leave (migrate).

Mixed into :class:`kvstore.server.lifecycle.StoreServer`; all of it is idle for a standalone node
(no ``--metadata``). Design: docs/design/kvstore.md §10.
"""

from __future__ import annotations

import asyncio
import logging
import os
import zlib
from collections.abc import Sequence
from functools import partial

from kvstore.blocks.tier import Tier
from kvstore.cluster.access import metadata_policy
from kvstore.cluster.hints import HintedHolders
from kvstore.cluster.membership import NodeAgent
from kvstore.cluster.peers import PeerFetcher
from kvstore.cluster.view import ClusterView
from kvstore.errors import KVStoreError
from kvstore.metadata import EmbeddedMetadataStore, open_metadata_store
from kvstore.metadata.service import MetadataServer
from kvstore.node.store import StoreNode
from kvstore.node.tiers import TierManager
from kvstore.server.config import StoreNodeConfig
from kvstore.wire.frame import Status
from kvstore.wire.types import PutStatus
from strata_common.credentials import ClusterCredentials, Identity
from strata_common.endpoints import format_endpoint
from strata_common.grpc_auth import ClientAuth, ServerAuthInterceptor
from strata_common.secrets import redact_url

__all__ = ["ClusterMember"]

logger = logging.getLogger("kvstore.server")


class ClusterMember:
    """Membership, read-through and migration of the server it is mixed into."""

    config: StoreNodeConfig
    node: StoreNode
    cluster_key: bytes | None
    tiers: TierManager
    metadata_server: MetadataServer | None
    agent: NodeAgent | None
    view: ClusterView | None
    fetcher: PeerFetcher | None
    hinted: HintedHolders | None = None
    """Blocks hinted peers said they hold (docs/design/kvstore.md §10.9); None standalone."""
    _loop: asyncio.AbstractEventLoop | None
    _boot_id: str

    async def join_cluster(self, host: str, port: int) -> None:
        """Register with the metadata store, start publishing and following the cluster."""
        config = self.config
        if config.metadata is None:
            return
        loop = asyncio.get_running_loop()
        endpoint = format_endpoint(host, port)
        tls = config.tls if config.tls.enabled else None
        node_id = config.node_id or (tls.identity().name if tls is not None else endpoint)
        # TLS or secret mode (docs/design/security.md §5.1): this node is store/NODE_ID to
        # another node's metadata service, and its own service checks every caller.
        key = self.cluster_key
        auth: ClientAuth | None = None
        if tls is not None:
            auth = ClientAuth.from_tls(tls, "store", key)
        elif key is not None:
            auth = ClientAuth(key, Identity("store", node_id))
        store = await loop.run_in_executor(
            None, partial(open_metadata_store, config.metadata, auth=auth)
        )
        if isinstance(store, EmbeddedMetadataStore):  # only an embedded store is served
            interceptors = []
            if auth is not None:  # TLS mode: the caller's certificate (key None)
                interceptors = [ServerAuthInterceptor(None if tls else key, metadata_policy)]
            self.metadata_server = MetadataServer(
                store, config.host, config.metadata_port, interceptors=interceptors, tls=tls
            )
            await self.metadata_server.start()
        info = {
            "endpoint": endpoint,
            "pid": os.getpid(),
            "boot_id": self._boot_id,
            "arena_path": self.node.arena.path,
        }
        self.agent = NodeAgent(
            store,
            node_id,
            info,
            self.tiers,
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            flush_interval_s=config.event_flush_interval_s,
            reconcile_interval_s=config.reconcile_interval_s,
        )
        await self.agent.start()
        self.hinted = HintedHolders()
        self.view = ClusterView(store, poll_interval_s=min(0.1, config.heartbeat_interval_s))
        await loop.run_in_executor(None, self.view.start)
        credentials = None
        if tls is not None:  # its peers' certificates must name store nodes
            credentials = tls.credentials("store")
        elif self.cluster_key is not None:  # its peers hold the same key
            credentials = ClusterCredentials(self.cluster_key, Identity("store", node_id))
        self.fetcher = PeerFetcher(
            credentials=credentials, max_block_bytes=self.config.max_block_bytes
        )
        logger.info(
            "joined the cluster as %s (metadata %s)", node_id, redact_url(config.metadata or "")
        )

    def note_changed(self, keys: list[bytes]) -> None:
        if self.agent is not None:
            self.agent.note_changed(keys)

    def _live_holders(self, key: bytes, live: dict[str, str], me: str) -> list[tuple[str, Tier]]:
        """``(node id, tier)`` of the live peers holding ``key``, fastest tier first: the
        index's, else the one a hinted peer named (:meth:`match_hinted`) while still live."""
        assert self.view is not None
        held = [(n, tier) for n, tier in self.view.holders(key) if n != me and n in live]
        if not held and self.hinted is not None:
            hinted = self.hinted.holder(key)
            if hinted is not None and hinted[0] != me and hinted[0] in live:
                held = [hinted]
        return held

    def peers_holding(self, key: bytes) -> list[str]:
        """Endpoints of live peers that hold ``key``, fastest tier first."""
        if self.view is None or self.agent is None:
            return []
        live = self.view.live_nodes()
        return [live[n] for n, _tier in self._live_holders(key, live, self.agent.node_id)]

    def peer_prefix(self, keys: Sequence[bytes]) -> list[Tier]:
        """The tier at which a live peer holds each leading key of ``keys`` (the fastest first;
        stops at the first key no live peer holds): what this node can read through."""
        if self.view is None or self.agent is None:
            return []
        live = self.view.live_nodes()
        me = self.agent.node_id
        tiers: list[Tier] = []
        for key in keys:
            held = self._live_holders(key, live, me)
            if not held:
                break
            tiers.append(held[0][1])
        return tiers

    def hinted_peer(self, node_id: str) -> str | None:
        """The endpoint of the live store node a MATCH_PREFIX hint names, as this node's view
        of the cluster has it; None for this node itself, an unknown or a dead one (never an
        address from a request)."""
        if self.view is None or self.agent is None or node_id == self.agent.node_id:
            return None
        return self.view.live_nodes().get(node_id)

    def match_hinted(
        self, node_id: str, endpoint: str, keys: list[bytes]
    ) -> asyncio.Future[list[Tier]]:
        """Ask the hinted peer (``node_id`` at ``endpoint``) MATCH_PREFIX of ``keys`` on a
        thread, within ``--hint-timeout``; what it holds is remembered (``hinted``) so that the
        LEASE_BATCH that follows reads them through before the index knows of them."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self._match_hinted_blocking, node_id, endpoint, keys)

    def _match_hinted_blocking(self, node_id: str, endpoint: str, keys: list[bytes]) -> list[Tier]:
        assert self.fetcher is not None and self.hinted is not None
        tiers = self.fetcher.match_prefix(endpoint, keys, timeout_s=self.config.hint_timeout_s)
        if tiers:
            self.hinted.add(node_id, keys[: len(tiers)], tiers)
        return tiers

    def fetch_remote(self, key: bytes) -> asyncio.Future[tuple[bytes, int] | None]:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self._fetch_remote_blocking, key)

    def _fetch_remote_blocking(self, key: bytes) -> tuple[bytes, int] | None:
        assert self.fetcher is not None
        for endpoint in self.peers_holding(key):
            try:
                found = self.fetcher.get_block(endpoint, key)
            except (OSError, ValueError, KVStoreError) as exc:  # ValueError: a bad endpoint
                logger.warning("read-through from %s failed: %s", endpoint, exc)
                continue
            if found is not None:
                if self.config.replicate_on_read and self._loop is not None:
                    self._loop.call_soon_threadsafe(self.keep_copy, key, found[0])
                return found
        return None

    def fetch_remote_many(
        self, keys: list[bytes]
    ) -> asyncio.Future[list[tuple[bytes, int] | None]]:
        """Read-through of a batch (a LEASE_BATCH's keys that miss here): one pipelined round
        trip per peer holding some of them, the next holder tried for what one misses."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self._fetch_remote_many_blocking, keys)

    def _fetch_remote_many_blocking(self, keys: list[bytes]) -> list[tuple[bytes, int] | None]:
        assert self.fetcher is not None
        found: list[tuple[bytes, int] | None] = [None] * len(keys)
        tried: list[set[str]] = [set() for _ in keys]
        pending = list(range(len(keys)))
        while pending:
            by_peer: dict[str, list[int]] = {}
            for i in pending:
                holders = [e for e in self.peers_holding(keys[i]) if e not in tried[i]]
                if holders:
                    by_peer.setdefault(holders[0], []).append(i)
            pending = []
            for endpoint, indices in by_peer.items():
                for i in indices:
                    tried[i].add(endpoint)
                try:
                    blocks = self.fetcher.get_blocks(endpoint, [keys[i] for i in indices])
                except (OSError, ValueError, KVStoreError) as exc:  # ValueError: a bad endpoint
                    logger.warning("read-through from %s failed: %s", endpoint, exc)
                    pending += indices
                    continue
                for i, block in zip(indices, blocks, strict=True):
                    if block is None:
                        pending.append(i)
                    else:
                        found[i] = block
        return found

    def keep_copy(self, key: bytes, block: bytes) -> bool:
        """Store a block read through from a peer here (and announce it); whether it is here
        now (stored, or already was)."""
        status = self.node.put(key, block)
        if status is PutStatus.OK:
            self.tiers.note_commit(key)
            self.note_changed([key])
        return status in (PutStatus.OK, PutStatus.EXISTS)

    def cluster_stats(self) -> dict[str, object] | None:
        """This node's view of the cluster for STATS (None when standalone): its id, the live
        store nodes, the index's sources (nodes and engines whose blocks it holds) and size.
        A lost node leaves ``live_nodes`` and ``sources`` when its heartbeat expires."""
        view, agent = self.view, self.agent
        if view is None or agent is None:
            return None
        return {
            "node_id": agent.node_id,
            "live_nodes": sorted(view.live_nodes()),
            "sources": sorted(view.sources()),
            "index_blocks": view.num_blocks(),
        }

    async def leave_cluster(self) -> None:
        """Graceful leave: migrate DRAM blocks if configured, then clear and deregister. Also
        undoes a join that failed half-way (whatever of it was started is stopped)."""
        agent, view = self.agent, self.view
        loop = asyncio.get_running_loop()
        if agent is not None and view is not None and self.config.leave_policy == "migrate":
            try:
                await self._migrate(loop, agent, view)
            except Exception:
                logger.exception("migration on leave failed; dropping the rest")
        if agent is not None:
            await agent.stop()
        if view is not None:
            await loop.run_in_executor(None, view.stop)
        if self.metadata_server is not None:
            await self.metadata_server.stop()
            self.metadata_server = None
        if self.fetcher is not None:
            self.fetcher.close()
        self.agent = None
        self.view = None

    async def _migrate(
        self, loop: asyncio.AbstractEventLoop, agent: NodeAgent, view: ClusterView
    ) -> None:
        peers = {n: e for n, e in view.live_nodes().items() if n != agent.node_id}
        if not peers or self.fetcher is None:
            logger.warning("leave-policy migrate: no live peer; dropping DRAM blocks")
            return
        target = max(peers, key=lambda n: zlib.crc32(f"{n}/{agent.node_id}".encode()))
        moved, batch, size = 0, [], 0
        keys = agent.dram_keys()
        for i, key in enumerate(keys):
            block = self.node.get(key)
            if block is not None:
                batch.append(block)
                size += len(block)
            if batch and (size >= 16 * 1024**2 or i == len(keys) - 1):
                statuses = await loop.run_in_executor(
                    None, self.fetcher.put_blocks, peers[target], batch
                )
                moved += sum(1 for s in statuses if s in (Status.OK, Status.EXISTS))
                batch, size = [], 0
        logger.info("migrated %d of %d DRAM blocks to %s", moved, len(keys), target)
