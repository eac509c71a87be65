"""Three store nodes with Redis (Valkey) metadata: read-through, kill -9, restart from SSD."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvstore.client import KVStoreClient, PutStatus, Tier
from kvstore.cluster import ClusterView
from kvstore.metadata import RedisMetadataStore
from tests.integration.kvstore.node_args import ssd_args
from tests.integration.kvstore.valkey_fixture import valkey_url

__all__ = ["valkey_url"]

pytestmark = pytest.mark.timeout(90)

KIB = 1024
BLOCK_BYTES = 256 * KIB
NUM_A = 24  # 6 MiB into an 8 MiB arena with high watermark 0.5: some spill to A's SSD
HB_TIMEOUT_S = 1.0
NodeFactory = Callable[..., Any]


def key(node: int, n: int) -> bytes:
    return (0x7700 + node << 112 | n).to_bytes(16, "big")


def payload(node: int, n: int) -> bytes:
    unit = bytes((i * 131 + n * 17 + node * 7) % 256 for i in range(4093))
    return (unit * (BLOCK_BYTES // len(unit) + 1))[:BLOCK_BYTES]


def cluster_args(url: str, node_id: str, *extra: str) -> tuple[str, ...]:
    return (
        "--metadata",
        url,
        "--node-id",
        node_id,
        "--heartbeat-interval",
        "0.2s",
        "--heartbeat-timeout",
        f"{HB_TIMEOUT_S}s",
        "--reconcile-interval",
        "0.2s",
        "--prefault",
        "false",
        *extra,
    )


def test_three_nodes_read_through_crash_and_restart(
    start_node: NodeFactory, valkey_url: str, tmp_path: Path
) -> None:
    ssd_dir = tmp_path / "ssd-a"
    node_a = start_node(*cluster_args(valkey_url, "A", *ssd_args(ssd_dir)))
    node_b = start_node(*cluster_args(valkey_url, "B"))
    node_c = start_node(*cluster_args(valkey_url, "C"))
    store = RedisMetadataStore(valkey_url)
    view = ClusterView(store, poll_interval_s=0.05).start()
    try:
        assert view.wait_for(lambda v: set(v.live_nodes()) == {"A", "B", "C"}, 5.0)
        with (
            KVStoreClient(node_a.endpoint, use_shm=False) as a,
            KVStoreClient(node_b.endpoint, use_shm=False) as b,
            KVStoreClient(node_c.endpoint, use_shm=False) as c,
        ):
            assert (
                a.put_many([(key(0, n), payload(0, n)) for n in range(NUM_A)])
                == [PutStatus.OK] * NUM_A
            )
            assert b.put(key(1, 0), payload(1, 0)) is PutStatus.OK
            assert c.put(key(2, 0), payload(2, 0)) is PutStatus.OK
            a_keys = [key(0, n) for n in range(NUM_A)]
            assert view.wait_for(
                lambda v: (
                    v.match(a_keys).depth == NUM_A
                    and v.holders(key(1, 0)) == [("B", Tier.DRAM)]
                    and v.holders(key(2, 0)) == [("C", Tier.DRAM)]
                ),
                5.0,
            )
            # A block put via A is read byte-exact through B (and C), B keeps no copy.
            assert b.get(key(0, NUM_A - 1)) == payload(0, NUM_A - 1)
            assert c.get(key(1, 0)) == payload(1, 0)
            assert b.exists([key(0, NUM_A - 1)]) == [False]
            # Let A spill: its coldest blocks go to its SSD (and the index learns it).
            deadline = time.monotonic() + 10
            while a.stats()["tiers"]["arena_usage"] > 0.5:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            on_ssd = [
                k
                for k, t in zip(a_keys, a.match_prefix_tiers(a_keys).tiers, strict=False)
                if t is Tier.SSD
            ]
            assert on_ssd
            assert view.wait_for(
                lambda v: all(("A", Tier.SSD) in v.holders(k) for k in on_ssd), 5.0
            )
            assert b.get(on_ssd[0]) == payload(0, 0)  # read through from A's SSD

            # kill -9 A: its blocks leave the index within the heartbeat timeout.
            node_a.stop(signal.SIGKILL)
            killed = time.monotonic()
            assert view.wait_for(lambda v: v.match(a_keys).depth == 0, HB_TIMEOUT_S + 2.0)
            assert time.monotonic() - killed < HB_TIMEOUT_S + 1.0
            assert set(view.live_nodes()) == {"B", "C"}
            assert view.holders(key(1, 0)) == [("B", Tier.DRAM)]
            assert view.holders(key(2, 0)) == [("C", Tier.DRAM)]
            assert b.get(key(2, 0)) == payload(2, 0)
            assert c.get(key(1, 0)) == payload(1, 0)
            assert b.get(key(0, 1)) is None  # nobody holds it now: a plain miss

        # Restarted with its SSD dir, A announces its SSD blocks again.
        node_a2 = start_node(*cluster_args(valkey_url, "A", *ssd_args(ssd_dir)))
        assert view.wait_for(lambda v: all(v.holders(k) == [("A", Tier.SSD)] for k in on_ssd), 5.0)
        with KVStoreClient(node_c.endpoint, use_shm=False) as c:
            assert c.get(on_ssd[-1]) == payload(0, a_keys.index(on_ssd[-1]))
        # A graceful stop (drop) clears A from the index at once.
        assert node_a2.stop() == 0
        assert view.wait_for(lambda v: "A" not in v.sources(), 2.0)
    finally:
        view.stop()
        store.close()


def test_leave_policy_migrate_hands_dram_blocks_over(
    start_node: NodeFactory, valkey_url: str
) -> None:
    node_a = start_node(*cluster_args(valkey_url, "A", "--leave-policy", "migrate"))
    node_b = start_node(*cluster_args(valkey_url, "B"))
    store = RedisMetadataStore(valkey_url)
    view = ClusterView(store, poll_interval_s=0.05).start()
    try:
        keys = [key(0, n) for n in range(8)]
        with KVStoreClient(node_a.endpoint, use_shm=False) as a:
            a.put_many([(k, payload(0, n)) for n, k in enumerate(keys)])
        assert view.wait_for(lambda v: set(v.live_nodes()) == {"A", "B"}, 5.0)
        assert node_a.stop() == 0
        assert view.wait_for(lambda v: all(v.holders(k) == [("B", Tier.DRAM)] for k in keys), 5.0)
        with KVStoreClient(node_b.endpoint, use_shm=False) as b:
            assert [b.get(k) for k in keys] == [payload(0, n) for n in range(8)]
    finally:
        view.stop()
        store.close()
