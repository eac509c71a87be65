"""A store node's ``GET /metrics`` (``--metrics-port``): the Prometheus series a real node process
exports after known traffic, exact where the traffic fixes them."""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvstore.blocks.format import BLOCK_HEADER_BYTES
from kvstore.client.sync import KVStoreClient
from kvstore.server.config import StoreNodeConfig
from kvstore.server.metrics import MAX_CONNECTIONS
from kvstore.wire.types import PutStatus

pytestmark = pytest.mark.timeout(60)

NodeFactory = Callable[..., Any]  # the start_node fixture (conftest.py)
BLOCK = 4096
STORED = BLOCK + BLOCK_HEADER_BYTES
"""What the node holds for a BLOCK-byte payload: the client puts it in a checksummed block."""


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the node's /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.parametrize("use_shm", [False, True], ids=["tcp", "shm"])
def test_metrics_count_hits_by_tier_and_bytes_by_path(
    start_node: NodeFactory, use_shm: bool
) -> None:
    node = start_node("--metrics-port", "0")
    assert node.metrics is not None
    before = scrape(node.metrics)
    assert value(before, "strata_store_hits_total", tier="dram") == 0
    assert value(before, "strata_store_arena_capacity_bytes") == 32 * 1024 * 1024
    with KVStoreClient(node.endpoint, use_shm=use_shm) as client:
        blocks = [(i.to_bytes(16, "big"), bytes([i]) * BLOCK) for i in range(3)]
        assert client.put_many(blocks) == [PutStatus.OK] * 3
        assert client.get(blocks[0][0]) == blocks[0][1]
        assert client.get(blocks[1][0]) == blocks[1][1]
        assert client.get((99).to_bytes(16, "big")) is None
        after = scrape(node.metrics)
    assert value(after, "strata_store_puts_total") == 3
    assert value(after, "strata_store_hits_total", tier="dram") == 2
    assert value(after, "strata_store_hits_total", tier="ssd") == 0
    assert value(after, "strata_store_hits_total", tier="peer") == 0
    assert value(after, "strata_store_misses_total") == 1
    assert value(after, "strata_store_blocks", tier="dram") == 3
    assert value(after, "strata_store_stored_bytes", tier="dram") == 3 * STORED
    assert value(after, "strata_store_connections") == 1
    moved = {
        path: value(after, "strata_store_transfer_bytes_total", path=path)
        for path in ("socket_in", "socket_out", "shm_or_rdma_in", "shm_or_rdma_out", "peer_in")
    }
    assert moved["peer_in"] == 0
    if use_shm:  # the blocks went through the arena, the sockets carried only frames
        assert moved["shm_or_rdma_in"] == 3 * STORED
        assert moved["shm_or_rdma_out"] == 2 * STORED
        assert moved["socket_in"] < BLOCK and moved["socket_out"] < BLOCK
    else:
        assert moved["shm_or_rdma_in"] == 0 and moved["shm_or_rdma_out"] == 0
        assert 3 * STORED < moved["socket_in"] < 3 * STORED + 1024
        assert 2 * STORED < moved["socket_out"] < 2 * STORED + 1024


def test_metrics_port_is_off_by_default_and_checked(start_node: NodeFactory) -> None:
    node = start_node()
    assert node.metrics is None
    assert "metrics" not in node.log()


def _ask(address: str, request: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        reply = b""
        with contextlib.suppress(ConnectionResetError):  # closed before reading it all
            sock.sendall(request)
            while chunk := sock.recv(65536):
                reply += chunk
    return reply


def test_the_metrics_port_answers_only_get_metrics_and_is_bounded(start_node: NodeFactory) -> None:
    node = start_node("--metrics-port", "0")
    assert node.metrics is not None
    assert _ask(node.metrics, b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert _ask(node.metrics, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert _ask(node.metrics, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _ask(node.metrics, b"GET /metrics HTTP/1.1\r\n" + b"x" * 10_000) == b""  # too long
    host, port = node.metrics.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)  # the node has accepted them all
        with socket.create_connection((host, int(port)), timeout=10) as extra:
            assert extra.recv(1) == b""  # one more is closed at once
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.5)
    assert (
        "strata_store_hits_total" in _ask(node.metrics, b"GET /metrics HTTP/1.0\r\n\r\n").decode()
    )
    with KVStoreClient(node.endpoint) as client:  # the store port never noticed
        assert client.put(bytes(16), b"x") is PutStatus.OK


def test_metrics_port_must_be_a_port_of_its_own() -> None:
    StoreNodeConfig(metrics_port=0)
    with pytest.raises(ValueError, match="metrics_port out of range"):
        StoreNodeConfig(metrics_port=70_000)
    with pytest.raises(ValueError, match="metrics_port must differ"):
        StoreNodeConfig(port=7600, metrics_port=7600)
