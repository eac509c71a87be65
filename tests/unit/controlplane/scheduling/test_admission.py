"""Admission in the slo_aware policy: accept or reject, and the Retry-After estimate, exactly.

Latency models: scheduling_helpers.py (this folder; prefill 1 ms per new token, decode
step 10 ms + 1 ms per sequence, a 1000-token prompt's KV takes 10 ms over TCP, 1 ms over shm).
Requests: 1000 prompt tokens and 101 output tokens unless a case says otherwise, so the KV
transfer adds 0.1 ms (TCP) or 0.01 ms (shm) to the TPOT.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from controlplane.scheduling import (
    Assign,
    CachedPrefix,
    InstanceSnapshot,
    LatencyPredictor,
    Reject,
    RejectReason,
    RequestSnapshot,
    SloAwarePolicy,
    Transport,
)
from tests.unit.controlplane.scheduling.scheduling_helpers import (
    BLOCK,
    SIMPLE,
    D,
    P,
    config,
    instance,
)

ACCEPT = "accept"

# (cluster, request, config overrides, expected): expected is ("accept", prefill, decode) or
# (reason, retry_after_s).
CASES = [
    pytest.param(
        [instance("p0", P, queued=500), instance("d0", D, running=5)],
        RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=2.0, tpot_slo_s=0.05),
        {},
        (ACCEPT, "p0", "d0"),
        id="both-slos-met",  # TTFT 1.5 s, TPOT 16.1 ms
    ),
    pytest.param(
        [instance("p0", P, queued=3000), instance("p1", P, queued=2000), instance("d0", D)],
        RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=1.5),
        {},
        (RejectReason.OVERLOADED, 1.5),
        id="ttft-wait-is-the-best-queue-excess",  # TTFT 4.0 and 3.0 s against 1.5 s
    ),
    pytest.param(
        [instance("p0", P, queued=700), instance("d0", D)],
        RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=1.5),
        {},
        (RejectReason.OVERLOADED, 1.0),
        id="retry-after-at-least-the-minimum",  # 0.2 s wait, raised to 1 s
    ),
    pytest.param(
        [instance("p0", P, queued=100_000), instance("d0", D)],
        RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=1.5),
        {},
        (RejectReason.OVERLOADED, 60.0),
        id="retry-after-at-most-the-maximum",  # 99.5 s wait, cut to 60 s
    ),
    pytest.param(
        [instance("p0", P), instance("d0", D)],
        RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=0.5),
        {},
        (RejectReason.SLO_UNATTAINABLE, None),
        id="ttft-slo-below-an-idle-prefill",  # 1000 new tokens take 1 s
    ),
    pytest.param(
        [instance("p0", P, queued=1000), instance("d0", D)],
        RequestSnapshot(1000, 101, BLOCK, CachedPrefix(pool_blocks=40), ttft_slo_s=0.5),
        {"local_prefill_threshold_tokens": 0, "min_retry_after_s": 0.1},
        (RejectReason.OVERLOADED, 1.0 + 0.36 + 0.00064 - 0.5),
        id="a-cached-prefix-makes-the-slo-attainable",
    ),
    pytest.param(
        [
            instance("p0", P),
            instance("d0", D, running=30),
            instance("d1", D, running=12, remaining=1200),
        ],
        RequestSnapshot(1000, 101, BLOCK, tpot_slo_s=0.02),
        {},
        # At most 8 running sequences meet 20 ms. d1: 100 tokens left per sequence on average,
        # so 12 -> 8 takes 2·100·(1 - 8/12) steps of 22 ms; d0 (256 assumed): ~15 s.
        (RejectReason.OVERLOADED, 2 * 100 * (1 - 8 / 12) * 0.022),
        id="tpot-wait-is-the-best-batch-drain",
    ),
    pytest.param(
        [
            instance("p0", P, queued=2500),
            instance("d0", D, running=30),
            instance("d1", D, running=12, remaining=1200),
        ],
        RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=1.0, tpot_slo_s=0.02),
        {},
        (RejectReason.OVERLOADED, 2.5),
        id="both-sides-wait-the-longer",  # TTFT wait 2.5 s, TPOT wait 1.47 s
    ),
    pytest.param(
        [instance("p0", P, queued=3000), instance("d0", D, running=5)],
        RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=1.5, tpot_slo_s=0.05),
        {},
        (RejectReason.OVERLOADED, 2.5),
        id="ttft-waits-while-tpot-is-met",
    ),
    pytest.param(
        [instance("d0", D, running=8, capacity=8, remaining=800)],
        RequestSnapshot(300, 101, BLOCK, tpot_slo_s=0.05),
        {"min_retry_after_s": 0.1},
        (RejectReason.OVERLOADED, 2 * 100 * (1 - 7 / 8) * 0.018),
        id="local-prefill-on-a-full-decode-waits-for-a-slot",
    ),
    pytest.param(
        [instance("p0", P), instance("d0", D)],
        RequestSnapshot(1000, 101, BLOCK, tpot_slo_s=0.0105),
        {},
        (RejectReason.SLO_UNATTAINABLE, None),
        id="tpot-slo-below-an-idle-step",  # one sequence alone takes 11 ms
    ),
    pytest.param(
        [instance("p0", P), instance("d0", D, running=8, capacity=8, remaining=800)],
        RequestSnapshot(1000, 1, BLOCK, tpot_slo_s=0.0105),
        {},
        (ACCEPT, "p0", "d0"),
        id="one-token-has-no-tpot",  # the prefill's token ends it: no step, no slot needed
    ),
    pytest.param(
        [instance("d0", D, running=8, capacity=8, remaining=800)],
        RequestSnapshot(100, 1, BLOCK, tpot_slo_s=0.05),
        {},
        (RejectReason.OVERLOADED, 1.0),
        id="one-token-on-a-full-decode-waits-for-a-slot",  # a local route runs it there
    ),
    pytest.param(
        [instance("p0", P), instance("d0", D, running=8, capacity=8, remaining=800)],
        RequestSnapshot(1000, 101, BLOCK, tpot_slo_s=0.05),
        {"min_retry_after_s": 0.1},
        (RejectReason.OVERLOADED, 2 * 100 * (1 - 7 / 8) * 0.018),
        id="full-decode-waits-for-a-free-slot",
    ),
    pytest.param(
        [instance("p0", P, queued=100_000), instance("d0", D, running=500, capacity=8)],
        RequestSnapshot(1000, 101, BLOCK),
        {},
        (ACCEPT, "p0", "d0"),
        id="no-slo-never-rejects",
    ),
    pytest.param(
        [instance("d0", D, queued=2000)],
        RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=1.5),
        {},
        (RejectReason.OVERLOADED, 1.5),
        id="local-prefill-queue-drains-too",  # TTFT 3 s on d0 itself
    ),
    pytest.param(
        [
            instance("p0", P, host="h0"),
            instance("p1", P, queued=200, host="h1"),
            instance("d0", D, running=9, host="h1"),
        ],
        RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=2.0, tpot_slo_s=0.02005),
        {},
        (ACCEPT, "p1", "d0"),
        id="slower-prefill-whose-kv-arrives-fast-enough",  # p0 -> d0 over TCP misses the TPOT
    ),
]


@pytest.mark.parametrize(("cluster", "request_", "overrides", "expected"), CASES)
def test_admission(
    cluster: Sequence[InstanceSnapshot],
    request_: RequestSnapshot,
    overrides: dict[str, object],
    expected: tuple[object, ...],
) -> None:
    decision = SloAwarePolicy(config(**overrides)).decide(request_, cluster)
    if expected[0] == ACCEPT:
        assert isinstance(decision, Assign), decision
        assert (decision.prefill, decision.decode) == expected[1:]
        return
    assert isinstance(decision, Reject), decision
    reason, retry_after_s = expected
    assert decision.reason is reason
    if retry_after_s is None:
        assert decision.retry_after_s is None
    else:
        assert decision.retry_after_s == pytest.approx(retry_after_s, rel=1e-9)


def test_reject_detail_names_the_slos() -> None:
    policy = SloAwarePolicy(config())
    cluster = [instance("p0", P, queued=3000), instance("d0", D)]
    decision = policy.decide(RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=1.5), cluster)
    assert decision == Reject(
        RejectReason.OVERLOADED, 2.5, "no instance pair meets TTFT SLO 1500 ms, TPOT SLO none now"
    )
    decision = policy.decide(RequestSnapshot(1000, 101, BLOCK, tpot_slo_s=0.001), cluster)
    assert decision == Reject(
        RejectReason.SLO_UNATTAINABLE,
        None,
        "no instance could meet TTFT SLO none, TPOT SLO 1 ms even when idle",
    )


def test_accepting_after_the_retry_after() -> None:
    # After waiting retry_after_s, the queue has drained by that much: the same request fits.
    policy = SloAwarePolicy(config())
    request = RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=1.5)
    decision = policy.decide(request, [instance("p0", P, queued=3000), instance("d0", D)])
    assert isinstance(decision, Reject)
    assert decision.retry_after_s is not None
    drained = 3000 - round(decision.retry_after_s / 1e-3)
    later = policy.decide(request, [instance("p0", P, queued=drained), instance("d0", D)])
    assert isinstance(later, Assign)
    assert later.predicted_ttft_s == pytest.approx(1.5, rel=1e-9)


def _busy_host_predictor() -> LatencyPredictor:
    """SIMPLE, whose recent prefills ran 1.5x its profile (under the factor-3 change point)
    and whose gateway overhead was 300 ms in its last requests: a busy host right now."""
    transfers = {t: SIMPLE.transfer(t) for t in Transport}
    predictor = LatencyPredictor(SIMPLE.prefill, SIMPLE.decode, transfers, SIMPLE.ssd_read)
    for new in (800, 900, 1000, 1100, 1200, 1000, 900, 1000):
        predictor.observe_prefill(new, 0, 1.5e-3 * new)
    for _ in range(8):
        predictor.observe_ttft_overhead(0.3)
    return predictor


def test_a_busy_host_is_overload_not_an_unattainable_slo() -> None:
    # Now a 1000-token prefill is predicted 1.5 s + 0.3 s, over the 1.2 s SLO even without a
    # queue; its profile (1 s, no overhead) meets it: retrying later can help.
    busy = _busy_host_predictor()
    policy = SloAwarePolicy(config())
    cluster = [instance("p0", P, predictor=busy), instance("d0", D)]
    request_ = RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=1.2)
    assert busy.prefill_s(1000, 0) + busy.ttft_overhead_s == pytest.approx(1.8)
    decision = policy.decide(request_, cluster)
    assert decision == Reject(
        RejectReason.OVERLOADED, 1.0, "no instance pair meets TTFT SLO 1200 ms, TPOT SLO none now"
    )
    # A change point (three prefills 4x off) rescales the model, and the profile's fit with it
    # (plausibility compares against it), to 4 s + 0.3 s; the quiet TTFT is still the 1 s the
    # profile measured.
    for new in (1000, 1000, 1000):
        busy.observe_prefill(new, 0, 4 * 1.5e-3 * new)
    assert busy.num_change_points == 1
    assert busy.profile_prefill_fit.predict_s(1000, 0) == pytest.approx(4.0, rel=0.05)
    assert busy.calibrated_prefill_fit == SIMPLE.prefill
    assert policy.decide(request_, cluster) == decision
    # Below the profile's 1 s the SLO is unattainable, and the refusal says what is attainable.
    decision = policy.decide(RequestSnapshot(1000, 101, BLOCK, ttft_slo_s=0.9), cluster)
    assert decision == Reject(
        RejectReason.SLO_UNATTAINABLE,
        None,
        "no instance could meet TTFT SLO 900 ms, TPOT SLO none even when idle "
        "(the fastest idle TTFT predicted is 1000.0 ms)",
    )
