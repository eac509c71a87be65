"""The store node's Prometheus metrics: ``GET /metrics`` on ``--metrics-port``.

Every series is read from the node's own counters when scraped (a custom collector over
``NodeStats``, ``TierStats``, ``TransferCounters`` and the connection limits), so there is one
owner per figure -- the node -- and nothing to keep in step. The scrape runs on the node's event
loop, the one thread that owns that state.

The port serves counts and sizes only: no key, no block, no client or peer address, no node id.
It has no authentication and no TLS (as a gateway's ``/metrics``: what a scraper expects), and is
bounded as the store port is (:class:`MetricsServer`); on Kubernetes a NetworkPolicy
(deploy/k8s/base/networkpolicy.yaml) admits only the monitoring namespace to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, TypeVar

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

        hits_doc = "Block reads answered, by the tier that held it (peer: read through from one)"
        hit_counts = {
            "dram": tiers.dram_hits,
            "ssd": tiers.ssd_hits,
            "peer": moved.read_through_blocks,
        }
        yield _labelled(CounterMetricFamily, "hits", hits_doc, "tier", hit_counts)
        # The tiers count a miss before a peer is asked: a read a peer answered is its hit.
        misses = max(0, tiers.misses - moved.read_through_blocks)
        yield counter("misses", "Block reads neither this node's tiers nor a peer held", misses)
        blocks = {"dram": tiers.dram_blocks, "ssd": tiers.ssd_blocks}
        yield _labelled(GaugeMetricFamily, "blocks", "Blocks held, by tier", "tier", blocks)
        held = {"dram": tiers.dram_bytes, "ssd": tiers.ssd_bytes}
        yield _labelled(GaugeMetricFamily, "stored_bytes", "Bytes held, by tier", "tier", held)
        yield gauge("arena_capacity_bytes", "Size of the DRAM arena", node.arena.capacity_bytes)
        yield gauge("arena_used_bytes", "Arena bytes allocated to blocks", node.arena.used_bytes)
        yield counter("puts", "Blocks stored (PUT and committed reservations)", node.puts)
        yield counter("puts_full", "PUTs refused: nothing evictable made room", node.puts_full)
        yield counter("evictions", "Blocks evicted from DRAM", node.evictions)
        yield counter("spills", "Blocks written from DRAM to SSD", tiers.spills)
        yield counter("spill_bytes", "Bytes written from DRAM to SSD", tiers.spill_bytes)
        yield counter("promotions", "Blocks read back from SSD into DRAM", tiers.promotions)
        moved_doc = (
            "Bytes moved, by path: socket_in/socket_out on the node's connections (TCP, TLS); "
            "shm_or_rdma_out leased to readers that copy from the arena; shm_or_rdma_in written "
            "into the arena by reservation; peer_in read from other nodes"
        )
        by_path = {
            "socket_in": moved.bytes_received,
            "socket_out": moved.bytes_sent,
            "shm_or_rdma_out": moved.leased_bytes,
            "shm_or_rdma_in": moved.committed_bytes,
            "peer_in": moved.read_through_bytes,
        }
        yield _labelled(CounterMetricFamily, "transfer_bytes", moved_doc, "path", by_path)
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


_Family = TypeVar("_Family", CounterMetricFamily, GaugeMetricFamily)


def _labelled(
    kind: type[_Family], name: str, doc: str, label: str, values: Mapping[str, float]
) -> _Family:
    """One family of ``kind`` with a sample per value of its one ``label``."""
    family = kind(_PREFIX + name, doc, labels=[label])
    for value, sample in values.items():
        family.add_metric([value], sample)
    return family


MAX_CONNECTIONS = 8
"""Scrapes at once (a Prometheus pair scrapes one at a time); more are closed at accept."""
REQUEST_TIMEOUT_S = 5.0
"""A connection must have sent its whole request line and headers within this long."""
MAX_REQUEST_BYTES = 8192
"""Request line and headers, at most; a scrape sends a few hundred bytes."""


class MetricsServer:
    """``GET /metrics`` for one store node, on its event loop: one request per connection,
    answered and closed. Bounded like the store port (security.md §8): ``MAX_CONNECTIONS`` open
    at once, the request within ``REQUEST_TIMEOUT_S`` and ``MAX_REQUEST_BYTES``; anything else
    than ``GET /metrics`` gets 404 or 400."""

    def __init__(self, server: StoreServer) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(server))
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.Task[None]] = set()
        self.refused = 0
        """Connections closed at accept because ``MAX_CONNECTIONS`` were open."""

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); return the bound port."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_BYTES)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._open):
                task.cancel()
            await asyncio.gather(*self._open, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._open) >= MAX_CONNECTIONS or task is None:
            self.refused += 1
            writer.close()
            return
        self._open.add(task)
        try:
            status, body = await asyncio.wait_for(self._answer(reader), REQUEST_TIMEOUT_S)
            kind = CONTENT_TYPE_LATEST if status.startswith("200") else "text/plain; charset=utf-8"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a slow, cut or oversized request: closed, nothing answered
        finally:
            self._open.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")  # LimitOverrunError past the limit
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return "400 Bad Request", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return "404 Not Found", b"not found: GET /metrics\n"
        if method != b"GET":
            return "405 Method Not Allowed", b"GET /metrics only\n"
        return "200 OK", generate_latest(self.registry)
