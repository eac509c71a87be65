"""Progress-based health: the stall bound, the stall and timeout rules, recovery, and the
tripwire that cuts a dead instance's calls in flight. A fake clock and scripted Health answers;
no worker runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import pytest

from controlplane.instances.instance import Instance, call_while_up, stream_while_up
from controlplane.instances.registry import InstanceRegistry
from controlplane.instances.store import LocalRegistryStore
from controlplane.instances.types import InstanceState
from controlplane.metrics import GatewayMetrics
from controlplane.workers.client import WorkerError, WorkerErrorKind, WorkerHealth
from controlplane.workers.roles import WorkerRole
from tests.fakes import FakeClock

T = TypeVar("T")
PREFILL = WorkerRole.PREFILL


def run(test: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await test()

    return asyncio.run(main())


def health(*, requests: int = 0, stalled_s: float = 0.0, ready: bool = True) -> WorkerHealth:
    return WorkerHealth(
        ready, PREFILL, "m", 16, 4096, 8, num_engine_requests=requests, stalled_s=stalled_s
    )


class ScriptedHealth:
    """A WorkerClient double whose Health answers (or errors) are set by the test."""

    def __init__(self) -> None:
        self.answer: WorkerHealth | WorkerError = health()

    async def health(self, *, timeout_s: float) -> WorkerHealth:
        if isinstance(self.answer, WorkerError):
            raise self.answer
        return self.answer

    async def close(self) -> None:
        pass


class Registry(InstanceRegistry):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unhealthy: list[tuple[str, str]] = []

    def _on_unhealthy(self, instance: Instance, reason: str) -> None:
        self.unhealthy.append((instance.id, reason))


async def ready_instance(
    clock: FakeClock, **kwargs: Any
) -> tuple[Registry, Instance, ScriptedHealth]:
    registry = Registry(
        metrics=GatewayMetrics(),
        health_check_timeout_s=1.0,
        store=LocalRegistryStore(),
        clock=clock,
        **kwargs,
    )
    await registry.register_configured(PREFILL, ["127.0.0.1:10001"])
    instance = registry.get("w1")
    worker = ScriptedHealth()
    instance.client = worker  # type: ignore[assignment]
    await registry.check_all()
    assert instance.state is InstanceState.READY
    return registry, instance, worker


def timeout_error() -> WorkerError:
    return WorkerError(WorkerErrorKind.TIMEOUT, "127.0.0.1:10001", "Health", "DEADLINE_EXCEEDED")


def test_bound_is_the_floor_for_light_load_and_factor_times_the_longest_step_above() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, _ = await ready_instance(clock, stall_floor_s=15.0, stall_factor=4.0)
        assert registry.stall_bound_s(instance) == 15.0  # nothing in flight
        with registry.track_prefill(instance, 50):
            predicted = instance.predictor.queue_s(50, 1)
            assert 4 * predicted < 15.0
            assert registry.stall_bound_s(instance) == 15.0
        # Force a slow model: the prefill of a long prompt dominates the floor.
        big = 1_000_000
        with registry.track_prefill(instance, big), registry.track_prefill(instance, 10):
            step = instance.predictor.queue_s(big + 10, 2)
            assert step > 15.0 / 4
            assert instance.predicted_step_s() == step
            assert registry.stall_bound_s(instance) == pytest.approx(4 * step)
        with registry.track_decode(instance, 100_000, 10), registry.track_decode(instance, 10, 10):
            step = instance.predictor.decode_step_s(2, 100_010)
            assert instance.predicted_step_s() == step
        await registry.close()

    run(test)


def test_unknown_work_counts_as_a_prefill_of_the_longest_prompt() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, worker = await ready_instance(clock)
        worker.answer = health(requests=2, stalled_s=1.0)  # work of another gateway
        await registry.check_all()
        assert instance.predicted_step_s() == instance.predictor.prefill_s(4096, 0)
        await registry.close()

    run(test)


def test_stall_beyond_the_bound_marks_dead_with_a_clear_detail_and_recovers() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, worker = await ready_instance(clock, stall_floor_s=15.0)
        old_wire = instance.tripwire
        worker.answer = health(requests=2, stalled_s=14.9)
        await registry.check_all()
        assert instance.state is InstanceState.READY
        worker.answer = health(requests=2, stalled_s=23.14)
        await registry.check_all()
        detail = "stalled: engine made no step for 23.1 s with 2 requests (bound 15 s)"
        assert (instance.state, instance.detail) == (InstanceState.DEAD, detail)
        assert registry.unhealthy == [("w1", detail)]
        assert old_wire.tripped and old_wire.reason == detail
        [info] = registry.list_instances()
        assert info.detail == detail
        # Still stalled: stays dead, hook not called again.
        worker.answer = health(requests=1, stalled_s=40.0)
        await registry.check_all()
        assert instance.state is InstanceState.DEAD
        assert instance.detail.startswith("stalled: engine made no step for 40.0 s with 1 request ")
        assert len(registry.unhealthy) == 1
        # Serving again: ready, with a fresh tripwire.
        worker.answer = health(requests=1, stalled_s=0.2)
        await registry.check_all()
        assert instance.state is InstanceState.READY
        assert instance.tripwire is not old_wire and not instance.tripwire.tripped
        await registry.close()

    run(test)


def test_idle_engine_is_never_stalled() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, worker = await ready_instance(clock, stall_floor_s=1.0)
        worker.answer = health(requests=0, stalled_s=99.0)
        await registry.check_all()
        assert instance.state is InstanceState.READY
        await registry.close()

    run(test)


def test_timeouts_shorter_than_the_bound_abort_nothing_longer_ones_mark_dead() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, worker = await ready_instance(clock, stall_floor_s=15.0)
        worker.answer = timeout_error()
        for _ in range(7):  # 7 timeouts in a row, but only 14 s of silence
            clock.now += 2.0
            await registry.check_all()
            assert instance.state is InstanceState.READY
        assert not instance.tripwire.tripped
        worker.answer = health()
        clock.now += 0.5
        await registry.check_all()  # answered again: the silence clock restarts
        worker.answer = timeout_error()
        clock.now += 15.0
        await registry.check_all()
        assert instance.state is InstanceState.READY
        clock.now += 1.0
        await registry.check_all()
        assert instance.state is InstanceState.DEAD
        assert instance.detail == (
            "unresponsive: Health has not answered for 16.0 s (bound 15 s; timeout: "
            "DEADLINE_EXCEEDED)"
        )
        assert instance.tripwire.tripped
        worker.answer = health()
        await registry.check_all()
        assert instance.state is InstanceState.READY
        await registry.close()

    run(test)


def test_refused_is_decisive_at_once() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, worker = await ready_instance(clock)
        worker.answer = WorkerError(
            WorkerErrorKind.UNAVAILABLE, "127.0.0.1:10001", "Health", "connection refused"
        )
        await registry.check_all()
        assert (instance.state, instance.detail) == (
            InstanceState.DEAD,
            "unavailable: connection refused",
        )
        assert instance.tripwire.tripped
        await registry.close()

    run(test)


# -- the tripwire ------------------------------------------------------------------------------


def test_trip_cuts_a_call_in_flight_and_cancels_it() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, worker = await ready_instance(clock, stall_floor_s=15.0)
        cancelled = asyncio.Event()

        async def hanging_call() -> int:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return 0

        call = asyncio.ensure_future(call_while_up(instance, "Prefill", hanging_call()))
        await asyncio.sleep(0)
        worker.answer = health(requests=1, stalled_s=20.0)
        await registry.check_all()
        with pytest.raises(WorkerError) as info:
            await call
        assert info.value.kind is WorkerErrorKind.UNAVAILABLE
        assert info.value.detail.startswith("stalled: engine made no step for 20.0 s")
        assert cancelled.is_set()
        # A call started after the trip is cut before it runs.
        started = False

        async def later() -> int:
            nonlocal started
            started = True
            return 1

        with pytest.raises(WorkerError):
            await call_while_up(instance, "Prefill", later())
        assert not started
        # Back to ready: calls go through again.
        worker.answer = health()
        await registry.check_all()
        assert await call_while_up(instance, "Prefill", later()) == 1
        await registry.close()

    run(test)


def test_trip_cuts_a_stream_between_chunks_and_closes_it() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, worker = await ready_instance(clock)
        closed = asyncio.Event()
        resume = asyncio.Event()

        async def chunks() -> AsyncGenerator[int, None]:
            try:
                yield 1
                yield 2
                await resume.wait()
                yield 3
            finally:
                closed.set()

        got: list[int] = []

        async def consume() -> None:
            async for chunk in stream_while_up(instance, "Decode", chunks()):
                got.append(chunk)

        task = asyncio.ensure_future(consume())
        for _ in range(10):
            await asyncio.sleep(0)
        assert got == [1, 2]
        worker.answer = WorkerError(WorkerErrorKind.UNAVAILABLE, "x", "Health", "gone")
        await registry.check_all()
        with pytest.raises(WorkerError, match="unavailable: gone"):
            await task
        assert closed.is_set() and got == [1, 2]
        await registry.close()

    run(test)


def test_a_stream_runs_to_its_end_while_up() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, _ = await ready_instance(clock)

        async def chunks() -> AsyncGenerator[int, None]:
            for i in range(5):
                yield i

        assert [c async for c in stream_while_up(instance, "Decode", chunks())] == [0, 1, 2, 3, 4]
        await registry.close()

    run(test)


def test_cancelling_the_caller_cancels_the_call() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, _ = await ready_instance(clock)
        cancelled = asyncio.Event()

        async def hanging_call() -> int:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()
            return 0

        task = asyncio.ensure_future(call_while_up(instance, "Prefill", hanging_call()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cancelled.is_set()
        assert not instance.tripwire.tripped
        await registry.close()

    run(test)


def test_a_caller_cancelled_with_the_trip_stays_cancelled() -> None:
    """Both the client (its request went away) and the trip cancel the task: the client's
    cancellation wins, no WorkerError is made of it."""

    async def test() -> None:
        clock = FakeClock()
        registry, instance, _ = await ready_instance(clock)

        async def hanging_call() -> int:
            await asyncio.Event().wait()
            return 0

        task = asyncio.ensure_future(call_while_up(instance, "Prefill", hanging_call()))
        await asyncio.sleep(0)
        task.cancel()
        instance.tripwire.trip("stalled")
        with pytest.raises(asyncio.CancelledError):
            await task
        await registry.close()

    run(test)


def test_a_call_that_finishes_despite_the_trip_keeps_its_result() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, _ = await ready_instance(clock)

        async def stubborn_call() -> int:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return 7  # swallows the cancellation, as some clients do
            return 0

        task = asyncio.ensure_future(call_while_up(instance, "Prefill", stubborn_call()))
        await asyncio.sleep(0)
        instance.tripwire.trip("stalled")
        assert await task == 7
        assert task.cancelling() == 0
        await registry.close()

    run(test)


def test_a_worker_shutting_down_is_drained_never_dead_and_its_requests_are_not_cut() -> None:
    async def test() -> None:
        clock = FakeClock()
        registry, instance, worker = await ready_instance(clock)
        with registry.track_prefill(instance, 50):  # a request of this gateway runs on it
            wire = instance.tripwire
            worker.answer = replace(health(requests=1), draining=True)  # its SIGTERM
            await registry.check_all()
            assert (instance.state, instance.detail) == (
                InstanceState.DRAINING,
                "the worker is shutting down",
            )
            assert not instance.draining  # this gateway's evidence only, not the record's
            with pytest.raises(WorkerError, match="no prefill worker is ready"):
                registry.pick(PREFILL)
            # Gone once its requests ended: refused, and still draining, never dead.
            worker.answer = WorkerError(
                WorkerErrorKind.UNAVAILABLE, "127.0.0.1:10001", "Health", "connection refused"
            )
            await registry.check_all()
            assert instance.state is InstanceState.DRAINING
            assert not wire.tripped and registry.unhealthy == []
        # A new process at that endpoint serves again.
        worker.answer = health()
        await registry.check_all()
        assert instance.state is InstanceState.READY
        assert registry.pick(PREFILL) is instance
        await registry.close()

    run(test)
