"""What the registry feeds the latency model: solo prefills only, the TTFT overhead beyond the
engine time, the hand-off of a decode that takes over a prefilled request, and the overhead
added to the policy's TTFT (docs/design/scheduling.md §2.2-2.3). Deterministic: a scripted
clock, no worker contacted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from controlplane.instances.instance import Instance
from controlplane.instances.registry import InstanceRegistry
from controlplane.instances.store import LocalRegistryStore
from controlplane.instances.types import InstanceState
from controlplane.metrics import GatewayMetrics
from controlplane.scheduling import Assign, Reject, RequestSnapshot, Route
from controlplane.scheduling.predictor.feedback import OVERHEAD_MIN_OBSERVATIONS
from controlplane.workers.roles import WorkerRole


class ScriptedClock:
    """Returns the given times in order (one per call), then the last one again."""

    def __init__(self) -> None:
        self.times: Iterator[float] = iter(())
        self.last = 0.0

    def script(self, *times: float) -> None:
        self.times = iter(times)

    def __call__(self) -> float:
        self.last = next(self.times, self.last)
        return self.last


def with_registry(test: Callable[[InstanceRegistry, ScriptedClock], None]) -> None:
    """Runs ``test`` on the event loop with a registry of one prefill (w1) and one decode (w2)
    instance driven by a scripted clock, then closes the registry."""

    async def main() -> None:
        clock = ScriptedClock()
        registry = InstanceRegistry(
            metrics=GatewayMetrics(),
            health_check_timeout_s=1.0,
            store=LocalRegistryStore(),
            clock=clock,
        )
        await registry.register_configured(WorkerRole.PREFILL, ["127.0.0.1:10001"])
        await registry.register_configured(WorkerRole.DECODE, ["127.0.0.1:10002"])
        try:
            test(registry, clock)
        finally:
            await registry.close()

    asyncio.run(main())


def assign_on(prefill: Instance | None, decode: Instance) -> Assign:
    return Assign(
        prefill.id if prefill is not None else None,
        decode.id,
        0.01,
        0.005,
        0,
        Route.DISAGGREGATED if prefill is not None else Route.LOCAL_SHORT,
        "slo_aware",
    )


def test_only_prefills_that_had_the_instance_to_themselves_refit_the_model() -> None:
    def test(registry: InstanceRegistry, clock: ScriptedClock) -> None:
        prefill = registry.get("w1")
        with registry.track_prefill(prefill, 100):
            pass
        registry.observe_prefill(prefill, 100, 0, 0.050)
        assert prefill.predictor.num_prefill_observations == 1
        # Two overlapping prefills: the first started alone but the second started during it; the
        # second started while the first was in flight. Neither is a clean sample.
        with registry.track_prefill(prefill, 200):
            with registry.track_prefill(prefill, 300):
                pass
            registry.observe_prefill(prefill, 300, 0, 0.120)
        registry.observe_prefill(prefill, 200, 0, 0.110)
        assert prefill.predictor.num_prefill_observations == 1
        # Alone again.
        with registry.track_prefill(prefill, 400):
            pass
        registry.observe_prefill(prefill, 400, 0, 0.150)
        assert prefill.predictor.num_prefill_observations == 2

    with_registry(test)


def test_ttft_beyond_the_engine_time_is_the_overhead_sample() -> None:
    def test(registry: InstanceRegistry, clock: ScriptedClock) -> None:
        prefill, decode = registry.get("w1"), registry.get("w2")
        assign = assign_on(prefill, decode)
        for i in range(OVERHEAD_MIN_OBSERVATIONS - 1):
            with registry.track_prefill(prefill, 100):
                pass
            registry.observe_prefill(prefill, 100, 0, 0.050)
            registry.observe_ttft(assign, prefill, 0.056 + 0.001 * i)  # 6 .. 12 ms beyond
        assert prefill.predictor.ttft_overhead_s == 0.0  # 7 observations: not an estimate yet
        # A local route's TTFT has no engine time to subtract: no sample.
        registry.observe_ttft(assign_on(None, decode), decode, 0.5)
        assert decode.predictor.ttft_overhead_s == 0.0
        with registry.track_prefill(prefill, 100):
            pass
        registry.observe_prefill(prefill, 100, 0, 0.050)
        registry.observe_ttft(assign, prefill, 0.063)  # 13 ms beyond
        # Median of 6, 7, ..., 13 ms.
        assert prefill.predictor.ttft_overhead_s == pytest.approx(0.0095, rel=1e-9)
        # The registry's cluster-wide MAPE still scores every TTFT.
        assert registry.accuracy.num_ttft == OVERHEAD_MIN_OBSERVATIONS + 1

    with_registry(test)


def test_a_hand_off_is_timed_as_its_first_chunk_wait_beyond_the_steps() -> None:
    def test(registry: InstanceRegistry, clock: ScriptedClock) -> None:
        decode = registry.get("w2")
        for _ in range(OVERHEAD_MIN_OBSERVATIONS):
            # Started at 0; first chunk (1 token) at 30 ms; then 3 tokens in 30 ms: 10 ms steps.
            clock.script(0.0, 0.030, 0.040, 0.060)
            with registry.track_decode(decode, 300, 10) as tracker:
                tracker.add_tokens(1)
                tracker.add_tokens(1)
                tracker.add_tokens(2)
            assert tracker.handoff_extra_s() == pytest.approx(0.020, rel=1e-9)
        assert decode.predictor.handoff_s == pytest.approx(0.020, rel=1e-9)
        # A first chunk of 3 tokens carries two steps besides the hand-off: 50 - 3·10 = 20 ms.
        clock.script(0.0, 0.050, 0.060, 0.070)
        with registry.track_decode(decode, 300, 10) as tracker:
            tracker.add_tokens(3)
            tracker.add_tokens(1)
            tracker.add_tokens(1)
        assert tracker.handoff_extra_s() == pytest.approx(0.020, rel=1e-9)

    with_registry(test)


def test_local_prefills_and_short_streams_are_not_hand_offs() -> None:
    def test(registry: InstanceRegistry, clock: ScriptedClock) -> None:
        decode = registry.get("w2")
        clock.script(0.0, 0.030, 0.040, 0.060)
        with registry.track_decode(decode, 300, 10, num_prefill_tokens=300) as tracker:
            tracker.add_tokens(1)
            tracker.add_tokens(1)
            tracker.add_tokens(1)
        assert tracker.handoff_extra_s() is None  # it prefilled itself: that is its TTFT
        clock.script(0.0, 0.030, 0.040)
        with registry.track_decode(decode, 300, 2) as tracker:
            tracker.add_tokens(1)
            tracker.add_tokens(1)
        assert tracker.handoff_extra_s() is None  # one later step is too few to time a step

    with_registry(test)


def test_decide_adds_the_prefill_instances_overhead_to_the_policys_ttft() -> None:
    def test(registry: InstanceRegistry, clock: ScriptedClock) -> None:
        prefill, decode = registry.get("w1"), registry.get("w2")
        for instance in (prefill, decode):
            instance.state = InstanceState.READY
        request = RequestSnapshot(num_prompt_tokens=600, max_tokens=10, block_size=16)
        before = registry.decide(request)
        assert isinstance(before, Assign) and before.prefill == prefill.id
        for _ in range(OVERHEAD_MIN_OBSERVATIONS):
            prefill.predictor.observe_ttft_overhead(0.004)
        after = registry.decide(request)
        assert isinstance(after, Assign)
        assert after.predicted_ttft_s == pytest.approx(before.predicted_ttft_s + 0.004, rel=1e-12)
        assert after.predicted_tpot_s == before.predicted_tpot_s

    with_registry(test)


def test_the_margin_learns_from_the_instance_that_was_chosen() -> None:
    def test(registry: InstanceRegistry, clock: ScriptedClock) -> None:
        prefill, decode = registry.get("w1"), registry.get("w2")
        for instance in (prefill, decode):
            instance.state = InstanceState.READY
        assign = assign_on(prefill, decode)  # predicted TTFT 10 ms
        clock.script(*[float(i) for i in range(8)])
        for _ in range(8):
            registry.observe_ttft(assign, prefill, 0.03)
        # A failover's first token came from another instance than the one predicted for.
        clock.script(8.0)
        registry.observe_ttft(assign, decode, 0.5)
        assert prefill.predictor.ttft_margin(0.9, now=8.0) == pytest.approx(3.0)
        assert decode.predictor.ttft_margin(0.9, now=8.0) == 1.0
        # decide() hands the margin to the policy: with work queued on w1, a TTFT SLO of 1.5x
        # the prediction is met by the prediction, not by 3x it, until the ratios expire.
        request = RequestSnapshot(num_prompt_tokens=600, max_tokens=10, block_size=16)
        with registry.track_prefill(prefill, 100):
            clock.script(9.0, 9.0)
            first = registry.decide(request)
            assert isinstance(first, Assign) and first.prefill == prefill.id
            slo = replace(request, ttft_slo_s=1.5 * first.predicted_ttft_s)
            assert isinstance(registry.decide(slo), Reject)
            clock.script(100.0)
            assert isinstance(registry.decide(slo), Assign)

    with_registry(test)
