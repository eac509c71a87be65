"""loadtests/replay_trace.py against a gateway with scripted workers: shared trace blocks become
shared token prefixes; every request is sent and measured; the report adds up."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.replay_trace import main, prompt_ids
from simulator.trace import ReplayScale, TraceRequest, block_key
from tests.integration.controlplane.conftest import Stack


def test_trace_blocks_become_shared_token_prefixes() -> None:
    a = TraceRequest(0, 0.0, 1100, 5, (), (7, 8, 9))
    b = TraceRequest(1, 1.0, 600, 5, (), (7, 11))
    scale = ReplayScale(block_tokens=16)
    ids_a, ids_b = prompt_ids(0, a, scale, 100, 1100), prompt_ids(1, b, scale, 100, 1100)
    assert len(ids_a) == 35 and len(ids_b) == 19  # 1100 and 600 tokens scaled by 16/512
    assert ids_a[:16] == ids_b[:16]  # hash id 7
    assert ids_a[16:32] != ids_b[16:32]
    assert all(100 <= i < 1100 for i in ids_a + ids_b)
    assert prompt_ids(0, a, scale, 100, 1100) == ids_a  # deterministic
    # Whole blocks only (what a prefix cache can share, and what the simulator keys): the 3
    # tokens after a's two whole blocks are its own, not block 9's first three.
    c = TraceRequest(2, 2.0, 1600, 5, (), (7, 8, 9))
    assert prompt_ids(2, c, scale, 100, 1100)[32:35] != ids_a[32:35]
    assert scale.scale(a).keys == tuple(block_key(h) for h in (7, 8))
    assert (scale.scale(a).input_tokens, scale.scale(a).output_tokens) == (35, 5)


def test_replay_against_a_gateway(stack: Stack, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    records = [
        {
            "timestamp": 100 * i,
            "input_length": 1024,
            "output_length": 4,
            "hash_ids": [i % 3, 50 + i],
        }
        for i in range(12)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report.json"
    argv = ["--url", stack.url, "--trace", str(trace), "--time-scale", "4", "--out", str(out)]
    assert main([*argv, "--slo-ttft-ms", "5000", "--slo-tpot-ms", "5000", "--per-request"]) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == 12 and report["succeeded"] == 12
    assert report["statuses"] == {"200": 12}
    assert report["slo_attainment"] == 1.0
    assert report["ttft_ms"]["p50"] > 0
    prompts = [r.prompt_token_ids for r in stack.prefill.prefill_requests]
    assert len(prompts) == 12 and {len(p) for p in prompts} == {32}  # 1024 tokens / 512 * 16
    assert all(r["output_tokens"] >= 1 for r in report["per_request"])
