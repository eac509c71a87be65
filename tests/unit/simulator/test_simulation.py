"""A request's life through the simulation, timed by hand (issue 13, acceptance 6), and the
config, trace and results around it.

Profile: a step costs 10 ms, plus 1 ms per prompt token and 1 ms per decoding sequence; a token
of KV is 1,000 bytes; shared memory moves 1 MB/s (1 ms a token), TCP 0.5 MB/s (2 ms a token).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

import pytest

from controlplane.scheduling import TransferCoefficients, Transport
from simulator.config import (
    PlanningSettings,
    Setup,
    Shape,
    SimConfig,
    StoreConfig,
    Timing,
    load_config,
)
from simulator.loop import Simulation
from simulator.profile import EngineProfile, StepModel
from simulator.results import Point, rate_at, summarize
from simulator.trace import TraceRequest, block_key, load_trace

MS = 1e-3
PROFILE = EngineProfile(
    name="hand",
    model="hand",
    hardware="none",
    source="test",
    step=StepModel(10 * MS, 1 * MS, 0.0, 0.0, 1 * MS, 0.0),
    kv_bytes_per_token=1000,
    hbm_kv_tokens=4096,
    max_num_seqs=8,
    max_num_batched_tokens=512,
    max_model_len=1024,
)
TRANSFERS = MappingProxyType(
    {
        Transport.SHM: TransferCoefficients(0.0, 1e6),
        Transport.TCP: TransferCoefficients(0.0, 5e5),
        Transport.RDMA: TransferCoefficients(0.0, 1e7),
    }
)


def config(*setups: Setup, **kw: object) -> SimConfig:
    values: dict[str, object] = {
        "name": "hand",
        "profile": PROFILE,
        "gpus": 2,
        "gpus_per_host": 1,
        "setups": setups,
        "strata_setup": setups[0].name,
        "rates": (1.0,),
        "ttft_slo_s": 1.0,
        "tpot_slo_s": 0.05,
        "store": StoreConfig(dram_bytes=64 * 8 * 1000),
        "network": Transport.TCP,
        "transfers": TRANSFERS,
        "cache_block_tokens": 8,
        "kv_block_tokens": 4,
        "gateway_overhead_s": 2 * MS,
    } | kw
    return SimConfig(**values)  # type: ignore[arg-type]


def request(index: int, arrival_s: float, prompt: int, output: int, ids: range) -> TraceRequest:
    return TraceRequest(index, arrival_s, prompt, output, tuple(block_key(i) for i in ids))


SYNC_PD = Setup(
    "pd",
    "round_robin",
    Shape.DISAGGREGATED,
    prefill_gpus=1,
    local_prefill_threshold_tokens=0,
    kv_load=Timing.SYNC,
    kv_save=Timing.SYNC,
)


def test_a_disaggregated_request_timed_by_hand() -> None:
    sim = Simulation(config(SYNC_PD), SYNC_PD, [request(0, 0.0, 20, 3, range(2))])
    (record,) = sim.run()
    # Decided at 2 ms; the prefill step computes 20 tokens (10 + 20 ms) and saves its 20 tokens
    # of whole KV blocks to its host's node over shared memory (20 ms): first token at 52 ms.
    assert (record.prefill, record.decode, record.route) == ("p0", "d0", "disaggregated")
    assert record.first_token_s == pytest.approx(0.052)
    # The decode loads those 20 tokens from the other host over TCP (40 ms) in the step that
    # admits it and computes the 21st (the first token): 10 + 1 + 40 ms, its first token (the
    # request's second) at 103 ms; one more step (10 + 1 ms): the last token at 114 ms.
    assert record.last_token_s == pytest.approx(0.114)
    assert record.num_tokens == 3
    assert record.tpot_s == pytest.approx(0.031)
    assert record.ttft_s == pytest.approx(0.052)
    # The prefill's host node holds the prompt's 2 whole cache blocks; both engines cache them.
    node = sim.nodes["h0"]
    assert node.held(request(0, 0.0, 20, 3, range(2)).keys) == 2
    match = sim.index.match(request(0, 0.0, 20, 3, range(2)).keys)
    assert match.depth == 2
    assert {h.holder for h in match.holders} == {"p0", "d0", "store-h0"}


def test_a_prefix_in_the_pool_is_loaded_not_computed() -> None:
    # Request 1 shares request 0's first two cache blocks (16 tokens), on another prefill
    # instance: it loads them from the pool (h0's node, over TCP from h1) instead of computing.
    setup = Setup(
        "pd",
        "round_robin",
        Shape.DISAGGREGATED,
        prefill_gpus=2,
        local_prefill_threshold_tokens=0,
        kv_load=Timing.SYNC,
        kv_save=Timing.SYNC,
    )
    cfg = config(setup, gpus=3)
    first = request(0, 0.0, 20, 1, range(2))  # one token: no decode (d0 caches nothing)
    second = request(1, 1.0, 20, 2, range(2))
    records = Simulation(cfg, setup, [first, second]).run()
    assert [r.prefill for r in records] == ["p0", "p1"]
    assert [r.cached_tokens for r in records] == [0, 16]
    # p1: decided at 1.002; 16 tokens over TCP (32 ms; h1's node reads them through and keeps
    # them) + a step of 4 tokens (14 ms) + saving the 4 tokens h1's node lacks over shared
    # memory (4 ms): first token at 1.052.
    assert records[1].first_token_s == pytest.approx(1.052)


def test_same_inputs_same_results() -> None:
    setup = Setup("s", "slo_aware", Shape.DISAGGREGATED, prefill_gpus=1)
    cfg = config(setup, tpot_slo_s=0.5)
    requests = [request(i, 0.01 * i, 30 + i, 4, range(i % 3)) for i in range(40)]
    runs = [[(r.first_token_s, r.last_token_s) for r in Simulation(cfg, setup, requests).run()]]
    runs.append([(r.first_token_s, r.last_token_s) for r in Simulation(cfg, setup, requests).run()])
    assert runs[0] == runs[1]
    served = sum(first is not None for first, _ in runs[0])
    assert 0 < served < 40  # a 10 ms arrival gap overloads it: some are refused (429)


def test_colocated_setups_never_disaggregate() -> None:
    setup = Setup("c", "round_robin", Shape.COLOCATED, pool=False)
    records = Simulation(
        config(setup), setup, [request(i, 0.0, 900, 2, range(0)) for i in range(4)]
    ).run()
    assert {r.prefill for r in records} == {None}
    assert [r.decode for r in records] == ["c0", "c1", "c0", "c1"]


def test_results_and_rate_at_90() -> None:
    def point(rate: float, attainment: float) -> Point:
        return Point(
            rate, 10, attainment, 0.0, 0, {}, None, None, None, None, None, None, 0.0, {}, 0.0
        )

    points = [point(1, 1.0), point(2, 0.95), point(4, 0.85), point(8, 0.5)]
    assert rate_at(points) == pytest.approx(3.0)  # 0.95 -> 0.85 crosses 0.9 half-way
    assert rate_at([point(1, 0.8)]) == 0.0
    assert rate_at([point(1, 0.95), point(2, 0.92)]) == 2.0
    setup = Setup("c", "round_robin", Shape.COLOCATED, pool=False)
    records = Simulation(
        config(setup),
        setup,
        [request(0, 0.0, 900, 2, range(0)), request(1, 0.5, 5000, 2, range(0))],
    ).run()
    summary = summarize(records, 1.0, 1.0, 0.05)
    assert summary.reject_reasons == {"too_long": 1}  # 5,002 tokens > max_model_len 1,024
    assert summary.attainment == 1.0  # of the servable ones


def test_trace_and_config_files(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
        {"timestamp": 2000, "input_length": 600, "output_length": 7, "hash_ids": [0, 3]},
        {"timestamp": 4000, "input_length": 100, "output_length": 1, "hash_ids": [9]},
    ]
    trace.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    loaded = load_trace(trace)
    assert [len(r.keys) for r in loaded.requests] == [2, 1, 0]  # whole 512-token blocks only
    assert loaded.requests[0].keys[0] == loaded.requests[1].keys[0] == block_key(0)
    assert loaded.native_rate == pytest.approx(0.5)
    assert [r.arrival_s for r in loaded.at_rate(2.0)] == [0.0, 0.5, 1.0]
    trace.write_text('{"timestamp": 0, "input_length": 0, "output_length": 5}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:1: input_length and output_length"):
        load_trace(trace)

    profile = tmp_path / "p.yaml"
    profile.write_text(
        "name: p\nmodel: m\nhardware: h\nkv_bytes_per_token: 1000\nhbm_kv_tokens: 4096\n"
        "max_num_seqs: 8\nmax_num_batched_tokens: 512\nstep: {fixed_s: 0.01, "
        "per_prefill_token_s: 0.001, per_cached_token_s: 0, per_attention_pair_s: 0, "
        "per_decode_sequence_s: 0.001, per_context_token_s: 0}\n"
    )
    cfg = tmp_path / "c.yaml"
    text = (
        "name: c\nprofile: p.yaml\ntrace: trace.jsonl\ngpus: 4\nstore: {dram: 1GiB}\n"
        "slo: {ttft: 2s, tpot: 100ms}\nrates: [1, 2]\nstrata_setup: s\n"
        "transfers: {tcp: {latency: 50us, bandwidth: 1GB}}\n"
        "setups:\n  - {name: s, policy: slo_aware, shape: disaggregated, prefill_gpus: 2}\n"
    )
    cfg.write_text(text)
    loaded_cfg = load_config(cfg)
    tcp = loaded_cfg.transfers[Transport.TCP]
    assert (tcp.latency_s, tcp.bytes_per_s) == (pytest.approx(50e-6), 1e9)
    assert loaded_cfg.trace == tmp_path / "trace.jsonl"
    cfg.write_text(text.replace("prefill_gpus: 2", "prefill_gpus: 4"))
    with pytest.raises(ValueError, match="prefill_gpus must leave decode GPUs"):
        load_config(cfg)
    cfg.write_text(text.replace("policy: slo_aware", "policy: fastest"))
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        load_config(cfg)
    cfg.write_text(text.replace("gpus: 4\n", "gpus: 4\nspeed: 11\n"))
    with pytest.raises(ValueError, match=r"unknown fields \['speed'\]"):
        load_config(cfg)
    cfg.write_text(text.replace("prefill_gpus: 2}", "prefill_gpus: 2, local_fallbak: true}"))
    with pytest.raises(ValueError, match=r"setup s: unknown fields \['local_fallbak'\]"):
        load_config(cfg)
    cfg.write_text(text.replace("prefill_gpus: 2}", "prefill_gpus: 2, pool: 'false'}"))
    with pytest.raises(ValueError, match="setup s: pool must be true or false"):
        load_config(cfg)


@pytest.mark.parametrize(
    "setup",
    [
        Setup(
            "sync",
            "slo_aware",
            Shape.DISAGGREGATED,
            prefill_gpus=1,
            kv_load=Timing.SYNC,
            kv_save=Timing.SYNC,
        ),
        Setup("async", "slo_aware", Shape.DISAGGREGATED, prefill_gpus=1),
        Setup("fallback", "slo_aware", Shape.DISAGGREGATED, prefill_gpus=1, local_fallback=True),
        Setup("conductor", "conductor", Shape.DISAGGREGATED, prefill_gpus=1),
        Setup("colocated", "prefix_aware", Shape.COLOCATED),
        Setup("no-pool", "round_robin", Shape.DISAGGREGATED, prefill_gpus=1, pool=False),
        Setup(
            "planned",
            "slo_aware",
            Shape.DISAGGREGATED,
            prefill_gpus=1,
            decode_gpus=1,
            planner="strata",
        ),
        Setup(
            "dynamo-planned",
            "slo_aware",
            Shape.DISAGGREGATED,
            prefill_gpus=1,
            decode_gpus=1,
            planner="dynamo",
        ),
    ],
    ids=lambda s: s.name,
)
def test_everything_returns_when_the_run_ends(setup: Setup) -> None:
    # A small HBM (256 tokens) forces preemptions; shared prefixes exercise hits and loads.
    small = EngineProfile(
        name="small", model="m", hardware="h", source="t", step=PROFILE.step,
        kv_bytes_per_token=1000, hbm_kv_tokens=256, max_num_seqs=4,
        max_num_batched_tokens=64, max_model_len=512,
    )  # fmt: skip
    cfg = config(
        setup, gpus=3, tpot_slo_s=1.0, ttft_slo_s=30.0, profile=small,
        planning=PlanningSettings(interval_s=0.2, engine_start_s=0.1, scale_down_after=1),
    )  # fmt: skip
    requests = [request(i, 0.02 * i, 40 + 7 * (i % 5), 30, range(i % 4)) for i in range(60)]
    sim = Simulation(cfg, setup, requests)
    records = sim.run()
    assert all(r.finished or r.rejected is not None for r in records)
    assert any(r.finished for r in records)
    for instance in sim.gateway.instances:
        counters = (
            instance.num_prefills,
            instance.queued_prefill_tokens,
            instance.running_decodes,
            instance.context_tokens,
            instance.remaining_decode_tokens,
            instance.pending,
        )
        assert counters == (0, 0, 0, 0, 0, 0), instance.id
        engine = instance.engine
        assert not engine.has_work and not engine.stepping
        assert engine.used_tokens == engine.cache_block_tokens * len(engine._free_cached)
    if setup.name == "sync":
        assert sum(i.engine.num_preemptions for i in sim.gateway.instances) > 0
