"""The registry's handling of worker announcements (controlplane/instances/state.py `sync`),
in-process: `AnnouncingStore` is a test double of a shared store whose announcements the test
sets. No worker is contacted (Health is covered by tests/integration/controlplane/
test_announced_workers.py, against a real Valkey)."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.instances.registry import InstanceRegistry
from controlplane.instances.store import InstanceRecord, LocalRegistryStore, RegistryStoreError
from controlplane.instances.types import InstanceConflict, InstanceState
from controlplane.metrics import GatewayMetrics
from controlplane.workers.roles import WorkerRole
from strata_common.announce import AnnouncedRole, Announcement
from tests.fakes import FakeClock

PREFILL, DECODE = WorkerRole.PREFILL, WorkerRole.DECODE


class AnnouncingStore(LocalRegistryStore):
    """A LocalRegistryStore that also has announcements (what the test puts in
    ``self.announced``; ``self.failing`` makes reading them fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.announced: dict[str, Announcement] = {}
        self.failing = False
        self.reads = 0

    async def announcements(self) -> dict[str, Announcement] | None:
        self.reads += 1
        if self.failing:
            raise RegistryStoreError("registry redis://x: connection refused")
        return dict(self.announced)


def announce(store: AnnouncingStore, endpoint: str, role: AnnouncedRole) -> None:
    store.announced[endpoint] = Announcement(endpoint, role, "tiny", "b00t")


async def settle(registry: InstanceRegistry) -> None:
    """Until the registry's background tasks (withdrawals, channel closes) are done."""
    while registry._tasks:
        await asyncio.gather(*list(registry._tasks))


GRACE_S = 10.0


def make(
    store: LocalRegistryStore, clock: FakeClock | None = None, *, drain_timeout_s: float = 600.0
) -> InstanceRegistry:
    return InstanceRegistry(
        metrics=GatewayMetrics(),
        health_check_timeout_s=1.0,
        store=store,
        drain_timeout_s=drain_timeout_s,
        clock=clock or FakeClock(),
        announcement_grace_s=GRACE_S,
    )


async def gone_for_the_grace(registry: InstanceRegistry, clock: FakeClock) -> None:
    """Two rounds: the first finds the announcement missing, the next one a grace later."""
    await registry.sync()
    clock.now += GRACE_S
    await registry.sync()


def test_announced_workers_are_registered_with_their_role() -> None:
    async def test() -> None:
        store = AnnouncingStore()
        registry = make(store)
        await registry.register_configured(PREFILL, ["127.0.0.1:10001"])
        announce(store, "10.0.0.1:5000", AnnouncedRole.PREFILL)
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)
        announce(store, "10.0.0.3:5000", AnnouncedRole.BOTH)
        announce(store, "127.0.0.1:10001", AnnouncedRole.DECODE)  # configured already
        await registry.sync()
        records = await store.load()
        assert sorted(records.values(), key=lambda r: r.id) == [
            InstanceRecord("w1", PREFILL, "127.0.0.1:10001"),
            InstanceRecord("w2", PREFILL, "10.0.0.1:5000", announced=True),
            InstanceRecord("w3", DECODE, "10.0.0.2:5000", announced=True),
            InstanceRecord("w4", DECODE, "10.0.0.3:5000", announced=True),  # both: decode
        ]
        listed = {i.id: (i.role, i.state) for i in registry.list_instances()}
        assert listed == {
            "w1": (PREFILL, InstanceState.STARTING),
            "w2": (PREFILL, InstanceState.STARTING),
            "w3": (DECODE, InstanceState.STARTING),
            "w4": (DECODE, InstanceState.STARTING),
        }
        await registry.sync()  # nothing new: registered once
        assert len(await store.load()) == 4
        # The configured worker's announcement going away changes nothing: it is configured.
        del store.announced["127.0.0.1:10001"]
        await registry.sync()
        await settle(registry)
        assert registry.get("w1").state is InstanceState.STARTING
        await registry.close()

    asyncio.run(test())


def test_a_gone_announcement_drains_the_instance_then_removes_it_once_idle() -> None:
    async def test() -> None:
        store, clock = AnnouncingStore(), FakeClock()
        registry = make(store, clock)
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)
        await registry.sync()
        instance = registry.get("w1")
        registry._begin(instance)  # a request of this gateway runs on it
        del store.announced["10.0.0.2:5000"]
        await gone_for_the_grace(registry, clock)
        for _ in range(5):
            await asyncio.sleep(0)
        assert instance.state is InstanceState.DRAINING
        assert (await store.load())["w1"] == InstanceRecord(
            "w1", DECODE, "10.0.0.2:5000", draining=True, announced=True
        )
        await registry.sync()  # the next round starts no second withdrawal
        assert len(registry._announced.withdrawing) == 1
        assert registry.get("w1") is instance  # kept while its request runs
        registry._end(instance)
        await settle(registry)
        assert await store.load() == {}
        assert registry.list_instances() == []
        assert registry._announced.withdrawing == frozenset()
        # Announced again (the worker restarted): registered anew.
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)
        await registry.sync()
        assert [(i.id, i.endpoint) for i in registry.list_instances()] == [("w2", "10.0.0.2:5000")]
        await registry.close()

    asyncio.run(test())


def test_a_withdrawal_waits_at_most_the_drain_timeout() -> None:
    async def test() -> None:
        store, clock = AnnouncingStore(), FakeClock()
        registry = make(store, clock, drain_timeout_s=0.05)
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)
        announce(store, "10.0.0.3:5000", AnnouncedRole.DECODE)
        await registry.sync()
        registry._begin(registry.get("w1"))  # never ends
        del store.announced["10.0.0.2:5000"]
        await gone_for_the_grace(registry, clock)
        task = next(iter(registry._tasks))
        await task  # the withdrawal: drained, waited 50 ms, deleted
        assert list(await store.load()) == ["w2"]
        assert [i.id for i in registry.list_instances()] == ["w2"]
        for t in list(registry._tasks):
            t.cancel()  # the channel close still waits for the request
        await registry.close()

    asyncio.run(test())


def test_unreadable_announcements_withdraw_nothing() -> None:
    async def test() -> None:
        store = AnnouncingStore()
        registry = make(store)
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)
        await registry.sync()
        store.failing = True
        store.announced.clear()
        await registry.sync()
        await settle(registry)
        assert registry.get("w1").state is InstanceState.STARTING
        assert not (await store.load())["w1"].draining
        await registry.close()

    asyncio.run(test())


def test_the_local_store_has_no_announcements() -> None:
    async def test() -> None:
        store = LocalRegistryStore()
        assert await store.announcements() is None
        registry = make(store)
        await registry.register_configured(DECODE, ["127.0.0.1:10002"])
        await registry.sync()
        assert [i.id for i in registry.list_instances()] == ["w1"]
        await registry.close()

    asyncio.run(test())


def test_removing_a_worker_that_still_announces_itself_is_refused() -> None:
    async def test() -> None:
        store = AnnouncingStore()
        registry = make(store)
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)
        await registry.sync()
        with pytest.raises(InstanceConflict) as caught:
            await registry.remove("w1", wait_s=0.0)
        assert str(caught.value) == (
            "instance w1 (10.0.0.2:5000) announces itself in the registry: removed, it would be "
            "registered again at the next round; stop the worker (its SIGTERM withdraws the "
            "announcement, and every gateway drains and removes it), or drain it to keep it unused"
        )
        assert registry.get("w1").state is InstanceState.STARTING  # untouched
        store.announced.clear()  # the worker stopped, its instance not withdrawn yet
        await registry.remove("w1", wait_s=0.0)
        assert await store.load() == {}
        await registry.close()

    asyncio.run(test())


def test_a_gap_shorter_than_the_grace_withdraws_nothing() -> None:
    async def test() -> None:
        store, clock = AnnouncingStore(), FakeClock()
        registry = make(store, clock)
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)
        announce(store, "10.0.0.3:5000", AnnouncedRole.DECODE)
        await registry.sync()
        del store.announced["10.0.0.2:5000"]  # one round without it
        await registry.sync()
        clock.now += GRACE_S - 0.5
        await registry.sync()
        assert registry._tasks == set()
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)  # renewed in time
        await registry.sync()
        del store.announced["10.0.0.2:5000"]  # missing again: its grace starts anew
        clock.now += 1.0
        await registry.sync()
        clock.now += GRACE_S - 0.5
        await registry.sync()
        assert registry._tasks == set()
        assert registry.get("w1").state is InstanceState.STARTING
        assert not (await store.load())["w1"].draining
        clock.now += 0.5  # the grace since the first round that missed it
        await registry.sync()
        assert registry._announced.withdrawing == {"w1"}
        await settle(registry)
        assert [i.id for i in registry.list_instances()] == ["w2"]
        await registry.close()

    asyncio.run(test())


def test_an_announcement_back_during_its_withdrawal_cancels_it_and_undrains() -> None:
    async def test() -> None:
        store, clock = AnnouncingStore(), FakeClock()
        registry = make(store, clock)
        other = make(store, clock)  # a second gateway on the same store
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)
        announce(store, "10.0.0.3:5000", AnnouncedRole.DECODE)
        await registry.sync()
        await other.sync()
        instance = registry.get("w1")
        registry._begin(instance)  # its drain waits for this request
        del store.announced["10.0.0.2:5000"]
        await gone_for_the_grace(registry, clock)
        await asyncio.sleep(0)
        assert instance.state is InstanceState.DRAINING
        await other.sync()  # the other gateway sees the record drained
        assert other.get("w1").state is InstanceState.DRAINING
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)  # back before the drain ended
        await registry.sync()
        assert registry._tasks == set()
        assert registry._announced.withdrawing == frozenset()
        assert (await store.load())["w1"] == InstanceRecord(
            "w1", DECODE, "10.0.0.2:5000", announced=True
        )
        assert instance.state is InstanceState.STARTING  # its next Health makes it ready
        await other.sync()
        assert other.get("w1").state is InstanceState.STARTING
        registry._end(instance)
        await registry.close()
        await other.close()

    asyncio.run(test())


def test_an_operators_drain_is_kept_when_the_announcement_comes_back() -> None:
    async def test() -> None:
        store, clock = AnnouncingStore(), FakeClock()
        registry = make(store, clock)
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)
        announce(store, "10.0.0.3:5000", AnnouncedRole.DECODE)
        await registry.sync()
        instance = registry.get("w1")
        await registry.drain("w1")  # `strata admin drain`
        registry._begin(instance)
        del store.announced["10.0.0.2:5000"]
        await gone_for_the_grace(registry, clock)
        assert registry._announced.withdrawing == {"w1"}
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)
        await registry.sync()
        assert registry._announced.withdrawing == frozenset()
        assert instance.state is InstanceState.DRAINING
        assert (await store.load())["w1"].draining
        registry._end(instance)
        await registry.close()

    asyncio.run(test())


def test_a_scan_that_finds_no_announcement_withdraws_nothing_for_a_grace() -> None:
    async def test() -> None:
        store, clock = AnnouncingStore(), FakeClock()
        registry = make(store, clock)
        announce(store, "10.0.0.2:5000", AnnouncedRole.DECODE)
        announce(store, "10.0.0.3:5000", AnnouncedRole.DECODE)
        await registry.sync()
        saved = dict(store.announced)
        clock.now += 100.0  # Redis was down longer than the TTL (the scans failed meanwhile)
        store.announced.clear()  # back, empty
        await registry.sync()
        clock.now += GRACE_S - 0.5
        await registry.sync()
        assert registry._tasks == set()
        store.announced.update(saved)  # the workers' next renewals
        await registry.sync()
        clock.now += GRACE_S
        await registry.sync()
        assert registry._tasks == set()
        assert not any(r.draining for r in (await store.load()).values())
        # Empty for a whole grace: the workers are gone (the last of a pool stopped).
        store.announced.clear()
        await registry.sync()
        clock.now += GRACE_S
        await registry.sync()
        assert registry._announced.withdrawing == {"w1", "w2"}
        await settle(registry)
        assert registry.list_instances() == []
        await registry.close()

    asyncio.run(test())
