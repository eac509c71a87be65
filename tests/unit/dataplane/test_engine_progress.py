"""EngineProgress (what Health reports of the engine's progress) and the worker's accounting of
engine work: a request is work while the engine has it, an unfinished one until its abort is
confirmed by the engine core."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

import pytest

from dataplane.counters import EngineProgress, WorkerCounters
from dataplane.worker import Worker, _stat_logger_factory
from tests.fakes import FakeClock


def test_idle_engine_is_not_stalled() -> None:
    clock = FakeClock(100.0)
    progress = EngineProgress(clock)
    clock.now += 50
    assert progress.stalled_s() == 0.0
    assert progress.num_items == 0


def test_stall_clock_starts_when_work_arrives_not_at_the_last_step() -> None:
    clock = FakeClock(100.0)
    progress = EngineProgress(clock)
    progress.step()  # the last step before idling, at 100
    clock.now = 130.0
    progress.begin()  # work arrives at 130
    clock.now = 132.5
    assert progress.stalled_s() == pytest.approx(2.5)
    progress.begin()  # more work: the clock goes on from the arrival of the first
    clock.now = 134.0
    assert progress.stalled_s() == pytest.approx(4.0)
    progress.step()
    clock.now = 135.0
    assert progress.stalled_s() == pytest.approx(1.0)
    assert progress.num_steps == 2
    progress.end()
    progress.end()
    clock.now = 200.0
    assert progress.stalled_s() == 0.0


def test_end_without_begin_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        EngineProgress().end()


def test_stat_logger_counts_one_step_per_record_with_scheduler_stats() -> None:
    progress = EngineProgress(FakeClock(100.0))
    counters = WorkerCounters()
    config = SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=400))
    logger = _stat_logger_factory(counters, progress)(config)
    assert counters.kv_cache_blocks == 400
    stats = SimpleNamespace(kv_connector_stats=None, kv_cache_usage=0.1)
    logger.record(scheduler_stats=stats, iteration_stats=None)
    assert counters.kv_blocks_in_use == 40
    logger.record(scheduler_stats=None, iteration_stats=None)
    assert progress.num_steps == 1
    assert counters.kv_blocks_in_use == 40  # no step, no news


class FakeEngine:
    """AsyncLLM's generate and a utility round trip that a test can hold (a stopped core)."""

    def __init__(self) -> None:
        self.core_running = asyncio.Event()
        self.core_running.set()
        self.outputs: list[Any] = []

    async def generate(self, prompt: Any, sampling: Any, request_id: str) -> AsyncGenerator[Any]:
        for out in self.outputs:
            yield out
        await asyncio.Event().wait()  # then the engine stops producing

    async def is_sleeping(self) -> bool:
        await self.core_running.wait()
        return False


def make_worker(engine: FakeEngine) -> Worker:
    worker = Worker.__new__(Worker)
    worker.progress = EngineProgress(FakeClock(100.0))
    worker._abort_probes = set()
    worker.engine = engine
    return worker


def test_finished_request_ends_its_work_at_once() -> None:
    asyncio.run(_finished_request_ends_its_work_at_once())


async def _finished_request_ends_its_work_at_once() -> None:
    engine = FakeEngine()
    engine.outputs = [SimpleNamespace(finished=False), SimpleNamespace(finished=True)]
    worker = make_worker(engine)
    outs = worker.generate({}, None, "r1")
    assert (await anext(outs)).finished is False
    assert worker.progress.num_items == 1
    assert (await anext(outs)).finished is True
    await outs.aclose()
    assert worker.progress.num_items == 0


def test_cancelled_request_stays_work_until_the_core_confirms_its_abort() -> None:
    asyncio.run(_cancelled_request_stays_work_until_the_core_confirms_its_abort())


async def _cancelled_request_stays_work_until_the_core_confirms_its_abort() -> None:
    engine = FakeEngine()
    engine.outputs = [SimpleNamespace(finished=False)]
    engine.core_running.clear()  # the engine core is stopped
    worker = make_worker(engine)
    outs = worker.generate({}, None, "r1")
    await anext(outs)
    await outs.aclose()  # the gateway cancelled the call
    await asyncio.sleep(0)
    assert worker.progress.num_items == 1  # the core has not processed the abort
    engine.core_running.set()  # SIGCONT
    await asyncio.gather(*worker._abort_probes)
    assert worker.progress.num_items == 0


def test_kv_blocks_in_use_follow_the_engines_usage() -> None:
    counters = WorkerCounters()
    counters.engine_step(0.5)
    assert counters.kv_blocks_in_use == 0  # the size is not known yet
    counters.kv_cache_blocks = 640
    counters.engine_step(0.25)
    assert counters.kv_blocks_in_use == 160
    counters.engine_step(1.5)  # clamped
    assert counters.kv_blocks_in_use == 640
    counters.engine_step(0.0)  # the last request ended: back to none
    assert counters.kv_blocks_in_use == 0
