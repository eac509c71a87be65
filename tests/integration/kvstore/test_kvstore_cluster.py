"""Three store nodes with Redis (Valkey) metadata: read-through, kill -9, restart from SSD."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvstore.blocks.format import BLOCK_HEADER_BYTES
from kvstore.blocks.tier import Tier
from kvstore.client.sync import KVStoreClient
from kvstore.cluster.events import SOURCE_GONE_SEQ, SourceCleared, decode_event
from kvstore.cluster.view import ClusterView
from kvstore.metadata import START, MetadataStore, RedisMetadataStore, open_metadata_store
from kvstore.transport.base import TransportKind
from kvstore.wire.types import PutStatus
from tests.integration.kvstore.node_args import cluster_args, ssd_args
from tests.integration.kvstore.valkey_fixture import valkey_url
from tests.waiting import wait_until

__all__ = ["valkey_url"]

pytestmark = pytest.mark.timeout(90)

KIB = 1024
BLOCK_BYTES = 256 * KIB
NUM_A = 24  # 6 MiB into an 8 MiB arena with high watermark 0.5: some spill to A's SSD
HB_TIMEOUT_S = 1.0
SLACK_S = 4.0
"""Added to time bounds: the machine is shared with other test runs."""
NodeFactory = Callable[..., Any]


def key(node: int, n: int) -> bytes:
    return (0x7700 + node << 112 | n).to_bytes(16, "big")


def payload(node: int, n: int) -> bytes:
    unit = bytes((i * 131 + n * 17 + node * 7) % 256 for i in range(4093))
    return (unit * (BLOCK_BYTES // len(unit) + 1))[:BLOCK_BYTES]


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
            wait_until(lambda: b.match_prefix([key(0, NUM_A - 1)]) == 1)  # B's index too
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
            # (The bound: the timeout plus a slack for a loaded machine, not a speed figure.)
            node_a.stop(signal.SIGKILL)
            assert view.wait_for(
                lambda v: v.match(a_keys).depth == 0 and set(v.live_nodes()) == {"B", "C"},
                HB_TIMEOUT_S + SLACK_S,
            )
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


def test_a_crashed_node_is_reaped_from_the_registry_and_may_come_back(
    start_node: NodeFactory, valkey_url: str
) -> None:
    exact = ("--reconcile-interval", "1h")  # tier events only: no periodic diff
    node_a = start_node(*cluster_args(valkey_url, "A", *exact))
    node_b = start_node(*cluster_args(valkey_url, "B", *exact))
    store = RedisMetadataStore(valkey_url)
    try:
        with KVStoreClient(node_a.endpoint, use_shm=False) as a:
            assert a.put(key(0, 1), payload(0, 1)) is PutStatus.OK
        with ClusterView(store, poll_interval_s=0.05) as view:
            assert view.wait_for(lambda v: v.holders(key(0, 1)) == [("A", Tier.DRAM)], 5.0)
        node_a.stop(signal.SIGKILL)
        # B's cluster view notices the expired heartbeat and reaps A: registry and stream.
        deadline = time.monotonic() + 10.0
        while "A" in store.members():
            assert time.monotonic() < deadline, "A was never reaped"
            time.sleep(0.05)
        _, messages = store.read(START, 0.01, count=100_000)
        events_of_a = [e for e in map(decode_event, messages) if e.source == "A"]
        assert events_of_a[-1] == SourceCleared("A", SOURCE_GONE_SEQ)
        # B's STATS shows its view without A (what an operator and the multi-host test read).
        with KVStoreClient(node_b.endpoint, use_shm=False) as b:
            assert b.stats()["cluster"] == {
                "node_id": "B",
                "live_nodes": ["B"],
                "sources": ["B"],
                "index_blocks": 0,
            }
        assert events_of_a.count(SourceCleared("A", SOURCE_GONE_SEQ)) == 1  # reaped once
        # A view started now, replaying the stream from its start, never sees A.
        with ClusterView(store, poll_interval_s=0.05, reap_dead=False) as late:
            assert late.wait_for(lambda v: v.sources() == ("B",), 5.0)
            assert late.holders(key(0, 1)) == [] and set(late.live_nodes()) == {"B"}
        # A restarted with the same id registers again and publishes a new incarnation.
        node_a2 = start_node(*cluster_args(valkey_url, "A", *exact))
        with KVStoreClient(node_a2.endpoint, use_shm=False) as a:
            assert a.put(key(0, 2), payload(0, 2)) is PutStatus.OK
        with ClusterView(store, poll_interval_s=0.05) as view:
            assert view.wait_for(lambda v: v.holders(key(0, 2)) == [("A", Tier.DRAM)], 5.0)
            assert set(view.live_nodes()) == {"A", "B"}
        assert "A" in store.members()
    finally:
        store.close()


# -- engine members: a worker's HBM publisher as a heartbeating member of kind "engine" ----------

ENGINE_ID = "engine-0"
HBM_CHILD = "tests.integration.dataplane.hbm_member_child"
HBM_READY_PREFIX = "hbm member ready "  # hbm_member_child.READY_PREFIX (it imports vLLM)
NUM_HBM_BLOCKS = 3


class HbmMember:
    """A child process running the real HbmEventPublisher (no engine) as member ENGINE_ID.

    Spawned first, it imports vLLM (slow on a busy machine) while the test starts its store
    nodes; :meth:`join` then hands it the metadata spec and returns the keys it announced in HBM.
    """

    def __init__(self, events_dir: Path) -> None:
        repo_root = Path(__file__).resolve().parents[3]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", HBM_CHILD, ENGINE_ID, str(events_dir), "0.2"]
        argv += [str(HB_TIMEOUT_S), str(NUM_HBM_BLOCKS)]
        self.log_path = events_dir / "child.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=repo_root,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )

    def join(self, metadata: str, timeout_s: float = 150.0) -> list[bytes]:
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(metadata + "\n")
        process.stdin.flush()
        deadline = time.monotonic() + timeout_s
        line = ""
        while not line.startswith(HBM_READY_PREFIX):
            left = deadline - time.monotonic()
            assert left > 0 and process.poll() is None, self.log_path.read_text()
            if select.select([process.stdout], [], [], left)[0]:
                line = process.stdout.readline()
        return [bytes.fromhex(h) for h in line[len(HBM_READY_PREFIX) :].strip().split(",")]

    def kill(self) -> None:
        """SIGKILL: no goodbye, only its heartbeat stops."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def close(self) -> None:
        self.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def events_of(store: MetadataStore, source: str) -> list[object]:
    _, messages = store.read(START, 0.01, count=100_000)
    return [e for e in map(decode_event, (m for m in messages if m[1] != 4)) if e.source == source]


@pytest.mark.timeout(300)  # the child imports vLLM
def test_a_killed_engine_member_leaves_the_index_and_store_nodes_stay(
    start_node: NodeFactory, valkey_url: str, tmp_path: Path
) -> None:
    engine = HbmMember(tmp_path)
    node_a = start_node(*cluster_args(valkey_url, "A"))
    node_b = start_node(*cluster_args(valkey_url, "B"))
    store = RedisMetadataStore(valkey_url)
    view = ClusterView(store, poll_interval_s=0.05).start()
    try:
        with KVStoreClient(node_a.endpoint, use_shm=False) as a:
            assert a.put(key(0, 0), payload(0, 0)) is PutStatus.OK
        hbm_keys = engine.join(valkey_url)
        assert len(hbm_keys) == NUM_HBM_BLOCKS
        assert view.wait_for(
            lambda v: (
                all(v.holders(k) == [(ENGINE_ID, Tier.HBM)] for k in hbm_keys)
                and v.holders(key(0, 0)) == [("A", Tier.DRAM)]
                and v.live_engines() == {ENGINE_ID: "127.0.0.1:1"}
            ),
            10.0,
        )
        # A member, but never a peer: read-through and migration see only store nodes.
        assert set(view.live_nodes()) == {"A", "B"}
        members = store.members()
        assert (members[ENGINE_ID]["kind"], members["A"]["kind"]) == ("engine", "store")
        assert members[ENGINE_ID]["pid"] == engine.process.pid

        engine.kill()
        assert view.wait_for(
            lambda v: all(v.holders(k) == [] for k in hbm_keys) and not v.live_engines(),
            HB_TIMEOUT_S + 2.0,
        )
        assert ENGINE_ID not in view.sources()
        assert view.wait_for(lambda v: ENGINE_ID not in store.members(), 5.0)
        gone = SourceCleared(ENGINE_ID, SOURCE_GONE_SEQ)
        engine_events = events_of(store, ENGINE_ID)
        assert engine_events[0] == SourceCleared(ENGINE_ID, 0)
        assert (engine_events[-1], engine_events.count(gone)) == (gone, 1)  # reaped once
        # The store nodes are untouched: members, index entries, read-through.
        assert set(view.live_nodes()) == {"A", "B"}
        assert view.holders(key(0, 0)) == [("A", Tier.DRAM)]
        with KVStoreClient(node_b.endpoint, use_shm=False) as b:
            assert b.get(key(0, 0)) == payload(0, 0)
    finally:
        engine.close()
        view.stop()
        store.close()


@pytest.mark.timeout(300)  # the child imports vLLM
def test_engine_member_over_a_store_nodes_strata_metadata(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    engine = HbmMember(tmp_path)
    hb = ("--heartbeat-interval", "0.2s", "--heartbeat-timeout", f"{HB_TIMEOUT_S}s")
    node = start_node("--metadata", "embedded", "--node-id", "N", *hb, "--prefault", "false")
    spec = node.metadata  # the node's gRPC metadata service
    assert spec is not None
    store = open_metadata_store(spec)
    view = ClusterView(store, poll_interval_s=0.05).start()
    try:
        with KVStoreClient(node.endpoint, use_shm=False) as client:
            assert client.put(key(0, 0), payload(0, 0)) is PutStatus.OK
        hbm_keys = engine.join(spec)
        assert view.wait_for(
            lambda v: all(v.holders(k) == [(ENGINE_ID, Tier.HBM)] for k in hbm_keys), 10.0
        )
        assert view.wait_for(lambda v: v.live_engines() == {ENGINE_ID: "127.0.0.1:1"}, 5.0)
        assert view.live_nodes() == {"N": node.endpoint}
        engine.kill()
        assert view.wait_for(
            lambda v: all(v.holders(k) == [] for k in hbm_keys) and not v.live_engines(),
            HB_TIMEOUT_S + 2.0,
        )
        assert view.wait_for(lambda v: set(store.members()) == {"N"}, 5.0)
        assert view.holders(key(0, 0)) == [("N", Tier.DRAM)]
        assert view.live_nodes() == {"N": node.endpoint}
    finally:
        engine.close()
        view.stop()
        store.close()


def test_read_through_between_nodes_on_ipv6(start_node: NodeFactory, valkey_url: str) -> None:
    """Nodes on [::1] announce bracketed endpoints, and read-through reaches them."""
    node_a = start_node(*cluster_args(valkey_url, "A6"), "--host", "::1")
    node_b = start_node(*cluster_args(valkey_url, "B6"), "--host", "::1")
    assert node_a.endpoint.startswith("[::1]:"), node_a.endpoint
    store = RedisMetadataStore(valkey_url)
    view = ClusterView(store, poll_interval_s=0.05).start()
    try:
        assert view.wait_for(lambda v: {"A6", "B6"} <= set(v.live_nodes()), 5.0)
        assert store.members()["A6"]["endpoint"] == node_a.endpoint
        with (
            KVStoreClient(node_a.endpoint, use_shm=False) as a,
            KVStoreClient(node_b.endpoint, use_shm=False) as b,
        ):
            assert a.put(key(6, 0), payload(6, 0)) is PutStatus.OK
            assert view.wait_for(lambda v: v.holders(key(6, 0)) == [("A6", Tier.DRAM)], 5.0)
            wait_until(lambda: b.match_prefix([key(6, 0)]) == 1)  # B's own index has it too
            assert b.get(key(6, 0)) == payload(6, 0)
    finally:
        view.stop()
        store.close()


def test_a_shared_memory_reader_gets_a_peers_blocks_through_its_own_node(
    start_node: NodeFactory, valkey_url: str
) -> None:
    """A decode worker on host B reads its node B over shared memory (LEASE_BATCH): blocks only
    node A holds are read through, one pipelined round trip per peer, into B's arena, leased and
    announced as B's, so the next reader on B's host finds them there."""
    node_a = start_node(*cluster_args(valkey_url, "A"))
    node_b = start_node(*cluster_args(valkey_url, "B"))
    store = RedisMetadataStore(valkey_url)
    view = ClusterView(store, poll_interval_s=0.05).start()
    keys = [
        key(0, n) for n in range(40)
    ]  # beyond one batch's 32 read-throughs: deferred, asked again
    try:
        assert view.wait_for(lambda v: set(v.live_nodes()) == {"A", "B"}, 5.0)
        with KVStoreClient(node_a.endpoint, use_shm=False) as a:
            assert a.put_many([(k, payload(0, n)) for n, k in enumerate(keys)]) == (
                [PutStatus.OK] * len(keys)
            )
        assert view.wait_for(lambda v: v.match(keys).depth == len(keys), 5.0)
        with KVStoreClient(node_b.endpoint, transports=(TransportKind.SHM,)) as b:
            wait_until(lambda: b.match_prefix(keys) == len(keys))  # B's index has A's blocks
            outs = [bytearray(BLOCK_BYTES) for _ in keys]
            assert b.get_many_into(keys, outs) == [BLOCK_BYTES] * len(keys)
            assert b.transport == "shm"
            assert [bytes(o) for o in outs] == [payload(0, n) for n in range(len(keys))]
            stats = b.stats()
        assert stats["transfers"]["read_through_blocks"] == len(keys)
        stored = BLOCK_BYTES + BLOCK_HEADER_BYTES  # what a node holds of a BLOCK_BYTES payload
        assert stats["transfers"]["read_through_bytes"] == len(keys) * stored
        assert stats["transfers"]["leased_bytes"] == len(keys) * stored  # B's reader copied them
        assert view.wait_for(lambda v: all(("B", Tier.DRAM) in v.holders(k) for k in keys), 5.0)
        with KVStoreClient(node_b.endpoint, transports=(TransportKind.SHM,)) as again:
            outs = [bytearray(BLOCK_BYTES) for _ in keys]
            assert again.get_many_into(keys, outs) == [BLOCK_BYTES] * len(keys)
            assert again.stats()["transfers"]["read_through_blocks"] == len(keys)  # B's own now
    finally:
        view.stop()
        store.close()
