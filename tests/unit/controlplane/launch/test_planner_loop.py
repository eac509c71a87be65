"""The gateway's planner loop over a stand-in registry: one tick plans from the interval's load
and the ready workers' latency models, and resizes only the pools whose size changes."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest

from controlplane.instances.types import InstanceConflict
from controlplane.launch.planner import DEFAULT_MAX_NUM_SEQS, PlannerLoop, PlannerSettings
from controlplane.planning import LoadMeter, LoadSample, PoolSizes, PoolView
from controlplane.workers.roles import WorkerRole
from tests.fakes import FakeClock
from tests.unit.controlplane.planning.test_planner import MODEL


@dataclass
class StandInRegistry:
    view: PoolView
    load_meter: LoadMeter = field(default_factory=LoadMeter)
    scaled: list[tuple[WorkerRole, int]] = field(default_factory=list)
    refuse: bool = False

    def planning_view(self) -> PoolView:
        return self.view

    def take_load_sample(self, duration_s: float, decode_batch: float | None) -> LoadSample:
        return self.load_meter.take(duration_s, decode_batch)

    async def scale(self, role: WorkerRole, replicas: int) -> None:
        self.scaled.append((role, replicas))
        if self.refuse:
            raise InstanceConflict("this gateway has no launcher")


SETTINGS = PlannerSettings(
    kind="strata", interval_s=60.0, engine_start_s=0.0, scale_down_after=1, max_workers=16
)


def view(prefill: int = 1, decode: int = 1, ready: bool = True) -> PoolView:
    return PoolView(
        sizes=PoolSizes(prefill, decode),
        prefill_model=MODEL if ready else None,
        decode_model=MODEL if ready else None,
        decode_batch=2.0,
        max_num_seqs=64,
        kv_capacity_tokens=200_000,
    )


def loop(registry: StandInRegistry, clock: FakeClock) -> PlannerLoop:
    return PlannerLoop(
        registry,  # type: ignore[arg-type]
        SETTINGS,
        ttft_slo_s=2.0,
        tpot_slo_s=0.05,
        clock=clock,
    )


def arrive(meter: LoadMeter, n: int) -> None:
    """``n`` requests of 2,000 prompt tokens (1,000 cached) that finish with 200 tokens."""
    for _ in range(n):
        meter.arrived(2000, 1000)
        meter.finished(200, 0.04)


def test_a_tick_sizes_both_pools_from_the_interval_and_scales_those_that_change() -> None:
    clock = FakeClock()
    registry = StandInRegistry(view())
    planner = loop(registry, clock)
    arrive(registry.load_meter, 600)  # 10 requests/s over the 60 s interval
    clock.now += 60.0
    target = asyncio.run(planner.tick())
    # docs/design/planner.md §4's worked example: 2 prefill, 8 decode workers.
    assert target == PoolSizes(2, 8)
    assert registry.scaled == [(WorkerRole.PREFILL, 2), (WorkerRole.DECODE, 8)]
    # The meter started a new interval.
    assert registry.load_meter.take(1.0).requests == 0


def test_nothing_is_scaled_when_the_pools_are_right_or_no_worker_is_ready() -> None:
    clock = FakeClock()
    registry = StandInRegistry(view(2, 8))
    planner = loop(registry, clock)
    arrive(registry.load_meter, 600)
    clock.now += 60.0
    assert asyncio.run(planner.tick()) == PoolSizes(2, 8)
    assert registry.scaled == []
    registry.view = view(ready=False)
    clock.now += 60.0
    assert asyncio.run(planner.tick()) is None
    assert registry.scaled == []


def test_a_refused_resize_is_logged_and_the_other_pool_still_resized(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    registry = StandInRegistry(view(), refuse=True)
    planner = loop(registry, clock)
    arrive(registry.load_meter, 600)
    clock.now += 60.0
    with caplog.at_level(logging.WARNING, logger="controlplane.launch.planner"):
        assert asyncio.run(planner.tick()) == PoolSizes(2, 8)
    assert registry.scaled == [(WorkerRole.PREFILL, 2), (WorkerRole.DECODE, 8)]  # both tried
    assert caplog.text.count("no launcher") == 2


def test_the_shrinking_pool_is_resized_first() -> None:
    clock = FakeClock()
    registry = StandInRegistry(view(prefill=6, decode=2))
    planner = loop(registry, clock)
    arrive(registry.load_meter, 600)
    clock.now += 60.0
    assert asyncio.run(planner.tick()) == PoolSizes(2, 8)  # scale_down_after is 1
    assert registry.scaled == [(WorkerRole.PREFILL, 2), (WorkerRole.DECODE, 8)]
    registry.view, registry.scaled = view(prefill=1, decode=12), []
    arrive(registry.load_meter, 600)
    clock.now += 60.0
    asyncio.run(planner.tick())
    assert registry.scaled == [(WorkerRole.DECODE, 8), (WorkerRole.PREFILL, 2)]


def test_a_decode_workers_model_stands_in_when_no_prefill_worker_is_ready() -> None:
    clock = FakeClock()
    registry = StandInRegistry(
        PoolView(PoolSizes(0, 1), MODEL, MODEL, 1.0, max_num_seqs=64, kv_capacity_tokens=200_000)
    )
    planner = loop(registry, clock)
    arrive(registry.load_meter, 600)
    clock.now += 60.0
    assert asyncio.run(planner.tick()) == PoolSizes(2, 8)  # the prefill pool comes back
    registry.view = view(ready=False)
    clock.now += 60.0
    assert asyncio.run(planner.tick()) is None


def test_unknown_limits_fall_back_to_vllms_defaults() -> None:
    clock = FakeClock()
    registry = StandInRegistry(
        PoolView(PoolSizes(1, 1), MODEL, MODEL, None, max_num_seqs=0, kv_capacity_tokens=0)
    )
    planner = loop(registry, clock)
    arrive(registry.load_meter, 600)
    clock.now += 60.0
    assert asyncio.run(planner.tick()) == PoolSizes(2, 8)  # the TPOT bound, not KV, sets b* = 12
    assert planner.planner.config.max_num_seqs == DEFAULT_MAX_NUM_SEQS


def test_the_planner_must_be_on() -> None:
    with pytest.raises(ValueError, match="off"):
        PlannerLoop(
            StandInRegistry(view()),  # type: ignore[arg-type]
            PlannerSettings(),
            ttft_slo_s=1.0,
            tpot_slo_s=0.1,
        )
    with pytest.raises(ValueError, match="planner must be one of"):
        PlannerSettings(kind="magic")
