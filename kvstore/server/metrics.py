"""The store node's Prometheus metrics: ``GET /metrics`` on ``--metrics-port``.

Every series is read from the node's own counters when scraped (a custom collector over
``NodeStats``, ``TierStats``, ``TransferCounters`` and the connection limits), so there is one
owner per figure -- the node -- and nothing to keep in step. The scrape runs on the node's event
loop, the one thread that owns that state.

The port serves counts and sizes only: no key, no block, no client or peer address. It has no
authentication (as a gateway's ``/metrics``), so it may listen off loopback without TLS; a
NetworkPolicy keeps it to the scraper on a cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvstore.server.lifecycle import StoreServer

__all__ = ["MetricsServer", "StoreCollector"]

logger = logging.getLogger("kvstore.server.metrics")

_PREFIX = "strata_store_"


class StoreCollector(Collector):
    """Renders one store node's counters as Prometheus series at each scrape."""

    def __init__(self, server: StoreServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server
        node, tiers, moved = server.node.stats(), server.tiers.stats(), server.transfers

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(_PREFIX + name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(_PREFIX + name, doc, value=value)

        hits = CounterMetricFamily(
            _PREFIX + "hits",
            "Block reads answered, by the tier that held the block (peer: read through from "
            "another node)",
            labels=["tier"],
        )
        hits.add_metric(["dram"], tiers.dram_hits)
        hits.add_metric(["ssd"], tiers.ssd_hits)
        hits.add_metric(["peer"], moved.read_through_blocks)
        yield hits
        yield counter("misses", "Block reads no tier held", tiers.misses)
        blocks = GaugeMetricFamily(_PREFIX + "blocks", "Blocks held, by tier", labels=["tier"])
        blocks.add_metric(["dram"], tiers.dram_blocks)
        blocks.add_metric(["ssd"], tiers.ssd_blocks)
        yield blocks
        held = GaugeMetricFamily(_PREFIX + "stored_bytes", "Bytes held, by tier", labels=["tier"])
        held.add_metric(["dram"], tiers.dram_bytes)
        held.add_metric(["ssd"], tiers.ssd_bytes)
        yield held
        yield gauge("arena_capacity_bytes", "Size of the DRAM arena", node.arena.capacity_bytes)
        yield gauge("arena_used_bytes", "Arena bytes allocated to blocks", node.arena.used_bytes)
        yield counter("puts", "Blocks stored (PUT and committed reservations)", node.puts)
        yield counter("puts_full", "PUTs refused: nothing evictable made room", node.puts_full)
        yield counter("evictions", "Blocks evicted from DRAM", node.evictions)
        yield counter("spills", "Blocks written from DRAM to SSD", tiers.spills)
        yield counter("spill_bytes", "Bytes written from DRAM to SSD", tiers.spill_bytes)
        yield counter("promotions", "Blocks read back from SSD into DRAM", tiers.promotions)

        moved_bytes = CounterMetricFamily(
            _PREFIX + "transfer_bytes",
            "Bytes moved, by path: socket_in/socket_out on the node's connections (TCP, TLS); "
            "shm_or_rdma_out leased to readers that copy from the arena; shm_or_rdma_in written "
            "into the arena by reservation; peer_in read through from other nodes",
            labels=["path"],
        )
        moved_bytes.add_metric(["socket_in"], moved.bytes_received)
        moved_bytes.add_metric(["socket_out"], moved.bytes_sent)
        moved_bytes.add_metric(["shm_or_rdma_out"], moved.leased_bytes)
        moved_bytes.add_metric(["shm_or_rdma_in"], moved.committed_bytes)
        moved_bytes.add_metric(["peer_in"], moved.read_through_bytes)
        yield moved_bytes
        corrupt, timeouts = moved.corrupt_blocks, moved.lease_timeouts
        yield counter("corrupt_blocks", "Reserved blocks whose checksum failed", corrupt)
        yield counter("lease_timeouts", "Connections closed for holding a lease too long", timeouts)
        yield gauge("connections", "Open connections", len(server.connections))
        pinned = server.pinned_bytes()
        yield gauge("pinned_bytes", "Arena bytes held by leases and reservations", pinned)
        yield gauge("leases", "Leases held", node.num_leases)
        cluster = server.cluster_stats()
        if cluster is not None:
            live = cluster["live_nodes"]
            assert isinstance(live, list)
            yield gauge("cluster_live_nodes", "Store nodes this node sees alive", len(live))
            index = cluster["index_blocks"]
            assert isinstance(index, int)
            yield gauge("cluster_index_blocks", "Blocks in this node's cluster index", index)


class MetricsServer:
    """``GET /metrics`` for one store node, on its event loop."""

    def __init__(self, server: StoreServer) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(server))
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); return the bound port."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound: int = runner.addresses[0][1]
        return bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
