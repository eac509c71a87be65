"""Offload tiers full (issue 10's text: "offload tiers that grow without bound or crash when
full"): a node whose DRAM and SSD tiers are both full keeps accepting and serving blocks, and
neither tier -- nor the process -- grows past its bound.

**Injection.** A real node (``python -m kvstore.server``) with a 16 MiB arena spilling to a
32 MiB lmdb SSD tier, write-behind on (``strata serve``'s setting), takes a stream of new 256 KiB
blocks -- 3x the two tiers' capacity together in the shortened form, 10x in the full one --
over TCP and shared memory alternately, with GETs of random earlier blocks in between.

**Criteria.** Every PUT is acknowledged (OK: the tiers evict, the node never refuses for lack of
room while nothing is leased); every GET returns the block's exact bytes or a miss (an evicted
block), never an error; the node stays up; the lmdb data file never exceeds ``--ssd-size``, the
arena never holds more than its size, the SSD tier's stored bytes stay within its budget; and
the node's anonymous memory (its heap: indexes, policies, buffers; the arena and lmdb map are
file-backed) after the first full turnover grows by at most 16 MiB over the rest of the run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvstore.client.sync import KVStoreClient
from kvstore.errors import KVStoreError
from tests.chaos.conftest import ChaosSize
from tests.chaos.kv_load import KIB, MIB, key, payload
from tests.integration.kvstore.node_process import NodeFactory, start_node

__all__ = ["start_node"]  # the fixture

BLOCK = 256 * KIB - 64
ARENA = 16 * MIB
SSD = 32 * MIB
TAG = 0xF011


def _anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon")


@pytest.mark.timeout(900)
def test_full_offload_tiers_keep_serving_within_their_bounds(
    start_node: NodeFactory,
    tmp_path: Path,
    chaos_size: ChaosSize,
    chaos_report: Callable[..., None],
) -> None:
    turnovers = chaos_size.pick(3, 10)
    capacity_blocks = (ARENA + SSD) // (BLOCK + 64)
    total = turnovers * capacity_blocks
    ssd_dir = tmp_path / "ssd"
    node = start_node(
        *("--arena-size", "16MiB", "--prefault", "false", "--write-behind", "true"),
        *("--ssd-dir", str(ssd_dir), "--ssd-size", "32MiB"),
        *("--high-watermark", "0.5", "--low-watermark", "0.25"),
    )
    rng = random.Random(3)
    clients = [KVStoreClient(node.endpoint, use_shm=False), KVStoreClient(node.endpoint)]
    statuses: dict[str, int] = {}
    gets = hits = misses = wrong = errors = 0
    max_file = max_arena_used = max_ssd_bytes = 0
    anon_warm = anon_max = 0
    try:
        for n in range(total):
            client = clients[n % 2]
            block_key = key(TAG, n)
            try:
                status = client.put(block_key, payload(block_key, BLOCK))
                statuses[status.name] = statuses.get(status.name, 0) + 1
            except KVStoreError:
                errors += 1
            earlier = key(TAG, rng.randrange(n + 1))
            gets += 1
            try:
                got = client.get(earlier)
            except KVStoreError:
                errors += 1
                continue
            if got is None:
                misses += 1
            elif got != payload(earlier, BLOCK):
                wrong += 1
            else:
                hits += 1
            if n % 16 == 0:
                stats = clients[0].stats()
                max_arena_used = max(max_arena_used, stats["arena"]["used_bytes"])
                max_ssd_bytes = max(max_ssd_bytes, stats["ssd"]["stored_bytes"])
                max_file = max(max_file, os.path.getsize(ssd_dir / "data.mdb"))
                anon = _anon_kib(node.process.pid)
                if n >= capacity_blocks and not anon_warm:
                    anon_warm = anon
                anon_max = max(anon_max, anon)
        stats = clients[0].stats()
    finally:
        for client in clients:
            client.close()
    alive = node.process.poll() is None
    figures: dict[str, Any] = {
        "blocks_put": total,
        "capacity_blocks": capacity_blocks,
        "put_statuses": statuses,
        "gets": gets,
        "hits": hits,
        "misses": misses,
        "wrong": wrong,
        "errors": errors,
        "dram_evictions": stats["evictions"],
        "ssd_evictions": stats["ssd"]["evictions"],
        "persist_failures": stats["tiers"]["persist_failures"],
        "ssd_write_failures": stats["ssd"]["write_failures"],
        "ssd_map_full_retries": stats["ssd"]["map_full_retries"],
        "max_lmdb_file_mib": round(max_file / MIB, 1),
        "max_arena_used_mib": round(max_arena_used / MIB, 1),
        "max_ssd_stored_mib": round(max_ssd_bytes / MIB, 1),
        "anon_rss_after_first_turnover_mib": round(anon_warm / 1024, 1),
        "anon_rss_max_mib": round(anon_max / 1024, 1),
    }
    chaos_report(**figures)
    assert alive
    assert (errors, wrong) == (0, 0), figures
    assert statuses == {"OK": total}, figures
    assert max_file <= SSD and max_arena_used <= ARENA, figures
    assert max_ssd_bytes <= stats["ssd"]["budget_bytes"], figures
    assert stats["ssd"]["evictions"] > 0 and hits > 0, figures
    assert anon_max - anon_warm <= 16 * 1024, figures
