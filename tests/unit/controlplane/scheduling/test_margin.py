"""The admission margin: the tail of observed/predicted TTFT ratios (`TailRatio`), and how the
slo_aware policy applies it (busy instances only), exactly.

Latency models: scheduling_helpers.py (prefill 1 ms per new token); requests of 1000 prompt
tokens, so an idle prefill instance predicts a TTFT of 1 s.
"""

from __future__ import annotations

import pytest

from controlplane.scheduling import Assign, LatencyPredictor, Reject, RejectReason, SloAwarePolicy
from controlplane.scheduling.predictor.margin import TailRatio
from tests.unit.controlplane.scheduling.scheduling_helpers import D, P, config, instance, request

# -- TailRatio ---------------------------------------------------------------------------------


def test_quantile_is_the_nearest_rank_of_the_ratios() -> None:
    tail = TailRatio(window=128, max_age_s=30.0, min_count=8)
    for i in range(10):  # ratios 1.0, 1.1, ..., 1.9
        tail.add(1.0, 1.0 + i / 10, now=0.0)
    assert tail.quantile(0.9, now=0.0) == pytest.approx(1.8)  # rank ceil(9) = 9th of 10
    assert tail.quantile(0.5, now=0.0) == pytest.approx(1.4)
    assert tail.quantile(1.0, now=0.0) == pytest.approx(1.9)
    assert tail.quantile(0.0, now=0.0) == 1.0  # 0 turns the margin off


def test_too_few_ratios_are_no_margin() -> None:
    tail = TailRatio(min_count=8)
    for _ in range(7):
        tail.add(0.1, 0.5, now=0.0)
    assert tail.quantile(0.9, now=0.0) == 1.0
    tail.add(0.1, 0.5, now=0.0)
    assert tail.quantile(0.9, now=0.0) == pytest.approx(5.0)


def test_a_fast_model_never_lowers_the_bar() -> None:
    tail = TailRatio(min_count=1)
    for _ in range(5):
        tail.add(1.0, 0.25, now=0.0)
    assert tail.quantile(0.9, now=0.0) == 1.0


def test_ratios_expire_and_the_window_keeps_the_newest() -> None:
    tail = TailRatio(window=4, max_age_s=30.0, min_count=1)
    for i, ratio in enumerate([9.0, 1.0, 1.0, 1.0, 1.0]):
        tail.add(1.0, ratio, now=float(i))
    assert len(tail) == 4
    assert tail.quantile(1.0, now=4.0) == 1.0  # the 9 was pushed out by the fifth
    tail.add(1.0, 3.0, now=10.0)
    assert tail.quantile(1.0, now=34.5) == pytest.approx(3.0)  # ratios of t <= 4 expired
    assert len(tail) == 1
    assert tail.quantile(1.0, now=41.0) == 1.0
    assert len(tail) == 0


@pytest.mark.parametrize(
    ("predicted", "observed"),
    [(0.0, 1.0), (1.0, 0.0), (float("nan"), 1.0), (1.0, float("inf")), (-1.0, 1.0), (1e-320, 1.0)],
)
def test_meaningless_observations_are_ignored(predicted: float, observed: float) -> None:
    tail = TailRatio(min_count=1)
    tail.add(predicted, observed, now=0.0)
    assert len(tail) == 0


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_count"):
        TailRatio(window=4, min_count=5)
    with pytest.raises(ValueError, match="max_age_s"):
        TailRatio(max_age_s=0.0)


def test_the_predictor_feeds_accuracy_and_margin() -> None:
    predictor = LatencyPredictor()
    for i in range(8):
        predictor.observe_ttft(0.1, 0.2, now=float(i))
    assert predictor.ttft_margin(0.9, now=8.0) == pytest.approx(2.0)
    assert predictor.accuracy.num_ttft == 8
    assert predictor.ttft_margin(0.9, now=100.0) == 1.0  # all expired


# -- the policy ----------------------------------------------------------------------------------


def test_a_busy_instance_is_admitted_only_within_its_margin() -> None:
    policy = SloAwarePolicy(config(local_prefill_threshold_tokens=0))
    # TTFT 1.5 s (500 queued + 1000 new) against an SLO of 2 s: met, but not with a margin of 1.5.
    ok = policy.decide(
        request(ttft_slo_s=2.0), [instance("p0", P, queued=500, margin=1.3), instance("d0", D)]
    )
    assert isinstance(ok, Assign) and ok.prefill == "p0"
    assert ok.predicted_ttft_s == pytest.approx(1.5)  # the prediction, not the margin's
    refused = policy.decide(
        request(ttft_slo_s=2.0), [instance("p0", P, queued=500, margin=1.5), instance("d0", D)]
    )
    assert isinstance(refused, Reject) and refused.reason is RejectReason.OVERLOADED


def test_an_idle_instance_is_admitted_on_its_prediction() -> None:
    policy = SloAwarePolicy(config(local_prefill_threshold_tokens=0))
    decision = policy.decide(
        request(ttft_slo_s=1.0), [instance("p0", P, margin=3.0), instance("d0", D)]
    )
    assert isinstance(decision, Assign) and decision.prefill == "p0"


def test_the_margin_picks_the_instance_that_meets_the_slo() -> None:
    policy = SloAwarePolicy(config(local_prefill_threshold_tokens=0))
    cluster = [
        instance("p0", P, queued=100, margin=2.0),  # 1.1 s predicted, 2.2 s with its margin
        instance("p1", P, queued=400, margin=1.0),  # 1.4 s
        instance("d0", D),
    ]
    decision = policy.decide(request(ttft_slo_s=1.5), cluster)
    assert isinstance(decision, Assign) and decision.prefill == "p1"


def test_retry_after_waits_for_the_margin() -> None:
    policy = SloAwarePolicy(config(local_prefill_threshold_tokens=0, min_retry_after_s=0.01))
    cluster = [instance("p0", P, queued=2000, margin=1.5), instance("d0", D)]
    decision = policy.decide(request(ttft_slo_s=1.5), cluster)
    # 3 s predicted; admitted once it is down to 1.5 / 1.5 = 1 s: 2 s of queue to drain.
    assert decision == Reject(
        RejectReason.OVERLOADED, 2.0, "no instance pair meets TTFT SLO 1500 ms, TPOT SLO none now"
    )


def test_retry_after_is_at_most_the_queues_drain() -> None:
    policy = SloAwarePolicy(config(local_prefill_threshold_tokens=0, min_retry_after_s=0.01))
    cluster = [instance("p0", P, queued=2000, margin=3.0), instance("d0", D)]
    decision = policy.decide(request(ttft_slo_s=1.5), cluster)
    # 3 s predicted; 1.5 / 3 = 0.5 s would take 2.5 s, but after 2 s the queue is empty and the
    # idle instance (1 s of service) is admitted on its prediction.
    assert isinstance(decision, Reject) and decision.retry_after_s == pytest.approx(2.0)


def test_a_margin_never_makes_an_attainable_slo_unattainable() -> None:
    policy = SloAwarePolicy(config(local_prefill_threshold_tokens=0))
    cluster = [instance("p0", P, queued=10, margin=10.0), instance("d0", D)]
    decision = policy.decide(request(ttft_slo_s=1.005), cluster)
    assert isinstance(decision, Reject) and decision.reason is RejectReason.OVERLOADED


def test_local_options_carry_the_decode_instances_margin() -> None:
    policy = SloAwarePolicy(config(local_prefill_threshold_tokens=2000))
    # d0 prefills the 1000 tokens itself (a short prompt) while decoding 4 sequences: TTFT
    # 1 s + one 14 ms step.
    busy = [instance("d0", D, running=4, margin=2.0)]
    decision = policy.decide(request(ttft_slo_s=1.5), busy)
    assert isinstance(decision, Reject) and decision.reason is RejectReason.OVERLOADED
    decision = policy.decide(request(ttft_slo_s=1.5), [instance("d0", D, running=4, margin=1.4)])
    assert isinstance(decision, Assign) and decision.prefill is None
