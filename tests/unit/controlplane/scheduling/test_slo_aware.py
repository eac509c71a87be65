"""``slo_aware``: the chosen pair, its predictions and the rejections on tables of cluster
states, exactly, and the worked example of docs/design/scheduling.md.

Latency models and units: scheduling_helpers.py (this folder; prefill 1 ms per new
token, decode step 10 ms + 1 ms per sequence, TCP 100 MB/s, shm 1 GB/s, 1000 B of KV per token).
The default request: 1000 prompt tokens (62 blocks of 16 can hit), 101 output tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import pytest

from controlplane.instances.types import InstanceState
from controlplane.scheduling import (
    Assign,
    CachedPrefix,
    InstanceLoad,
    InstanceSnapshot,
    LatencyPredictor,
    Reject,
    RejectReason,
    RequestCosts,
    RequestSnapshot,
    Route,
)
from controlplane.scheduling.policies import (
    SloAwarePolicy,
)
from controlplane.workers.roles import WorkerRole
from tests.unit.controlplane.scheduling.scheduling_helpers import (
    BLOCK,
    B,
    D,
    P,
    assigned,
    config,
    instance,
    request,
)

# -- slo aware -------------------------------------------------------------------------------

# Each case: cluster, request, config overrides, expected (prefill, decode, route, TTFT, TPOT).

SLO_AWARE_CASES = [
    pytest.param(
        [
            instance("p0", P, queued=2000),
            instance("p1", P, queued=500),
            instance("d0", D, running=30),
            instance("d1", D, running=5),
        ],
        request(),
        {},
        ("p1", "d1", Route.DISAGGREGATED, 1.5, 0.016 + 0.0001),
        id="lowest-ttft-then-lowest-tpot",
    ),
    pytest.param(
        [instance("p0", P, queued=2000), instance("p1", P, queued=500), instance("d0", D)],
        request(pool=40),
        {"local_prefill_threshold_tokens": 0},
        ("p1", "d0", Route.DISAGGREGATED, 0.5 + 0.36 + 0.00064, 0.011 + 0.0001),
        id="pool-hit-loaded-from-dram",  # 640 cached tokens = 640 kB over shm
    ),
    pytest.param(
        [instance("p1", P, queued=500), instance("d0", D)],
        request(pool=40, ssd=10),
        {"local_prefill_threshold_tokens": 0},
        ("p1", "d0", Route.DISAGGREGATED, 0.5 + 0.36 + 0.00064 + 0.0016, 0.011 + 0.0001),
        id="pool-hit-partly-on-ssd",  # + 160 kB read from SSD at 100 MB/s
    ),
    pytest.param(
        [instance("p0", P, queued=600), instance("p1", P, queued=500), instance("d0", D)],
        request(hbm={"p0": 62}),
        {},
        ("p0", "d0", Route.DISAGGREGATED, 0.6 + 0.008, 0.011 + 0.0001),
        id="hbm-prefix-beats-a-shorter-queue",
    ),
    pytest.param(
        [
            instance("p0", P),
            instance("d0", D, running=30),
            instance("d1", D, running=25),
            instance("d2", D, running=15),
        ],
        request(tpot_slo_s=0.03),
        {},
        ("p0", "d2", Route.DISAGGREGATED, 1.0, 0.026 + 0.0001),
        id="tpot-slo-filters-decode-instances",
    ),
    pytest.param(
        [
            instance("p0", P, host="h1"),
            instance("d0", D, running=5, host="h1"),
            instance("d1", D, running=5, host="h2"),
        ],
        request(),
        {},
        ("p0", "d0", Route.DISAGGREGATED, 1.0, 0.016 + 0.00001),
        id="same-host-moves-kv-over-shm",
    ),
    pytest.param(
        [
            instance("p0", P, host="h1"),
            instance("d0", D, running=5, host="h1"),
            instance("d1", D, running=4, host="h2"),
        ],
        request(),
        {},
        ("p0", "d1", Route.DISAGGREGATED, 1.0, 0.015 + 0.0001),
        id="a-lighter-batch-beats-shm",
    ),
    pytest.param(
        [
            instance("p0", P),
            instance("d0", D, running=8, capacity=8),
            instance("d1", D, running=10),
        ],
        request(tpot_slo_s=0.05),
        {},
        ("p0", "d1", Route.DISAGGREGATED, 1.0, 0.021 + 0.0001),
        id="a-full-decode-instance-cannot-meet-a-tpot-slo",
    ),
    pytest.param(
        [instance("b0", B, running=2), instance("p0", P, queued=2000)],
        request(),
        {},
        (None, "b0", Route.LOCAL_SAME_INSTANCE, 1.0 + 0.012, 0.013),
        id="both-role-prefills-itself-when-faster",
    ),
    pytest.param(
        [
            instance("b0", B, running=1, host="h"),
            instance("d1", D, running=1, host="h"),
            instance("d2", D, running=9, host="g"),
        ],
        request(),
        {},
        ("b0", "d1", Route.DISAGGREGATED, 1.0, 0.012 + 0.00001),
        id="both-role-prefills-for-another-same-host-decode",
    ),
    pytest.param(
        [instance("p0", P, queued=5000), instance("d0", D, running=3)],
        request(pool=50),
        {},
        (None, "d0", Route.LOCAL_SHORT, 0.2 + 0.0008 + 0.013, 0.014),
        id="short-uncached-part-prefills-on-decode",
    ),
]


@pytest.mark.parametrize(("cluster", "req", "overrides", "expected"), SLO_AWARE_CASES)
def test_slo_aware(
    cluster: Sequence[InstanceSnapshot],
    req: RequestSnapshot,
    overrides: dict[str, object],
    expected: tuple[str | None, str, Route, float, float],
) -> None:
    decision = SloAwarePolicy(config(**overrides)).decide(req, cluster)
    assert isinstance(decision, Assign), decision
    prefill, decode, route, ttft, tpot = expected
    assert (decision.prefill, decision.decode, decision.route) == (prefill, decode, route)
    assert decision.predicted_ttft_s == pytest.approx(ttft, rel=1e-9)
    assert decision.predicted_tpot_s == pytest.approx(tpot, rel=1e-9)
    assert decision.policy == "slo_aware"


def test_slo_aware_uses_the_configured_slos_when_the_request_has_none() -> None:
    cluster = [instance("p0", P), instance("d0", D, running=30), instance("d1", D, running=25)]
    strict = SloAwarePolicy(config(default_tpot_slo_s=0.03))
    assert isinstance(strict.decide(request(), cluster), Reject)
    # The request's own SLO overrides the default.
    assert assigned(strict.decide(request(tpot_slo_s=0.05), cluster)) == ("p0", "d1")


def test_local_fallback_takes_what_no_pair_can_meet() -> None:
    # Two output tokens: the 1 MB of KV over TCP (10 ms) is all in the one gap, so the pair's
    # TPOT is 11 + 10 ms against a 15 ms SLO; d0 prefilling itself has no transfer: 11 ms.
    cluster = [instance("p0", P), instance("d0", D), instance("d1", D, running=3)]
    short = request(max_tokens=2, tpot_slo_s=0.015)
    refused = SloAwarePolicy(config()).decide(short, cluster)
    assert isinstance(refused, Reject) and refused.reason is RejectReason.SLO_UNATTAINABLE
    decision = SloAwarePolicy(config(local_fallback=True)).decide(short, cluster)
    assert isinstance(decision, Assign), decision
    assert (decision.prefill, decision.decode, decision.route) == (
        None,
        "d0",  # d1's running decodes make its TTFT and TPOT longer
        Route.LOCAL_FALLBACK,
    )
    assert decision.predicted_ttft_s == pytest.approx(1.0)  # 1000 tokens, 1 ms each
    assert decision.predicted_tpot_s == pytest.approx(0.011)
    # A pair that meets the SLOs is still preferred; and the fallback needs conditional
    # disaggregation.
    assert assigned(SloAwarePolicy(config(local_fallback=True)).decide(request(), cluster)) == (
        "p0",
        "d0",
    )
    off = config(local_fallback=True, conditional_disaggregation=False)
    assert isinstance(SloAwarePolicy(off).decide(short, cluster), Reject)
    # Not at the running sequences' expense: d0 busy with 3 sequences of 10 tokens left each,
    # the 1 s prefill spread over them adds 100 ms to their 13 ms steps: past the 15 ms SLO.
    busy = [instance("p0", P), instance("d0", D, running=3, remaining=30)]
    refused = SloAwarePolicy(config(local_fallback=True)).decide(short, busy)
    assert isinstance(refused, Reject), refused


def test_a_one_token_fallback_still_spares_the_running_sequences() -> None:
    # One output token has no TPOT SLO of its own, but the decode instance's running sequences
    # do: p0's queue puts the pair past the 2 s TTFT SLO, d0 would prefill in 1 s — idle, it
    # takes the request; with 3 sequences of 10 tokens left, the 1 s prefill would add 100 ms
    # to their 13 ms steps (SLO 15 ms): refused.
    one = request(max_tokens=1, ttft_slo_s=2.0, tpot_slo_s=0.015)
    fallback = SloAwarePolicy(config(local_fallback=True))
    idle = [instance("p0", P, queued=5000, requests=5), instance("d0", D)]
    decision = fallback.decide(one, idle)
    assert isinstance(decision, Assign) and decision.route is Route.LOCAL_FALLBACK, decision
    busy = [instance("p0", P, queued=5000, requests=5), instance("d0", D, running=3, remaining=30)]
    assert isinstance(fallback.decide(one, busy), Reject)


# -- the worked example of docs/design/scheduling.md §6 --------------------------------------


def test_worked_example_of_the_design_doc() -> None:
    def node(id: str, role: WorkerRole, host: str, **load: int) -> InstanceSnapshot:
        return InstanceSnapshot(
            id, role, InstanceState.READY, LatencyPredictor(), InstanceLoad(**load), 256, host
        )

    cluster = [
        node("p0", P, "h0", queued_prefill_tokens=2048, queued_prefill_requests=1),
        node("p1", P, "h1"),
        node("d0", D, "h0", running_decodes=32, decode_context_tokens=65536),
        node("d1", D, "h1", running_decodes=8, decode_context_tokens=16384,
             remaining_decode_tokens=800),
    ]  # fmt: skip
    cached = CachedPrefix(128, 0, MappingProxyType({"p0": 150}))
    policy = SloAwarePolicy()  # priors, kv_bytes_per_token 131072
    decision = policy.decide(RequestSnapshot(3000, 201, BLOCK, cached, 0.5, 0.05), cluster)
    assert isinstance(decision, Assign)
    assert (decision.prefill, decision.decode, decision.route) == ("p1", "d1", Route.DISAGGREGATED)
    assert decision.predicted_ttft_s == pytest.approx(0.1409661936, rel=1e-9)
    assert decision.predicted_tpot_s == pytest.approx(0.011484388, rel=1e-9)
    assert decision.cached_blocks == 128
    costs = RequestCosts(RequestSnapshot(3000, 201, BLOCK, cached, 0.5, 0.05), policy.config)
    assert costs.ttft_s(cluster[0], local=False) == pytest.approx(0.297036952, rel=1e-9)

    tight_tpot = policy.decide(RequestSnapshot(3000, 201, BLOCK, cached, 0.5, 0.011), cluster)
    assert isinstance(tight_tpot, Reject)
    assert tight_tpot.reason is RejectReason.OVERLOADED
    assert tight_tpot.retry_after_s == pytest.approx(100 * 0.01112768, rel=1e-9)
    tight_ttft = policy.decide(RequestSnapshot(3000, 201, BLOCK, cached, 0.1, 0.05), cluster)
    assert tight_ttft == Reject(
        RejectReason.OVERLOADED, 1.0, "no instance pair meets TTFT SLO 100 ms, TPOT SLO 50 ms now"
    )
