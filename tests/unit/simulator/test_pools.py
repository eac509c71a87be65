"""Pools that a planner resizes during a run: started, drained, stopped; their GPU-seconds;
and arrivals warped to a rate that varies over time (issue 13, acceptance 3)."""

from __future__ import annotations

import pytest

from controlplane.instances.types import InstanceState
from simulator.config import PlanningSettings, Setup, Shape
from simulator.loop import Simulation
from simulator.trace import Trace, TraceRequest, check_rate_profile
from tests.unit.simulator.test_simulation import PROFILE, config, request

PLANNED = Setup(
    "planned", "slo_aware", Shape.DISAGGREGATED, prefill_gpus=1, decode_gpus=1, planner="strata",
    local_prefill_threshold_tokens=0,  # every prompt goes to the prefill pool the planner sizes
)  # fmt: skip
FIXED = Setup("fixed", "slo_aware", Shape.DISAGGREGATED, prefill_gpus=2)


def burst_then_quiet() -> list[TraceRequest]:
    """0.5 s of 100 requests a second (each ~60 ms of prefill), then one request a second."""
    busy = [request(i, 0.01 * i, 50, 20, range(0)) for i in range(50)]
    quiet = [request(50 + i, 1.0 + i, 50, 20, range(0)) for i in range(8)]
    return busy + quiet


def test_fixed_pools_hold_every_gpu_for_the_whole_run() -> None:
    cfg = config(FIXED, gpus=4, ttft_slo_s=30.0, tpot_slo_s=1.0)
    sim = Simulation(cfg, FIXED, burst_then_quiet())
    sim.run()
    assert sim.pools.gpu_seconds == pytest.approx(4 * sim.now)
    assert sim.pools.planner is None
    assert sim.pools.timeline == [(0.0, 2, 2)]


def test_a_planner_grows_the_pools_for_a_burst_and_drains_them_after() -> None:
    cfg = config(
        PLANNED, gpus=4, ttft_slo_s=30.0, tpot_slo_s=1.0,
        planning=PlanningSettings(interval_s=0.25, engine_start_s=0.1, scale_down_after=2),
    )  # fmt: skip
    sim = Simulation(cfg, PLANNED, burst_then_quiet())
    records = sim.run()
    # The burst is more than even four instances take at once: admission refuses some.
    assert all(r.finished or r.rejected == "overloaded" for r in records)
    assert all(r.finished for r in records if r.arrival_s >= 3.0)  # the quiet part, once the
    # burst's backlog is served
    sizes = [(p, d) for _, p, d in sim.pools.timeline]
    assert sizes[0] == (1, 1)
    assert max(p + d for p, d in sizes) == 4  # the whole budget during the burst
    assert sizes[-1] == (1, 1)  # back to the minimum once quiet
    # Instances that served the burst from a start: some requests went to them.
    started = {i.id for i in sim.gateway.instances} - {"p0", "d0"}
    assert {r.prefill for r in records} & started or {r.decode for r in records} & started
    # Stopped instances left nothing: no work, no pending request, no block in the index.
    stopped = [i for i in sim.gateway.instances if i.state is InstanceState.DEAD]
    assert stopped
    for instance in stopped:
        assert instance.pending == 0 and not instance.engine.has_work
        assert instance.engine.used_tokens == 0
    # Fewer GPU-seconds than holding all four GPUs, more than holding the two it started with.
    assert 2 * sim.now < sim.pools.gpu_seconds < 4 * sim.now


def test_arrivals_follow_a_rate_that_varies_over_time() -> None:
    # One request a second natively; at rate 2 with a multiplier going 1 -> 3 over 10 s the
    # cumulative arrivals are 2(t + 0.1 t²): request i arrives when that reaches i.
    requests = tuple(TraceRequest(i, float(i), 10, 1, ()) for i in range(60))
    trace = Trace(requests, "uniform")
    warped = trace.at_rate(2.0, [(0.0, 1.0), (10.0, 3.0)])
    assert len(warped) == 41  # 2(10 + 10) = 40 by the end: requests 0..40
    for r in warped:
        t = r.arrival_s
        assert 2 * (t + 0.1 * t * t) == pytest.approx(r.index, abs=1e-9)
    flat = trace.at_rate(2.0, [(0.0, 1.0), (10.0, 1.0)])
    assert [r.arrival_s for r in flat] == pytest.approx(
        [r.arrival_s for r in trace.at_rate(2.0)][:21], abs=0.01
    )


def test_a_profile_longer_than_the_trace_is_refused() -> None:
    trace = Trace(tuple(TraceRequest(i, float(i), 10, 1, ()) for i in range(10)), "short")
    with pytest.raises(ValueError, match="needs 40"):
        trace.at_rate(2.0, [(0.0, 1.0), (10.0, 3.0)])


@pytest.mark.parametrize(
    "profile",
    [[], [(0.0, 1.0)], [(1.0, 1.0), (2.0, 1.0)], [(0.0, 1.0), (0.0, 2.0)], [(0.0, 1.0), (5, 0)]],
)
def test_bad_rate_profiles_are_refused(profile: list[tuple[float, float]]) -> None:
    with pytest.raises(ValueError, match="rate_profile"):
        check_rate_profile(profile)


def test_planner_setups_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown planner"):
        Setup("x", "slo_aware", Shape.DISAGGREGATED, prefill_gpus=1, planner="magic")
    with pytest.raises(ValueError, match="sizes disaggregated pools"):
        Setup("x", "slo_aware", Shape.COLOCATED, planner="strata")
    with pytest.raises(ValueError, match=r"prefill_gpus \+ decode_gpus > gpus"):
        config(Setup("x", "slo_aware", Shape.DISAGGREGATED, prefill_gpus=1, decode_gpus=2), gpus=2)
    assert PROFILE.max_num_seqs == 8
