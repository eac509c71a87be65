"""Row "whole-service restart": a `strata serve` stopped and started again on the same SSD-tier
directory still serves the prefixes stored before from the store (cached tokens in usage), with
identical outputs.

1. `strata serve` (tiny model, 1 prefill + 1 decode engine, an SSD tier in a fresh directory)
   under open-loop load at 0.7x the knee of this kind of cluster: every prompt unique, about 2.5
   engine blocks long; each prefill saves the prompt's full blocks to the store (DRAM, written
   behind to the SSD tier).
2. The whole service is stopped (SIGTERM: gateway, workers, store) and started again on the same
   SSD directory: empty engines, an empty DRAM arena, the SSD tier reopened.
3. A sample of the first run's requests is sent again, one at a time: each must report its full
   blocks as cached (``prompt_tokens_details.cached_tokens``: they can only come from the SSD
   tier) and generate exactly the token ids of the first run.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.chaos.cluster import stop_server
from tests.chaos.conftest import ChaosSize, KneeCache
from tests.chaos.load import Result, Workload, run_load, send, summarize
from tests.e2e.conftest import start_server

BLOCK_SIZE = 128  # vLLM's CPU block size


async def _replay(
    base_url: str, model: str, workload: Workload, indexes: list[int]
) -> list[Result]:
    async with aiohttp.ClientSession() as session:
        return [
            await send(session, base_url, model, workload.request(i), i, timeout_s=120)
            for i in indexes
        ]


@pytest.mark.timeout(1800)
def test_ssd_tier_prefixes_hit_after_a_whole_service_restart(
    tiny_model_dir: Path,
    tmp_path: Path,
    chaos_size: ChaosSize,
    chaos_knee: KneeCache,
    chaos_report: Callable[..., None],
) -> None:
    ssd_dir = tmp_path / "ssd"
    workload = Workload(seed=909, prompt_words=60, max_tokens=12)
    server = start_server(tiny_model_dir, ["--admin-port", "0"], ssd_dir=ssd_dir)
    try:
        knee = chaos_knee.get("serve-1p1d", server.base_url, server.model)
        rate = 0.7 * knee.rate
        before = run_load(
            server.base_url, server.model, workload, rate, chaos_size.pick(20.0, 120.0)
        )
    finally:
        stopped = stop_server(server)
    # A clean stop: the store wrote its DRAM blocks behind to the SSD tier.
    assert stopped == 0, "\n".join(server.lines[-40:])
    summary = summarize(before)
    assert summary.ok == summary.requests, [r.error for r in before if not r.ok][:10]

    sample = sorted(random.Random(1).sample(range(len(before)), min(len(before), 40)))
    server = start_server(tiny_model_dir, ["--admin-port", "0"], ssd_dir=ssd_dir)
    try:
        after = asyncio.run(_replay(server.base_url, server.model, workload, sample))
    finally:
        stop_server(server)

    full_blocks = {i: _full_block_tokens(before[i]) for i in sample}
    hits = [r for r in after if r.ok and r.cached_tokens >= full_blocks[r.index] > 0]
    identical = [r for r in after if r.ok and r.token_ids == before[r.index].token_ids]
    figures: dict[str, Any] = {
        **knee.figures(),
        "rate_rps": round(rate, 3),
        **summary.figures("before_"),
        "replayed": len(after),
        "replayed_ok": sum(r.ok for r in after),
        "prefix_hits_after_restart": len(hits),
        "cached_tokens_after_restart": sum(r.cached_tokens for r in after),
        "identical_outputs": len(identical),
    }
    chaos_report(**figures)
    assert all(r.ok for r in after), [r.error for r in after if not r.ok][:10]
    assert len(hits) == len(after), [(r.index, r.cached_tokens) for r in after][:20]
    assert len(identical) == len(after), figures


def _full_block_tokens(result: Result) -> int:
    """Prompt tokens in full engine blocks (what the store can hold of this prompt, from the
    first run's usage; the last prompt token is always computed, so a prompt of whole blocks
    has one block less)."""
    return (result.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
