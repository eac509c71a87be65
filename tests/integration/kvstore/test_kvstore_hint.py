"""MATCH_PREFIX's hint: a decode's node finds a prefill node's blocks before its index does.

Two store nodes share Valkey; A publishes its events only after an hour (``--event-flush-interval``
and ``--reconcile-interval`` 1h), so B's index never learns A's new blocks during the test -- the
window between a prefill saving its blocks on A and B's index reading A's events, made as wide as
it gets. docs/design/kvstore.md §10.9, docs/design/multihost.md §2.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from kvstore.blocks.tier import Tier
from kvstore.client.sync import KVStoreClient
from kvstore.transport.base import TransportKind
from kvstore.wire.frame import FLAG_MATCH_HINT, Op, pack_frame_header
from kvstore.wire.types import NodeMatch, PutStatus
from tests.integration.kvstore.node_args import cluster_args
from tests.integration.kvstore.valkey_fixture import valkey_url
from tests.waiting import wait_until

__all__ = ["valkey_url"]

pytestmark = pytest.mark.timeout(120)

BLOCK_BYTES = 64 * 1024
NUM_KEYS = 8
NUM_ON_B = 2
"""B holds the first blocks itself (an earlier request's): the hint is asked for the rest only."""
HINT_TIMEOUT_S = 0.5
SLACK_S = 3.0
"""Added to the hint timeout as the bound of a match whose hinted peer never answers: below the
5 s a peer read waits by default, the failure this bound is there to catch."""
NodeFactory = Callable[..., Any]
QUIET = ("--event-flush-interval", "1h", "--reconcile-interval", "1h")
"""A node whose index entries come an hour late."""


def key(n: int) -> bytes:
    return (0x4811 << 112 | n).to_bytes(16, "big")


def payload(n: int) -> bytes:
    unit = bytes((i * 151 + n * 13) % 256 for i in range(1021))
    return (unit * (BLOCK_BYTES // len(unit) + 1))[:BLOCK_BYTES]


def test_a_hint_finds_a_peers_blocks_the_index_does_not_know_yet(
    start_node: NodeFactory, valkey_url: str
) -> None:
    small = ("--arena-size", "32MiB")
    node_a = start_node(*cluster_args(valkey_url, "A", *small, *QUIET))
    node_b = start_node(
        *cluster_args(valkey_url, "B", *small, "--hint-timeout", f"{HINT_TIMEOUT_S:g}s")
    )
    # C stays live for 30 s without a heartbeat (SIGSTOP: a peer that accepts and never answers);
    # D dies at once (kill -9, heartbeat timeout 1 s).
    node_c = start_node(*cluster_args(valkey_url, "C", *small, heartbeat_timeout_s=30.0))
    node_d = start_node(*cluster_args(valkey_url, "D", *small, *QUIET))
    keys = [key(n) for n in range(NUM_KEYS)]
    blocks = [(k, payload(n)) for n, k in enumerate(keys)]
    with KVStoreClient(node_b.endpoint, use_shm=False, timeout_s=30) as b:
        wait_until(lambda: set(cluster(b)["live_nodes"]) == {"A", "B", "C", "D"}, 15.0)
        with (
            KVStoreClient(node_a.endpoint, use_shm=False) as a,
            KVStoreClient(node_d.endpoint, use_shm=False) as d,
        ):
            assert a.put_many(blocks) == [PutStatus.OK] * NUM_KEYS  # the prefill's save
            assert d.put_many(blocks) == [PutStatus.OK] * NUM_KEYS
        assert b.put_many(blocks[:NUM_ON_B]) == [PutStatus.OK] * NUM_ON_B

        # Without a hint B serves its own blocks only: its index has none of A's.
        assert b.match_prefix(keys) == NUM_ON_B
        # A hint naming no live peer changes nothing, and no peer is asked.
        assert b.match_prefix(keys, hint="nobody") == NUM_ON_B
        assert b.match_prefix(keys, hint="B") == NUM_ON_B  # the node itself
        node_d.stop(signal.SIGKILL)
        wait_until(lambda: "D" not in cluster(b)["live_nodes"], 15.0)
        assert b.match_prefix(keys, hint="D") == NUM_ON_B  # dead: its blocks are gone with it
        assert hint_counters(b) == (0, 0, 0, 3)

        # A live peer that never answers: the match is not extended, and waits for the hint
        # timeout only (the bound: the configured timeout plus slack, not a speed figure).
        node_c.process.send_signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            assert b.match_prefix(keys, hint="C") == NUM_ON_B
            assert time.monotonic() - start < HINT_TIMEOUT_S + SLACK_S
        finally:
            node_c.process.send_signal(signal.SIGCONT)
        assert hint_counters(b) == (1, 0, 1, 3)

        # The hint names A: B asks A for the keys it lacks and finds them all.
        assert b.match_prefix_tiers(keys, hint="A") == NodeMatch(NUM_KEYS, (Tier.DRAM,) * NUM_KEYS)
        assert hint_counters(b) == (2, NUM_KEYS - NUM_ON_B, 1, 3)
        # B remembers where they are: the next match needs no hint, and asks nobody.
        assert b.match_prefix(keys) == NUM_KEYS
        assert hint_counters(b) == (2, NUM_KEYS - NUM_ON_B, 1, 3)
        assert cluster(b)["index_blocks"] <= NUM_ON_B  # still none of A's in B's index

    # The decode's load: LEASE_BATCH over shared memory reads A's blocks through into B.
    with KVStoreClient(node_b.endpoint, transports=(TransportKind.SHM,)) as b_shm:
        outs = [bytearray(BLOCK_BYTES) for _ in keys]
        assert b_shm.get_many_into(keys, outs) == [BLOCK_BYTES] * NUM_KEYS
        assert b_shm.transport == "shm"
        assert [bytes(o) for o in outs] == [payload(n) for n in range(NUM_KEYS)]
        assert b_shm.stats()["transfers"]["read_through_blocks"] == NUM_KEYS - NUM_ON_B


def cluster(client: KVStoreClient) -> dict[str, Any]:
    view = client.stats()["cluster"]
    assert isinstance(view, dict)
    return view


def hint_counters(client: KVStoreClient) -> tuple[int, int, int, int]:
    """STATS ``transfers``: hinted peers asked, blocks they added, failures, hints ignored."""
    t = client.stats()["transfers"]
    return t["hint_lookups"], t["hint_blocks"], t["hint_failures"], t["hints_ignored"]


def test_a_standalone_node_answers_a_hinted_match_and_refuses_a_malformed_hint(
    start_node: NodeFactory,
) -> None:
    """No cluster: a hint has no live peer to name, the match is the node's own. A hint whose
    length byte disagrees with its frame is a malformed frame: that connection is closed."""
    node = start_node("--arena-size", "16MiB", "--prefault", "false")
    keys = [key(n) for n in range(3)]
    with KVStoreClient(node.endpoint, use_shm=False) as client:
        assert client.put(keys[0], payload(0)) is PutStatus.OK
        assert client.match_prefix_tiers(keys, hint="A") == NodeMatch(1, (Tier.DRAM,))
        assert hint_counters(client) == (0, 0, 0, 1)
        host, port = node.endpoint.rsplit(":", 1)
        body = b"".join(keys) + b"\x05A"  # says 5 bytes of id, carries 1
        frame = pack_frame_header(Op.MATCH_PREFIX, 1, 3, len(body), flags=FLAG_MATCH_HINT)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(frame + body)
            assert sock.recv(64) == b""  # closed, unanswered
        assert client.stats()["limits"]["malformed_frames"] == 1
        assert client.match_prefix(keys) == 1  # the node serves on
