"""``conductor`` (Mooncake's Conductor as published): its choices and rejections, exactly.

Latency models and units: scheduling_helpers.py (this folder; prefill 1 ms per new token,
decode step 10 ms + 1 ms per sequence, TCP 100 MB/s, shm 1 GB/s, 1000 B of KV per token,
blocks of 16). The default request: 1000 prompt tokens (62 blocks can hit), 101 output tokens.
"""

from __future__ import annotations

import pytest

from controlplane.scheduling import Assign, Reject, RejectReason, Route
from controlplane.scheduling.policies import ConductorPolicy
from tests.unit.controlplane.scheduling.scheduling_helpers import B, D, P, config, instance, request


def decide(cluster: list, req: object, **overrides: object) -> object:  # type: ignore[type-arg]
    return ConductorPolicy(config(**overrides)).decide(req, cluster)  # type: ignore[arg-type]


def test_lowest_ttft_prefill_and_lowest_tbt_decode() -> None:
    cluster = [
        instance("p0", P, queued=500),
        instance("p1", P),
        instance("d0", D, running=4),
        instance("d1", D, running=1),
    ]
    decision = decide(cluster, request())
    assert isinstance(decision, Assign)
    assert (decision.prefill, decision.decode, decision.route) == ("p1", "d1", Route.DISAGGREGATED)
    assert decision.predicted_ttft_s == pytest.approx(1.0)  # 1000 new tokens
    # d1: a step of 2 sequences (12 ms) + 1 MB over TCP (10 ms) spread over 100 gaps.
    assert decision.predicted_tpot_s == pytest.approx(0.012 + 0.0001)


def test_a_local_prefix_is_used_and_a_much_longer_one_fetched() -> None:
    # p0 holds 40 blocks in HBM, p1 10; the longest anywhere is 40 (p0's).
    cluster = [instance("p0", P, queued=300), instance("p1", P), instance("d0", D)]
    decision = decide(cluster, request(hbm={"p0": 40, "p1": 10}))
    assert isinstance(decision, Assign)
    # p0: queue 0.3 s + 360 new tokens = 0.66 s. p1: 40 / 10 > 1.5, so it fetches 30 blocks
    # (480 tokens, 0.48 MB over TCP: 4.8 ms) and computes 360: 0.3648 s. p1 wins.
    assert (decision.prefill, decision.cached_blocks) == ("p1", 40)
    assert decision.predicted_ttft_s == pytest.approx(0.36 + 0.0048)
    # Below the threshold it recomputes: 12 blocks at p1 against 16 best (16 / 12 < 1.5).
    close = decide([instance("p1", P), instance("d0", D)], request(hbm={"p0": 16, "p1": 12}))
    assert isinstance(close, Assign) and close.cached_blocks == 12
    assert close.predicted_ttft_s == pytest.approx((1000 - 192) * 1e-3)


def test_early_rejection_on_either_slo() -> None:
    cluster = [instance("p0", P, queued=2000), instance("d0", D, running=20)]
    slow = decide(cluster, request(ttft_slo_s=2.0))  # 2 s of queue + 1 s: 3 s
    assert isinstance(slow, Reject) and slow.reason is RejectReason.OVERLOADED
    assert slow.retry_after_s == 1.0  # the configured minimum: Conductor predicts no wait
    tight = decide(cluster, request(tpot_slo_s=0.02))  # a step of 21 sequences: 31 ms
    assert isinstance(tight, Reject)
    assert isinstance(decide(cluster, request(ttft_slo_s=4.0, tpot_slo_s=0.05)), Assign)


def test_without_a_prefill_instance_the_decode_prefills() -> None:
    decision = decide([instance("d0", D), instance("d1", D, running=2)], request())
    assert isinstance(decision, Assign)
    assert (decision.prefill, decision.decode, decision.route) == (
        None,
        "d0",
        Route.LOCAL_NO_PREFILL,
    )


def test_an_instance_that_prefills_and_decodes_is_not_its_own_pair() -> None:
    cluster = [instance("b0", B), instance("b1", B, running=3)]
    decision = decide(cluster, request())
    assert isinstance(decision, Assign)
    assert (decision.prefill, decision.decode) == ("b0", "b1")
    alone = decide([instance("b0", B)], request())
    assert isinstance(alone, Assign)
    assert (alone.prefill, alone.decode, alone.route) == (None, "b0", Route.LOCAL_SAME_INSTANCE)
