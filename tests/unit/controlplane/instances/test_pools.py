"""The registry's pool layer (controlplane/instances/pools.py) with `FakePool`, a test double of
the PoolLauncher protocol that records its calls: which members a scale-down chooses, what it
leaves to the pool, set-role of a worker that is no pool member, the launchers' exclusion.

No worker is contacted: instances are registered records (state starting) whose state a test
sets; the Kubernetes requests themselves are checked in
tests/integration/controlplane/test_kubernetes_launcher.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest

from controlplane.instances.registry import InstanceRegistry
from controlplane.instances.store import LocalRegistryStore
from controlplane.instances.types import (
    InstanceConflict,
    InstanceState,
    LauncherUnavailable,
    PoolPod,
)
from controlplane.metrics import GatewayMetrics
from controlplane.workers.roles import WorkerRole

T = TypeVar("T")
PREFILL, DECODE = WorkerRole.PREFILL, WorkerRole.DECODE


class FakePool:
    """PoolLauncher test double: pools of pods by role, each pod at 10.0.0.N; records calls."""

    def __init__(self, pods: dict[WorkerRole, list[PoolPod]], *, dry_run: bool = False) -> None:
        self.pods_by_role = pods
        self.sizes = {role: len(p) for role, p in pods.items()}
        self.calls: list[tuple[Any, ...]] = []
        self._dry_run = dry_run
        self.fail_remove: BaseException | None = None
        """Raised by remove before the size changes."""
        self.pod_gone: asyncio.Event | None = None
        """When set up, remove lowers the size at once and returns only once it is set."""

    @property
    def dry_run(self) -> bool:
        return self._dry_run

    def describe(self, role: WorkerRole) -> str:
        return f"pool {role.name.lower()}"

    async def replicas(self, role: WorkerRole) -> int:
        return self.sizes[role]

    async def pods(self, role: WorkerRole) -> Sequence[PoolPod]:
        return list(self.pods_by_role[role])

    async def set_replicas(self, role: WorkerRole, replicas: int) -> Sequence[str]:
        self.calls.append(("set_replicas", role, replicas))
        return self._write(role, replicas)

    async def add_replicas(self, role: WorkerRole, delta: int) -> Sequence[str]:
        self.calls.append(("add_replicas", role, delta))
        return self._write(role, self.sizes[role] + delta)

    async def remove(
        self, role: WorkerRole, pod: PoolPod, resized: Callable[[], None] | None = None
    ) -> Sequence[str]:
        self.calls.append(("remove", role, pod.name))
        if self._dry_run:
            return [f"remove {pod.name}"]
        if self.fail_remove is not None:
            raise self.fail_remove
        self.sizes[role] -= 1
        if resized is not None:
            resized()
        if self.pod_gone is not None:  # the pod goes later: between resize and pod gone
            await self.pod_gone.wait()
        self.pods_by_role[role].remove(pod)
        return []

    async def close(self) -> None:
        self.calls.append(("close",))

    def _write(self, role: WorkerRole, replicas: int) -> list[str]:
        if self._dry_run:
            return [f"{role.name.lower()} := {replicas}"]
        self.sizes[role] = replicas
        return []


def pod(n: int, phase: str = "Running") -> PoolPod:
    return PoolPod(name=f"pod-{n}", uid=f"uid-{n}", ip=f"10.0.0.{n}", phase=phase)


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 30.0))


async def make_registry(pool: FakePool, decode_ips: list[int]) -> InstanceRegistry:
    registry = InstanceRegistry(
        metrics=GatewayMetrics(),
        health_check_timeout_s=1.0,
        store=LocalRegistryStore(),
        pool_launcher=pool,
        drain_timeout_s=5.0,
    )
    await registry.register_configured(PREFILL, ["10.0.0.1:9000"])
    await registry.register_configured(DECODE, [f"10.0.0.{n}:9000" for n in decode_ips])
    return registry


async def settle(registry: InstanceRegistry, pool: FakePool, removals: int) -> None:
    while sum(1 for c in pool.calls if c[0] == "remove") < removals:
        await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)


def test_scale_down_takes_what_serves_nothing_then_starting_then_least_loaded() -> None:
    async def test() -> None:
        pool = FakePool({PREFILL: [pod(1)], DECODE: [pod(2), pod(3), pod(4), pod(5), pod(6)]})
        registry = await make_registry(pool, [2, 3, 4, 5, 6])
        by_ip = {i.endpoint.split(":")[0]: registry.get(i.id) for i in registry.list_instances()}
        for ip in ("10.0.0.3", "10.0.0.4", "10.0.0.5"):
            by_ip[ip].state = InstanceState.READY
        by_ip["10.0.0.6"].state = InstanceState.DEAD
        # 10.0.0.2 stays starting; of the ready ones 10.0.0.5 is the least loaded.
        with (
            registry.track_decode(by_ip["10.0.0.3"], 10, 10),
            registry.track_decode(by_ip["10.0.0.4"], 10, 10),
            registry.track_decode(by_ip["10.0.0.4"], 10, 10),
        ):
            await registry.scale(DECODE, 2)
        await settle(registry, pool, 3)
        assert pool.calls == [
            ("remove", DECODE, "pod-6"),  # dead
            ("remove", DECODE, "pod-2"),  # starting
            ("remove", DECODE, "pod-5"),  # ready, idle
        ]
        assert sorted(i.endpoint for i in registry.list_instances() if i.role is DECODE) == [
            "10.0.0.3:9000",
            "10.0.0.4:9000",
        ]
        await registry.close()

    run(test)


def test_places_no_instance_fills_go_first_and_alone() -> None:
    """Five replicas, two of them pods not announced yet (one Pending, one without a worker
    known): scaling to 3 leaves their removal to the pool, no worker is drained."""

    async def test() -> None:
        pods = [pod(2), pod(3), pod(4), PoolPod("pod-p", "uid-p", "", "Pending")]
        pool = FakePool({PREFILL: [pod(1)], DECODE: pods})
        pool.sizes[DECODE] = 5  # one more not even created yet
        registry = await make_registry(pool, [2, 3])  # 10.0.0.4: running, not announced yet
        await registry.scale(DECODE, 3)
        assert pool.calls == [("add_replicas", DECODE, -2)]
        assert {i.state for i in registry.list_instances()} == {InstanceState.STARTING}
        pool.calls.clear()
        await registry.scale(DECODE, 1)  # 1 unfilled place left, then one member
        await settle(registry, pool, 1)
        assert pool.calls == [("add_replicas", DECODE, -1), ("remove", DECODE, "pod-2")]
        await registry.close()

    run(test)


def test_dry_run_changes_nothing_in_the_registry() -> None:
    async def test() -> None:
        pool = FakePool({PREFILL: [pod(1)], DECODE: [pod(2), pod(3)]}, dry_run=True)
        registry = await make_registry(pool, [2, 3])
        planned: list[str] = []
        await registry.scale(DECODE, 1, planned=planned)
        assert planned == ["remove pod-2"]
        planned = []
        info = await registry.set_role(registry.list_instances()[2].id, PREFILL, planned=planned)
        assert planned == ["prefill := 2", "remove pod-3"]
        assert (info.id, info.endpoint, info.state) == ("", "", InstanceState.STARTING)
        assert info.detail.startswith("dry run: a new pod of pool prefill")
        assert {i.state for i in registry.list_instances()} == {InstanceState.STARTING}
        with pytest.raises(InstanceConflict, match="dry run: it would remove pod pod-2"):
            await registry.remove(registry.list_instances()[1].id, wait_s=1.0)
        assert len(registry.list_instances()) == 3
        await registry.close()

    run(test)


def test_a_removal_counts_against_the_size_only_until_its_resize() -> None:
    """3 → 2: the chosen pod's removal lowers the size at once but its pod goes later; a
    scale to 2 meanwhile is a no-op (the removal is not subtracted twice), a scale to 3 writes
    3."""

    async def test() -> None:
        pool = FakePool({PREFILL: [pod(1)], DECODE: [pod(2), pod(3), pod(4)]})
        pool.pod_gone = asyncio.Event()
        registry = await make_registry(pool, [2, 3, 4])
        await registry.scale(DECODE, 2)
        await settle(registry, pool, 1)
        assert pool.sizes[DECODE] == 2 and len(pool.pods_by_role[DECODE]) == 3
        await registry.scale(DECODE, 2)
        assert pool.calls == [("remove", DECODE, "pod-2")]
        await registry.scale(DECODE, 3)
        assert pool.calls[1:] == [("set_replicas", DECODE, 3)]
        pool.pod_gone.set()
        await settle(registry, pool, 1)
        assert sorted(i.endpoint for i in registry.list_instances() if i.role is DECODE) == [
            "10.0.0.3:9000",
            "10.0.0.4:9000",
        ]
        await registry.close()

    run(test)


def test_a_failed_removal_takes_its_drain_back() -> None:
    """The pool's size unchanged (the API server unavailable): the worker keeps its place and
    serves again, in the registry's record too; a drain an admin made before stays."""

    async def test() -> None:
        pool = FakePool({PREFILL: [pod(1)], DECODE: [pod(2), pod(3)]})
        store = LocalRegistryStore()
        registry = InstanceRegistry(
            metrics=GatewayMetrics(),
            health_check_timeout_s=1.0,
            store=store,
            pool_launcher=pool,
            drain_timeout_s=5.0,
        )
        await registry.register_configured(DECODE, ["10.0.0.2:9000", "10.0.0.3:9000"])
        first, second = (registry.get(i.id) for i in registry.list_instances())
        first.state = second.state = InstanceState.READY
        pool.fail_remove = LauncherUnavailable("Kubernetes API: 503")
        with pytest.raises(LauncherUnavailable):
            await registry.remove(first.id, wait_s=1.0)
        assert (first.state, first.draining, first.forgotten) == (InstanceState.READY, False, False)
        assert not (await store.load())[first.id].draining
        await registry.drain(second.id)
        with pytest.raises(LauncherUnavailable):
            await registry.remove(second.id, wait_s=1.0)
        assert (second.state, second.draining) == (InstanceState.DRAINING, True)
        assert pool.sizes[DECODE] == 2
        await registry.close()

    run(test)


def test_a_cancelled_removal_takes_its_drain_back() -> None:
    async def test() -> None:
        pool = FakePool({PREFILL: [pod(1)], DECODE: [pod(2), pod(3)]})
        registry = await make_registry(pool, [2, 3])
        chosen = registry.get(registry.list_instances()[1].id)
        chosen.state = InstanceState.READY
        with registry.track_decode(chosen, 10, 10):  # the removal waits for it
            removal = asyncio.create_task(registry.remove(chosen.id, wait_s=5.0))
            while not chosen.draining:
                await asyncio.sleep(0)
            removal.cancel()
            with pytest.raises(asyncio.CancelledError):
                await removal
        assert (chosen.state, chosen.draining) == (InstanceState.READY, False)
        assert pool.calls == []
        await registry.close()

    run(test)


def test_set_role_grows_the_other_pool_before_removing() -> None:
    """A removal that fails then leaves a worker too many, not one too few."""

    async def test() -> None:
        pool = FakePool({PREFILL: [pod(1)], DECODE: [pod(2), pod(3)]})
        registry = await make_registry(pool, [2, 3])
        moved = registry.get(registry.list_instances()[1].id)
        moved.state = InstanceState.READY
        pool.fail_remove = LauncherUnavailable("Kubernetes API: 503")
        with pytest.raises(LauncherUnavailable):
            await registry.set_role(moved.id, PREFILL)
        assert pool.calls == [("add_replicas", PREFILL, 1), ("remove", DECODE, "pod-2")]
        assert (moved.state, moved.draining) == (InstanceState.READY, False)
        pool.fail_remove = None
        pool.calls.clear()
        await registry.set_role(moved.id, PREFILL)
        assert pool.calls == [("add_replicas", PREFILL, 1), ("remove", DECODE, "pod-2")]
        assert moved.forgotten
        await registry.close()

    run(test)


def test_set_role_of_a_worker_outside_the_pools_is_refused() -> None:
    async def test() -> None:
        pool = FakePool({PREFILL: [pod(1)], DECODE: [pod(2)]})
        registry = await make_registry(pool, [2])
        added = await registry.add_instance(DECODE, "127.0.0.1:1")  # by hand, no pod
        with pytest.raises(InstanceConflict, match="is not a pod of pool decode"):
            await registry.set_role(added.id, PREFILL)
        assert pool.calls == []
        await registry.remove(added.id, wait_s=0.0)  # not a member: forgotten, no pod touched
        assert pool.calls == []
        await registry.close()

    run(test)


def test_a_registry_has_one_kind_of_launcher() -> None:
    class Launcher:
        async def launch(self, role: WorkerRole) -> Any:
            raise AssertionError

        async def close(self) -> None:
            pass

    with pytest.raises(ValueError, match="a process launcher or a pool launcher, not both"):
        InstanceRegistry(
            metrics=GatewayMetrics(),
            health_check_timeout_s=1.0,
            launcher=Launcher(),
            pool_launcher=FakePool({}),
        )
