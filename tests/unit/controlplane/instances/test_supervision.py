"""Supervision of launched workers (controlplane/instances/supervision.py), in-process.

Test doubles: `FakeLauncher` hands out `FakeWorker` handles whose process "exits" when a test
says so; the clock and the back-off's sleep are injected (the sleep records each wait and returns
at once), so every back-off and cap is checked exactly and no test waits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from controlplane.instances.registry import InstanceRegistry
from controlplane.instances.store import LocalRegistryStore, RegistryStoreError
from controlplane.instances.supervision import EXITED, RestartPolicy
from controlplane.instances.types import InstanceState
from controlplane.metrics import GatewayMetrics
from controlplane.workers.client import WorkerHealth
from controlplane.workers.roles import WorkerRole
from tests.fakes import FakeClock

T = TypeVar("T")
PREFILL, DECODE = WorkerRole.PREFILL, WorkerRole.DECODE
POLICY = RestartPolicy(
    grace_s=10.0, backoff_s=1.0, backoff_max_s=8.0, reset_after_s=60.0, limit=4, window_s=600
)


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(test())  # type: ignore[arg-type]


class FakeWorker:
    """A LaunchedWorker whose process runs until `exit()` or `stop()`."""

    def __init__(self, role: WorkerRole, endpoint: str) -> None:
        self._role = role
        self._endpoint = endpoint
        self.running = True
        self.stops: list[float] = []
        """The timeout_s of each stop() call."""

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def role(self) -> WorkerRole:
        return self._role

    def alive(self) -> bool:
        return self.running

    def exit(self) -> None:
        self.running = False

    async def stop(self, *, timeout_s: float) -> None:
        self.stops.append(timeout_s)
        self.running = False


class FakeLauncher:
    """Hands out endpoints 127.0.0.1:20001, 20002, ...; `fail` makes the next launches raise."""

    def __init__(self) -> None:
        self.workers: list[FakeWorker] = []
        self.fail = 0

    async def launch(self, role: WorkerRole) -> FakeWorker:
        if self.fail:
            self.fail -= 1
            raise OSError("no more processes")
        worker = FakeWorker(role, f"127.0.0.1:{20001 + len(self.workers)}")
        self.workers.append(worker)
        return worker

    async def close(self) -> None:
        for worker in self.workers:
            worker.running = False


class Harness:
    """One registry with a fake launcher, clock and back-off sleep, supervising."""

    def __init__(self, *, restart: RestartPolicy | None = POLICY, **kwargs: Any) -> None:
        self.launcher = FakeLauncher()
        self.clock = FakeClock()
        self.waits: list[float] = []
        self.store: LocalRegistryStore = kwargs.pop("store", None) or LocalRegistryStore()
        self.metrics = GatewayMetrics()
        self.gate: asyncio.Event | None = None
        """When set by a test, each back-off waits for it (the replacement is pending)."""
        self.registry = InstanceRegistry(
            metrics=self.metrics,
            health_check_timeout_s=1.0,
            store=self.store,
            launcher=self.launcher,
            clock=self.clock,
            restart=restart,
            sleep=self._sleep,
            **kwargs,
        )
        self._supervisor: asyncio.Task[None] | None = None

    async def _sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.gate is not None:
            await self.gate.wait()

    async def start(self, *, decode: int = 2) -> None:
        await self.registry.scale(DECODE, decode)
        self._supervisor = asyncio.create_task(self.registry.run_supervision(interval_s=3600))
        await self.settle()

    async def settle(self) -> None:
        """Let the registry's tasks run: every replacement not held by ``gate`` is done on
        return (its launch makes one real Health call, refused, to the fake endpoint)."""
        await settle()
        if self.gate is None:
            pending = list(self.registry._pending.values())
            if pending:
                await asyncio.wait(pending, timeout=30.0)

    def ready(self, instance_id: str) -> None:
        instance = self.registry.get(instance_id)
        self.registry._apply_health(instance, WorkerHealth(True, instance.role, "m", 16, 256, 4))

    def states(self) -> list[tuple[str, str, InstanceState, str]]:
        return [
            (i.id, i.endpoint, i.state, i.detail)
            for i in sorted(self.registry.list_instances(), key=lambda i: int(i.id[1:]))
        ]

    def counter(self, name: str, role: str = "decode") -> float | None:
        return self.metrics.registry.get_sample_value(
            f"strata_gateway_{name}_total", {"role": role}
        )

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await self.registry.close()


async def settle() -> None:
    """Let the registry's tasks (stop, delete, back-off) run to their next real wait."""
    for _ in range(50):
        await asyncio.sleep(0)


def test_an_exited_worker_is_killed_forgotten_and_replaced() -> None:
    async def test() -> None:
        h = Harness()
        await h.start()
        h.ready("w1")
        h.ready("w2")
        first = h.launcher.workers[0]
        first.exit()
        h.registry.check_launched()  # the process is gone: dead at once, no Health call needed
        await h.settle()
        assert first.stops == [0.0]  # SIGKILL at once: no grace for a worker that is not serving
        assert h.waits == [1.0]
        assert [state[:3] for state in h.states()] == [
            ("w2", "127.0.0.1:20002", InstanceState.READY),
            ("w3", "127.0.0.1:20003", InstanceState.STARTING),  # a fresh worker, not ready yet
        ]
        assert set(await h.store.load()) == {"w2", "w3"}
        assert (await h.store.load())["w3"].launched
        assert h.counter("worker_restarts") == 1.0
        assert h.registry.stats().extra["workers_restarted"] == 1.0
        await h.close()

    run(test)


@pytest.mark.parametrize(
    "make_dead",
    [
        lambda h, i: h.registry._set_state(i, InstanceState.DEAD, "stalled: no step in 12 s"),
        lambda h, i: h.registry._apply_health(i, WorkerHealth(False, DECODE, "m", 16, 256, 4)),
    ],
    ids=["stalled", "not-ready"],
)
def test_a_live_but_unhealthy_worker_is_killed_and_replaced_after_the_grace(
    make_dead: Any,
) -> None:
    async def test() -> None:
        h = Harness()  # grace 10 s
        await h.start()
        h.ready("w1")
        make_dead(h, h.registry.get("w1"))
        await h.settle()
        h.clock.now += 9.9
        h.registry.check_launched()
        await h.settle()
        assert h.launcher.workers[0].stops == []  # still in its grace period
        h.clock.now += 0.1
        h.registry.check_launched()
        await h.settle()
        assert h.launcher.workers[0].stops == [0.0]  # SIGKILL: also ends a stopped tree
        assert [(i, s) for i, _, s, _ in h.states()] == [
            ("w2", InstanceState.STARTING),
            ("w3", InstanceState.STARTING),
        ]
        assert h.launcher.workers[2].role is DECODE
        await h.close()

    run(test)


def test_a_worker_that_serves_again_within_the_grace_is_kept() -> None:
    async def test() -> None:
        h = Harness()
        await h.start()
        h.ready("w1")
        h.registry._set_state(h.registry.get("w1"), InstanceState.DEAD, "timeout: Health")
        h.clock.now += 5.0
        h.ready("w1")  # answers again
        h.clock.now += 60.0
        h.registry.check_launched()
        await h.settle()
        assert h.launcher.workers[0].stops == [] and h.waits == []
        # Dead again later: a new grace period, counted from then.
        h.registry._set_state(h.registry.get("w1"), InstanceState.DEAD, "timeout: Health")
        h.clock.now += 9.0
        h.registry.check_launched()
        await h.settle()
        assert h.waits == []
        h.launcher.workers[0].exit()  # exits meanwhile: replaced at once
        h.registry.check_launched()
        await h.settle()
        assert h.waits == [1.0]
        await h.close()

    run(test)


def test_back_off_doubles_per_quick_failure_and_resets_after_serving() -> None:
    async def test() -> None:
        h = Harness(restart=RestartPolicy(backoff_s=1.0, backoff_max_s=4.0, limit=100))
        await h.start(decode=1)
        for _ in range(4):  # each replacement dies before it ever serves
            h.launcher.workers[-1].exit()
            h.registry.check_launched()
            await h.settle()
        assert h.waits == [1.0, 2.0, 4.0, 4.0]
        (current,) = h.registry.list_instances()
        h.ready(current.id)
        h.clock.now += 59.0  # ready, but not for reset_after_s yet
        h.launcher.workers[-1].exit()
        h.registry.check_launched()
        await h.settle()
        assert h.waits[4:] == [4.0]
        (current,) = h.registry.list_instances()
        h.ready(current.id)
        h.clock.now += 60.0  # served for reset_after_s: recovered
        h.launcher.workers[-1].exit()
        h.registry.check_launched()
        await h.settle()
        assert h.waits[5:] == [1.0]
        await h.close()

    run(test)


def test_a_crash_loop_is_given_up_and_shown() -> None:
    async def test() -> None:
        h = Harness()  # at most 4 restarts in 600 s
        await h.start(decode=1)
        for step in range(4):
            h.clock.now += 10.0
            h.launcher.workers[-1].exit()
            h.registry.check_launched()
            await h.settle()
            assert len(h.launcher.workers) == step + 2
        h.clock.now += 10.0
        last = h.launcher.workers[-1]
        last.exit()
        h.registry.check_launched()
        await h.settle()
        assert len(h.launcher.workers) == 5  # no sixth launch
        assert last.stops == [0.0]  # reaped: its cores and port go back
        assert h.states() == [
            (
                "w5",
                "127.0.0.1:20005",
                InstanceState.DEAD,
                "not restarted: restarted 4 times within 600 s (crash loop); last: "
                f"{EXITED} ({EXITED})",
            )
        ]
        assert h.counter("worker_restarts") == 4.0
        assert h.counter("worker_restarts_given_up") == 1.0
        h.registry.check_launched()  # no handle any more: nothing happens again
        await h.settle()
        assert len(h.launcher.workers) == 5
        await h.registry.remove("w5", wait_s=0.0)  # the operator clears it
        assert h.states() == []
        await h.close()

    run(test)


def test_restarts_older_than_the_window_do_not_count() -> None:
    async def test() -> None:
        h = Harness(restart=RestartPolicy(backoff_s=0.0, limit=2, window_s=100.0))
        await h.start(decode=1)
        for _ in range(6):  # one failure every 60 s: never 2 within 100 s before the next
            h.clock.now += 60.0
            h.launcher.workers[-1].exit()
            h.registry.check_launched()
            await h.settle()
        assert len(h.launcher.workers) == 7
        assert h.counter("worker_restarts_given_up") is None
        await h.close()

    run(test)


def test_workers_that_served_before_dying_are_no_crash_loop() -> None:
    """Killed 10 times in 10 minutes, each worker after serving a minute: always restarted."""

    async def test() -> None:
        h = Harness()  # at most 4 quick restarts in 600 s; reset after 60 s ready
        await h.start(decode=1)
        for _ in range(10):
            (current,) = h.registry.list_instances()
            h.ready(current.id)
            h.clock.now += 60.0
            h.launcher.workers[-1].exit()
            h.registry.check_launched()
            await h.settle()
        assert len(h.launcher.workers) == 11
        assert h.waits == [1.0] * 10  # each a new incident: the first back-off
        assert h.counter("worker_restarts_given_up") is None
        await h.close()

    run(test)


class FlakyStore(LocalRegistryStore):
    """A local store whose next ``fail_deletes`` deletes fail as an unreachable Redis would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_deletes = 0

    async def delete(self, instance_id: str) -> None:
        if self.fail_deletes:
            self.fail_deletes -= 1
            raise RegistryStoreError("registry redis://x: connection refused")
        await super().delete(instance_id)


def test_the_record_of_a_replaced_worker_is_deleted_once_the_store_is_back() -> None:
    async def test() -> None:
        store = FlakyStore()
        h = Harness(store=store)
        await h.start(decode=1)
        store.fail_deletes = 2
        h.launcher.workers[0].exit()
        h.registry.check_launched()
        await h.settle()
        await settle()
        assert sorted(h.waits) == [1.0, 1.0, 2.0]  # back-off 1; delete retried after 1, 2
        assert set(await store.load()) == {"w2"}
        await h.registry.sync()
        assert [i for i, _, _, _ in h.states()] == ["w2"]
        await h.close()

    run(test)


def test_a_failing_launch_is_retried_with_back_off_and_counted() -> None:
    async def test() -> None:
        h = Harness(restart=RestartPolicy(backoff_s=1.0, backoff_max_s=60.0, limit=3))
        await h.start(decode=1)
        h.launcher.fail = 1
        h.launcher.workers[0].exit()
        h.registry.check_launched()
        await h.settle()
        assert h.waits == [1.0, 2.0]  # the failed launch is the slot's second failure
        assert [i.endpoint for i in h.registry.list_instances()] == ["127.0.0.1:20002"]
        h.launcher.fail = 5
        h.launcher.workers[-1].exit()
        h.registry.check_launched()
        await h.settle()
        assert h.waits == [1.0, 2.0, 4.0]  # third restart in the window; its launch fails: cap
        assert h.registry.list_instances() == []
        assert h.counter("worker_restarts_given_up") == 1.0
        await h.close()

    run(test)


def test_instances_that_are_not_ours_or_on_their_way_out_are_not_restarted() -> None:
    async def test() -> None:
        h = Harness(drain_timeout_s=5.0)
        await h.registry.register_configured(DECODE, ["127.0.0.1:10001"])  # added, not launched
        await h.start(decode=3)
        h.ready("w1")
        h.registry._set_state(h.registry.get("w1"), InstanceState.DEAD, "unavailable: gone")
        await h.registry.drain("w2")
        h.launcher.workers[0].exit()  # w2, draining, exits: not restarted
        h.registry.check_launched()
        await h.settle()
        assert [(i, s) for i, _, s, _ in h.states()] == [
            ("w1", InstanceState.DEAD),
            ("w2", InstanceState.DRAINING),
            ("w3", InstanceState.STARTING),
        ]
        assert len(h.launcher.workers) == 2  # w1 counted towards the 3
        assert h.waits == []
        await h.close()

    run(test)


def test_restart_off_leaves_an_exited_worker_dead_and_reaps_it() -> None:
    async def test() -> None:
        h = Harness(restart=None)
        await h.start(decode=1)
        h.ready("w1")
        h.registry._set_state(h.registry.get("w1"), InstanceState.DEAD, "stalled: no step")
        await h.settle()
        assert h.launcher.workers[0].stops == []  # alive: left alone, it may come back
        h.launcher.workers[0].exit()
        h.registry.check_launched()
        await h.settle()
        assert h.launcher.workers[0].stops == [0.0]
        assert [(i, s) for i, _, s, _ in h.states()] == [("w1", InstanceState.DEAD)]
        assert len(h.launcher.workers) == 1
        await h.close()

    run(test)


def test_nothing_is_restarted_before_supervision_starts() -> None:
    """During start-up the gateway fails the start when a launched worker exits."""

    async def test() -> None:
        h = Harness()
        await h.registry.scale(DECODE, 1)
        h.ready("w1")
        h.launcher.workers[0].exit()
        h.registry.check_launched()
        await h.settle()
        assert h.launcher.workers[0].stops == []
        assert len(h.launcher.workers) == 1
        await h.close()

    run(test)


def test_scale_counts_a_pending_replacement_and_scale_down_drops_it() -> None:
    async def test() -> None:
        h = Harness()
        await h.start(decode=2)
        h.gate = asyncio.Event()
        h.launcher.workers[0].exit()
        h.registry.check_launched()
        await h.settle()
        assert h.waits == [1.0]  # the replacement waits for its back-off
        await h.registry.scale(DECODE, 2)  # one running + one pending: nothing to launch
        assert len(h.launcher.workers) == 2
        await h.registry.scale(DECODE, 1)  # the pending one goes first
        h.gate.set()
        await h.settle()
        assert len(h.launcher.workers) == 2
        assert [i for i, _, _, _ in h.states()] == ["w2"]
        await h.close()

    run(test)


def test_only_the_gateway_that_launched_a_worker_restarts_it() -> None:
    async def test() -> None:
        store = LocalRegistryStore()  # shared, as Redis would be
        a, b = Harness(store=store), Harness(store=store)
        await a.start(decode=1)
        await b.start(decode=0)
        await b.registry.sync()
        b.ready("w1")
        b.registry._set_state(b.registry.get("w1"), InstanceState.DEAD, "unavailable: gone")
        await b.settle()
        assert b.launcher.workers == [] and b.waits == []  # not b's worker: left dead
        a.launcher.workers[0].exit()
        a.registry.check_launched()
        await a.settle()
        assert a.waits == [1.0]
        await b.registry.sync()
        assert [(i, e) for i, e, _, _ in b.states()] == [("w2", "127.0.0.1:20002")]
        assert "w2" not in b.registry._launched  # b would leave it dead too
        await a.close()
        await b.close()

    run(test)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"backoff_s": -1.0}, "restart_backoff_s must be >= 0"),
        ({"backoff_s": 5.0, "backoff_max_s": 2.0}, "restart_backoff_max_s"),
        ({"limit": 0}, "restart_limit must be >= 1"),
    ],
)
def test_restart_policy_is_validated(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        RestartPolicy(**kwargs)


def test_delays() -> None:
    assert [POLICY.delay_s(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


class ClosingClient:
    """A worker client whose Health call runs until the client is closed, then ends as
    grpc.aio ends a call on a closed channel: CancelledError."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def health(self, *, timeout_s: float) -> WorkerHealth:
        await self.closed.wait()
        raise asyncio.CancelledError

    async def close(self) -> None:
        self.closed.set()


def test_forgetting_an_instance_mid_health_check_does_not_end_the_health_checks() -> None:
    async def test() -> None:
        h = Harness()
        await h.start()
        instance = h.registry.get("w1")
        instance.client = ClosingClient()  # type: ignore[assignment]
        round_ = asyncio.create_task(h.registry.check_all())
        await h.settle()
        h.registry._forget(instance, stop_after_s=0.0)
        await asyncio.wait_for(round_, 5.0)  # ends normally: the loop goes on
        assert not round_.cancelled() and round_.exception() is None
        # A cancellation of the round itself still cancels it.
        other = h.registry.get("w2")
        other.client = ClosingClient()  # type: ignore[assignment]
        round_ = asyncio.create_task(h.registry.check_all())
        await h.settle()
        round_.cancel()
        with pytest.raises(asyncio.CancelledError):
            await round_
        await h.close()

    run(test)
