"""Store node killed at random points while writing to SSD: after each restart no corrupt object is
served, and only writes the node had not acknowledged as persisted are lost.

**Injection.** A real node (``python -m kvstore.server``) with an SSD tier (lmdb) and write-behind
or write-through (below) takes a stream of PUTs (64 KiB blocks, one at a time over TCP) from the
test. A timer SIGKILLs it after a random delay (uniform in 0-0.6 s, seeded), i.e. at a random point
of the write-behind's batches, lmdb commits, the puts themselves and, from the second cycle on, the
DELETEs of the previous cycle's keys. The node is restarted on the same ``--ssd-dir`` and the next
cycle begins; 20 kill points in the shortened form, 200 in the full one.

**Two modes.** ``--write-through true``: a PUT is answered only once its block is committed to SSD,
so every acknowledged write must survive (criterion: 0 acknowledged writes lost). ``--write-behind
true`` (what ``strata serve`` runs, the faster mode for a cache): a PUT's OK acknowledges the block
in DRAM and the SSD copy follows; what the node acknowledged as persisted must survive.

**Acknowledgements.** With write-behind, the SSD copy follows the OK. The node acknowledges
persistence through STATS: ``tiers.persisted`` counts the blocks write-behind committed to lmdb in
this incarnation, in commit order (a FIFO of the PUTs; every key here is new and nothing is
evicted, so the first ``persisted`` acknowledged PUTs are the persisted ones). The test polls STATS
between PUTs; the last answer before the kill is the cycle's durable watermark.

**Check, after each restart**, for every key PUT in the previous incarnation: a key below the
durable watermark must be served, byte-identical; any other key (acknowledged in DRAM only, or the
PUT in flight at the kill) must be served byte-identical or be a miss. Anything else served is a
corrupt object (criterion: 0); a ``KVStoreCorruptError`` is counted as a detected one. The node's
own ``ssd.corrupt_dropped`` must stay 0 too (lmdb commits are atomic: nothing torn to drop), and
``ssd.recovered_blocks`` must cover the durable keys. The checked keys are then deleted, so the SSD
tier stays small over hundreds of cycles.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvstore.client.sync import KVStoreClient
from kvstore.errors import KVStoreCorruptError, KVStoreError
from kvstore.wire.types import PutStatus
from tests.chaos.conftest import ChaosSize
from tests.chaos.kv_load import KIB, key, payload
from tests.integration.kvstore.node_process import NodeFactory, NodeProcess, start_node

__all__ = ["start_node"]  # the fixture

BLOCK = 64 * KIB - 64
MAX_PUTS_PER_CYCLE = 600  # 37.5 MiB: fits the 64 MiB arena below its watermark, none evicted
MAX_KILL_DELAY_S = 0.6


def _node_args(ssd_dir: Path, mode: str) -> tuple[str, ...]:
    return (
        "--arena-size",
        "64MiB",
        "--prefault",
        "false",
        "--ssd-dir",
        str(ssd_dir),
        "--ssd-size",
        "256MiB",
        f"--{mode}",
        "true",
    )


def _forget(node: NodeProcess) -> None:
    """A killed node cannot remove its arena file: do it now (hundreds of them otherwise)."""
    for name in node.arena_files():
        os.unlink(os.path.join("/dev/shm", name))
    if node.process.stdout is not None:
        node.process.stdout.close()


class Cycle:
    """What one incarnation was asked to store, and what it acknowledged."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.sent: list[bytes] = []  # every key whose PUT was started
        self.acked = 0  # leading keys of ``sent`` answered OK
        self.durable = 0  # leading keys the node reported persisted


def _stream_until_killed(node: NodeProcess, cycle: Cycle, delay_s: float) -> float:
    """PUT new keys one by one while a timer SIGKILLs the node; returns when the node is dead."""
    killer = threading.Timer(delay_s, node.process.kill)
    client = KVStoreClient(node.endpoint, timeout_s=30, use_shm=False)
    killer.start()
    try:
        for i in range(MAX_PUTS_PER_CYCLE):
            block_key = key(0x55D0 + cycle.number % 64, cycle.number * 1000 + i)
            cycle.sent.append(block_key)
            if client.put(block_key, payload(block_key, BLOCK)) is not PutStatus.OK:
                raise AssertionError("a new key was not stored")
            cycle.acked += 1
            if i % 4 == 3:
                persisted = client.stats()["tiers"]["persisted"]
                assert persisted <= cycle.acked
                cycle.durable = persisted
    except KVStoreError:
        pass  # the kill
    finally:
        client.close()
        killer.join()
    node.process.wait(30)
    return delay_s


def _check(client: KVStoreClient, cycle: Cycle, tally: dict[str, int]) -> None:
    for i, block_key in enumerate(cycle.sent):
        try:
            got = client.get(block_key)
        except KVStoreCorruptError:
            tally["corrupt_detected"] += 1
            got = None
        if got is not None and got != payload(block_key, BLOCK):
            tally["corrupt_served"] += 1
        elif got is None and i < cycle.durable:
            tally["durable_lost"] += 1
        elif got is None and i < cycle.acked:
            tally["acked_not_persisted_lost"] += 1
        elif got is None:
            tally["unacked_lost"] += 1
        else:
            tally["intact"] += 1
    assert client.delete(cycle.sent) <= len(cycle.sent)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", ["write-behind", "write-through"])
def test_store_node_killed_at_random_points_while_writing_to_ssd(
    start_node: NodeFactory,
    tmp_path: Path,
    chaos_size: ChaosSize,
    chaos_report: Callable[..., None],
    mode: str,
) -> None:
    kills = chaos_size.pick(20, 200)
    rng = random.Random(20261206)
    ssd_dir = tmp_path / "ssd"
    tally = dict.fromkeys(
        (
            "intact",
            "corrupt_served",
            "corrupt_detected",
            "durable_lost",
            "acked_not_persisted_lost",
            "unacked_lost",
        ),
        0,
    )
    totals = {"acked": 0, "durable": 0, "corrupt_dropped": 0, "kills_mid_stream": 0}
    recovered_short = 0
    restart_s: list[float] = []
    node = start_node(*_node_args(ssd_dir, mode))
    previous: Cycle | None = None
    for number in range(kills + 1):
        with KVStoreClient(node.endpoint, use_shm=number % 2 == 0) as client:
            stats = client.stats()
            totals["corrupt_dropped"] += stats["ssd"]["corrupt_dropped"]
            if previous is not None:
                if stats["ssd"]["recovered_blocks"] < previous.durable:
                    recovered_short += 1
                _check(client, previous, tally)
        if number == kills:
            break
        cycle = Cycle(number)
        _stream_until_killed(node, cycle, rng.uniform(0.0, MAX_KILL_DELAY_S))
        totals["acked"] += cycle.acked
        totals["durable"] += cycle.durable
        totals["kills_mid_stream"] += cycle.acked < MAX_PUTS_PER_CYCLE
        _forget(node)
        started = time.monotonic()
        node = start_node(*_node_args(ssd_dir, mode))
        restart_s.append(time.monotonic() - started)
        previous = cycle

    figures: dict[str, Any] = {
        "kill_points": kills,
        **tally,
        **totals,
        "recovered_below_durable": recovered_short,
        "max_restart_s": round(max(restart_s), 2),
    }
    chaos_report(**figures)
    assert tally["corrupt_served"] == 0, figures
    assert tally["durable_lost"] == 0, figures
    if mode == "write-through":  # acknowledged means on SSD: no acknowledged write is lost
        assert tally["acked_not_persisted_lost"] == 0, figures
    assert tally["corrupt_detected"] == 0, figures
    assert totals["corrupt_dropped"] == 0, figures
    assert recovered_short == 0, figures
    assert totals["durable"] > 0, "no kill landed after a write-behind commit"
    assert totals["kills_mid_stream"] > 0, "every kill came after the writes"
