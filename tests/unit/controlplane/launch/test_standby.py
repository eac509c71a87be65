"""StandbyLauncher: workers started ahead of need, handed out by launch(), replaced in the
background, with a back-off when they keep failing (fake launcher, fake clock)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from controlplane.launch.standby import StandbyLauncher
from controlplane.workers.roles import WorkerRole
from tests.fakes import FakeClock

P, D = WorkerRole.PREFILL, WorkerRole.DECODE


@dataclass(eq=False)
class FakeWorker:
    role: WorkerRole
    endpoint: str
    standby: bool
    ready: bool = False
    running: bool = True
    stopped: bool = False
    tail: tuple[str, ...] = ("a line",)

    def alive(self) -> bool:
        return self.running

    def printed_ready(self) -> bool:
        return self.ready

    async def stop(self, *, timeout_s: float) -> None:
        self.running = False
        self.stopped = True


@dataclass
class FakeStarter:
    launched: list[FakeWorker] = field(default_factory=list)
    rebalances: int = 0
    closed: bool = False
    fail: bool = False

    async def launch(self, role: WorkerRole, *, standby: bool = False) -> FakeWorker:
        if self.fail:
            raise OSError("no such file")
        worker = FakeWorker(role, f"127.0.0.1:{9000 + len(self.launched)}", standby)
        self.launched.append(worker)
        return worker

    def rebalance(self) -> None:
        self.rebalances += 1

    async def close(self) -> None:
        self.closed = True


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


def make(starter: FakeStarter, clock: FakeClock, per_role: int = 1) -> StandbyLauncher:
    return StandbyLauncher(
        starter, per_role=per_role, check_interval_s=3600.0, retry_s=5.0, clock=clock
    )


@run_async
async def test_launch_without_standbys_starts_a_worker() -> None:
    starter = FakeStarter()
    standby = make(starter, FakeClock(100.0))  # not started: no reserve yet
    worker = await standby.launch(D)
    assert [w.standby for w in starter.launched] == [False]
    assert worker is starter.launched[0]
    assert standby.num_taken == 0
    await standby.close()
    assert starter.closed


@run_async
async def test_reserve_is_filled_per_role_and_handed_out_ready_first() -> None:
    starter = FakeStarter()
    standby = make(starter, FakeClock(100.0), per_role=2)
    standby.start()
    await settle()
    assert [(w.role, w.standby) for w in starter.launched] == [
        (P, True),
        (P, True),
        (D, True),
        (D, True),
    ]
    first_d, second_d = standby.reserve(D)
    second_d.ready = True
    taken = await standby.launch(D)
    assert taken is second_d  # the ready one, though started later
    assert taken.standby is False
    assert starter.rebalances == 1
    assert standby.num_taken == 1
    await settle()  # the replacement starts at once (launch woke the monitor)
    assert standby.reserve(D) == (first_d, starter.launched[4])
    assert starter.launched[4].role is D and starter.launched[4].standby
    await standby.close()
    assert [w.stopped for w in starter.launched] == [True, True, True, False, True]
    assert starter.closed


@run_async
async def test_a_starting_standby_is_taken_when_none_is_ready() -> None:
    starter = FakeStarter()
    standby = make(starter, FakeClock(100.0))
    standby.start()
    await settle()
    (starting,) = standby.reserve(P)
    assert await standby.launch(P) is starting
    await standby.close()


@run_async
async def test_dead_standby_is_replaced_after_a_back_off_that_doubles() -> None:
    starter, clock = FakeStarter(), FakeClock(100.0)
    standby = make(starter, clock)
    standby.start()
    await settle()
    (worker,) = standby.reserve(D)
    worker.running = False
    await standby._refill(D)
    assert worker.stopped  # reaped
    assert standby.reserve(D) == ()  # back-off: 5 s
    clock.now += 4.9
    await standby._refill(D)
    assert standby.reserve(D) == ()
    clock.now += 0.2
    await standby._refill(D)
    (second,) = standby.reserve(D)
    second.running = False
    await standby._refill(D)
    clock.now += 9.9  # second failure in a row: 10 s
    await standby._refill(D)
    assert standby.reserve(D) == ()
    clock.now += 0.2
    await standby._refill(D)
    (third,) = standby.reserve(D)
    third.ready = True
    await standby._refill(D)  # a ready standby resets the failure count
    third.running = False
    await standby._refill(D)
    clock.now += 5.1
    await standby._refill(D)
    assert len(standby.reserve(D)) == 1
    await standby.close()


@run_async
async def test_a_dead_standby_is_never_handed_out() -> None:
    starter = FakeStarter()
    standby = make(starter, FakeClock(100.0))
    standby.start()
    await settle()
    (worker,) = standby.reserve(P)
    worker.running = False
    fresh = await standby.launch(P)
    assert fresh is not worker and fresh.standby is False
    await standby.close()


@run_async
async def test_launch_failures_do_not_stop_the_monitor() -> None:
    starter, clock = FakeStarter(fail=True), FakeClock(100.0)
    standby = make(starter, clock)
    standby.start()
    await settle()
    assert standby.reserve(P) == () and standby.reserve(D) == ()
    starter.fail = False
    clock.now += 5.1
    standby._wake.set()
    await settle()
    assert len(standby.reserve(P)) == 1 and len(standby.reserve(D)) == 1
    await standby.close()


def test_per_role_must_be_positive() -> None:
    with pytest.raises(ValueError, match="per_role"):
        StandbyLauncher(FakeStarter(), per_role=0)
