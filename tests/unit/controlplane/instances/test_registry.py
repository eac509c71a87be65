"""InstanceRegistry and its stores, in-process: records, admin operations, load counters.

No worker is contacted here (state changes that need Health answers are covered by
tests/integration/controlplane/test_failover.py and test_ha.py); `LocalLauncher` below is a
test double of the Launcher protocol that starts nothing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from controlplane.instances.registry import InstanceRegistry
from controlplane.instances.store import (
    InstanceRecord,
    LocalRegistryStore,
    RegistryStoreError,
)
from controlplane.instances.types import (
    InstanceConflict,
    InstanceNotFound,
    InstanceState,
    InvalidAdminRequest,
)
from controlplane.metrics import GatewayMetrics
from controlplane.scheduling import InstanceLoad
from controlplane.workers.client import PrefillResult, WorkerError, WorkerErrorKind, WorkerHealth
from controlplane.workers.roles import WorkerRole

T = TypeVar("T")
PREFILL, DECODE = WorkerRole.PREFILL, WorkerRole.DECODE


def run(test: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await test()

    return asyncio.run(main())


class StubHandle:
    """A LaunchedWorker that records being stopped (nothing runs behind it)."""

    def __init__(self, role: WorkerRole, endpoint: str) -> None:
        self._role = role
        self._endpoint = endpoint
        self.stopped = False

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def role(self) -> WorkerRole:
        return self._role

    def alive(self) -> bool:
        return not self.stopped

    async def stop(self, *, timeout_s: float) -> None:
        self.stopped = True


class LocalLauncher:
    """Launcher test double: hands out endpoints 127.0.0.1:20001, 20002, ... and starts nothing."""

    def __init__(self) -> None:
        self.handles: list[StubHandle] = []

    async def launch(self, role: WorkerRole) -> StubHandle:
        handle = StubHandle(role, f"127.0.0.1:{20001 + len(self.handles)}")
        self.handles.append(handle)
        return handle

    async def close(self) -> None:
        for handle in self.handles:
            handle.stopped = True


async def make_registry(**kwargs: Any) -> tuple[InstanceRegistry, LocalRegistryStore]:
    store = LocalRegistryStore()
    registry = InstanceRegistry(
        metrics=GatewayMetrics(), health_check_timeout_s=1.0, store=store, **kwargs
    )
    await registry.register_configured(PREFILL, ["127.0.0.1:10001"])
    await registry.register_configured(DECODE, ["127.0.0.1:10002", "127.0.0.1:10003"])
    return registry, store


# -- records and the local store ---------------------------------------------------------------


def test_record_json_round_trip() -> None:
    record = InstanceRecord("w7", DECODE, "10.0.0.1:5000", draining=True, launched=True)
    assert InstanceRecord.from_json(record.to_json()) == record
    assert record.to_json() == (
        '{"announced": false, "draining": true, "endpoint": "10.0.0.1:5000", "id": "w7", '
        '"launched": true, "role": "decode"}'
    )
    announced = InstanceRecord("w8", PREFILL, "10.0.0.2:5000", announced=True)
    assert InstanceRecord.from_json(announced.to_json()) == announced
    assert '"announced": true' in announced.to_json()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "not JSON"),
        ("[]", "not a JSON object"),
        ('"w1"', "not a JSON object"),
        ('{"role": "decode", "endpoint": "a:1"}', "bad id None"),
        ('{"id": 7, "role": "decode", "endpoint": "a:1"}', "bad id 7"),
        ('{"id": "w 1", "role": "decode", "endpoint": "a:1"}', "bad id 'w 1'"),
        ('{"id": "' + "w" * 200 + '", "role": "decode", "endpoint": "a:1"}', "bad id"),
        ('{"id": "w1"}', "w1 has a bad role None"),
        ('{"id": "w1", "role": "both", "endpoint": "a:1"}', "bad role 'both'"),
        ('{"id": "w1", "role": ["decode"], "endpoint": "a:1"}', "bad role"),
        ('{"id": "w1", "role": "decode"}', "bad endpoint None"),
        ('{"id": "w1", "role": "decode", "endpoint": 5000}', "bad endpoint 5000"),
        ('{"id": "w1", "role": "decode", "endpoint": "a:70000"}', "bad endpoint 'a:70000'"),
        ('{"id": "w1", "role": "decode", "endpoint": "a:1", "draining": "no"}', "draining"),
        ('{"id": "w1", "role": "decode", "endpoint": "a:1", "launched": 1}', "launched"),
        ('{"id": "w1", "role": "decode", "endpoint": "a:1", "announced": "true"}', "announced"),
        ('{"id": "w1", "role": "decode", "endpoint": "\ud800:1"}', "bad endpoint"),
        ("[" * 3000, "not JSON"),  # nesting past Python's recursion limit: skipped, not fatal
        ('{"id": "w1", "pad": "' + "x" * 5000 + '"}', "of 5023 characters (at most 4096)"),
    ],
)
def test_each_field_of_a_record_is_validated(raw: str, reason: str) -> None:
    with pytest.raises(RegistryStoreError, match=re.escape(reason)):
        InstanceRecord.from_json(raw)


def test_a_record_may_omit_its_flags() -> None:
    raw = '{"id": "w1", "role": "prefill", "endpoint": "[::1]:7000"}'
    assert InstanceRecord.from_json(raw) == InstanceRecord("w1", PREFILL, "[::1]:7000")
    # written before announcements: not announced
    raw = '{"draining": true, "endpoint": "h:1", "id": "w2", "launched": true, "role": "decode"}'
    old = InstanceRecord.from_json(raw)
    assert old == InstanceRecord("w2", DECODE, "h:1", draining=True, launched=True)
    assert old.announced is False


def test_local_store_gives_one_record_per_endpoint() -> None:
    async def test() -> None:
        store = LocalRegistryStore()
        first, created = await store.register(PREFILL, "h:1", launched=False)
        assert (first, created) == (InstanceRecord("w1", PREFILL, "h:1"), True)
        again, created = await store.register(DECODE, "h:1", launched=True)
        assert (again, created) == (first, False)
        second, _ = await store.register(DECODE, "h:2", launched=True)
        assert second == InstanceRecord("w2", DECODE, "h:2", launched=True)
        assert await store.update(InstanceRecord("w1", PREFILL, "h:1", draining=True))
        await store.delete("w1")
        assert not await store.update(InstanceRecord("w1", PREFILL, "h:1"))
        assert await store.load() == {"w2": second}

    run(test)


# -- registry ----------------------------------------------------------------------------------


def test_configured_instances_start_in_starting_and_are_not_picked() -> None:
    async def test() -> None:
        registry, _ = await make_registry()
        infos = registry.list_instances()
        assert [(i.id, i.role, i.state) for i in infos] == [
            ("w1", PREFILL, InstanceState.STARTING),
            ("w2", DECODE, InstanceState.STARTING),
            ("w3", DECODE, InstanceState.STARTING),
        ]
        assert not registry.is_ready()
        assert registry.snapshot(DECODE) == ()
        with pytest.raises(WorkerError) as info:
            registry.pick(DECODE)
        assert info.value.kind is WorkerErrorKind.UNAVAILABLE
        assert "no decode worker is ready" in str(info.value)
        assert "127.0.0.1:10002: starting, not checked yet" in str(info.value)
        await registry.close()

    run(test)


def test_drain_is_shared_through_the_store_and_remove_forgets() -> None:
    async def test() -> None:
        registry, store = await make_registry()
        info = await registry.drain("w2")
        assert info.state is InstanceState.DRAINING
        assert (await store.load())["w2"].draining
        await registry.remove("w2", wait_s=0.0)
        assert [i.id for i in registry.list_instances()] == ["w1", "w3"]
        assert set(await store.load()) == {"w1", "w3"}
        with pytest.raises(InstanceNotFound):
            await registry.drain("w2")
        with pytest.raises(InstanceNotFound):
            await registry.remove("nope", wait_s=1.0)
        await registry.close()

    run(test)


def test_remove_waits_for_in_flight_requests() -> None:
    async def test() -> None:
        registry, _ = await make_registry()
        instance = registry.get("w2")
        with registry.track_decode(instance, 10, 5):
            removal = asyncio.create_task(registry.remove("w2", wait_s=30.0))
            await asyncio.sleep(0.05)
            assert not removal.done()
            assert registry.get("w2").state is InstanceState.DRAINING
        await asyncio.wait_for(removal, 5.0)
        assert "w2" not in {i.id for i in registry.list_instances()}
        await registry.close()

    run(test)


def test_load_counters_and_their_snapshot() -> None:
    async def test() -> None:
        registry, _ = await make_registry()
        decode = registry.get("w2")
        prefill = registry.get("w1")
        with registry.track_prefill(prefill, 300):
            assert prefill.load() == InstanceLoad(
                queued_prefill_tokens=300, queued_prefill_requests=1
            )
            with registry.track_decode(decode, 301, 99) as tracker:
                tracker.add_tokens(4)
                assert decode.load() == InstanceLoad(
                    running_decodes=1, decode_context_tokens=305, remaining_decode_tokens=95
                )
                assert decode.info().in_flight == 1
                assert not decode.idle.is_set()
        assert prefill.load() == decode.load() == InstanceLoad()
        assert decode.idle.is_set() and decode.info().in_flight == 0
        await registry.close()

    run(test)


@pytest.mark.parametrize(
    ("role", "endpoint", "error"),
    [
        (WorkerRole.BOTH, "127.0.0.1:9", "role must be prefill or decode"),
        (DECODE, "no-port", "must be HOST:PORT"),
        (DECODE, "127.0.0.1:70000", r"port must be in \[1, 65535\]"),
    ],
)
def test_add_instance_refuses_bad_arguments(role: WorkerRole, endpoint: str, error: str) -> None:
    async def test() -> None:
        registry, _ = await make_registry()
        with pytest.raises(InvalidAdminRequest, match=error):
            await registry.add_instance(role, endpoint)
        await registry.close()

    run(test)


def test_add_instance_refuses_a_known_endpoint() -> None:
    async def test() -> None:
        registry, _ = await make_registry()
        with pytest.raises(InstanceConflict, match="already registered as w2"):
            await registry.add_instance(DECODE, "127.0.0.1:10002")
        await registry.close()

    run(test)


def test_set_role_of_an_external_worker_is_refused() -> None:
    async def test() -> None:
        registry, _ = await make_registry()
        assert (await registry.set_role("w2", DECODE)).role is DECODE  # no change: fine
        with pytest.raises(InstanceConflict, match="its role is fixed by its own --role"):
            await registry.set_role("w2", PREFILL)
        with pytest.raises(InvalidAdminRequest):
            await registry.set_role("w2", WorkerRole.BOTH)
        with pytest.raises(InstanceNotFound):
            await registry.set_role("w9", PREFILL)
        await registry.close()

    run(test)


def test_scale_launches_and_stops_only_launched_workers() -> None:
    async def test() -> None:
        launcher = LocalLauncher()
        registry, store = await make_registry(launcher=launcher, drain_timeout_s=5.0)
        infos = await registry.scale(DECODE, 4)
        assert [(i.id, i.launched) for i in infos] == [
            ("w2", False),
            ("w3", False),
            ("w4", True),
            ("w5", True),
        ]
        assert [h.endpoint for h in launcher.handles] == ["127.0.0.1:20001", "127.0.0.1:20002"]
        assert (await store.load())["w4"].launched

        await registry.scale(DECODE, 3)  # drains one launched worker, stops it once idle
        for _ in range(100):
            if any(h.stopped for h in launcher.handles):
                break
            await asyncio.sleep(0.01)
        assert [h.stopped for h in launcher.handles] == [True, False]
        assert [i.id for i in registry.list_instances() if i.role is DECODE] == ["w2", "w3", "w5"]

        with pytest.raises(InstanceConflict, match="launched only 1 of them"):
            await registry.scale(DECODE, 1)
        with pytest.raises(InvalidAdminRequest, match="replicas must be >= 0"):
            await registry.scale(DECODE, -1)
        await registry.close()

    run(test)


def test_scale_up_without_a_launcher_is_refused() -> None:
    async def test() -> None:
        registry, _ = await make_registry()
        assert len(await registry.scale(DECODE, 2)) == 2  # already there: nothing to do
        with pytest.raises(InstanceConflict, match="no launcher"):
            await registry.scale(DECODE, 3)
        await registry.close()

    run(test)


def test_set_role_of_a_launched_worker_relaunches_it() -> None:
    async def test() -> None:
        launcher = LocalLauncher()
        registry, _ = await make_registry(launcher=launcher)
        (launched,) = [i for i in await registry.scale(PREFILL, 2) if i.launched]
        info = await registry.set_role(launched.id, DECODE)
        assert (info.role, info.launched, info.endpoint) == (DECODE, True, "127.0.0.1:20002")
        assert launcher.handles[0].stopped
        assert launched.id not in {i.id for i in registry.list_instances()}
        await registry.close()

    run(test)


def test_policy_and_stats() -> None:
    async def test() -> None:
        registry, _ = await make_registry(policy_names=("round_robin", "least_loaded"))
        assert registry.stats().policy == "round_robin"
        registry.set_policy("least_loaded")
        with pytest.raises(InvalidAdminRequest, match="available: round_robin, least_loaded"):
            registry.set_policy("fastest")
        registry.note_request()
        registry.note_failover(DECODE)
        stats = registry.stats()
        assert (stats.policy, stats.requests_total, stats.requests_failed_over) == (
            "least_loaded",
            1,
            1,
        )
        assert [i.id for i in stats.instances] == ["w1", "w2", "w3"]
        await registry.close()

    run(test)


def test_drain_cancels_the_profile_and_stops_the_worker_only_after_it_ended() -> None:
    """A start-up profile is control-plane work on the worker: scaling down cancels it and
    stops the worker only once its calls are gone (they used to die with EngineDeadError)."""

    async def test() -> None:
        launcher = LocalLauncher()
        registry, _ = await make_registry(launcher=launcher, drain_timeout_s=5.0)
        (info,) = [i for i in await registry.scale(DECODE, 3) if i.launched]
        instance = registry.get(info.id)
        events: list[str] = []

        async def profile() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(0.05)  # the cancelled rpc takes a moment to end
                events.append(f"profile ended, worker stopped: {launcher.handles[0].stopped}")
                raise

        instance.profile_task = asyncio.create_task(profile())
        await asyncio.sleep(0)
        await registry.scale(DECODE, 2)
        for _ in range(200):
            if launcher.handles[0].stopped:
                break
            await asyncio.sleep(0.01)
        assert launcher.handles[0].stopped
        assert events == ["profile ended, worker stopped: False"]
        await registry.close()

    run(test)


def test_an_idle_instance_is_stopped_at_once_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test() -> None:
        launcher = LocalLauncher()
        registry, _ = await make_registry(launcher=launcher, drain_timeout_s=5.0)
        (info,) = [i for i in await registry.scale(DECODE, 3) if i.launched]
        await registry.remove(info.id, wait_s=0.0)
        for _ in range(100):
            if launcher.handles[0].stopped:
                break
            await asyncio.sleep(0.01)
        assert launcher.handles[0].stopped
        await registry.close()

    with caplog.at_level("WARNING", logger="controlplane.instances.registry"):
        run(test)
    assert not [r for r in caplog.records if "still has" in r.getMessage()]


class ProfiledWorker:
    """A WorkerClient double for the start-up profile: ready Health, instant Prefill/Decode
    calls; records whether a client request of the registry was in flight at each call."""

    def __init__(self, registry: InstanceRegistry, instance_id: str) -> None:
        self._registry = registry
        self._id = instance_id
        self.calls_during_client_requests = 0
        self.calls = 0

    def _record(self) -> None:
        self.calls += 1
        if self._registry.get(self._id).num_requests > 0:
            self.calls_during_client_requests += 1

    async def health(self, *, timeout_s: float) -> WorkerHealth:
        return WorkerHealth(
            True, PREFILL, "m", 16, 256, 4, hardware="cpu/x", model_fingerprint=b"f"
        )

    async def prefill(self, **kwargs: Any) -> PrefillResult:
        self._record()
        await asyncio.sleep(0.001)
        n = len(kwargs["prompt_token_ids"])
        return PrefillResult(1, "", None, (), n, 0, 1e-3 + 1e-5 * n)

    async def close(self) -> None:
        pass


def test_the_profile_makes_no_call_while_a_client_request_runs() -> None:
    async def test() -> None:
        from controlplane.workers.profiling import ProfileSettings

        store = LocalRegistryStore()
        registry = InstanceRegistry(
            metrics=GatewayMetrics(),
            health_check_timeout_s=1.0,
            store=store,
            profile=ProfileSettings(max_model_len=256, max_batch=4, vocab_size=1000),
        )
        await registry.register_configured(PREFILL, ["127.0.0.1:10001"])
        instance = registry.get("w1")
        worker = ProfiledWorker(registry, "w1")
        instance.client = worker  # type: ignore[assignment]
        with registry.track_prefill(instance, 100):  # a client request in flight
            await registry.check_all()  # ready: the profile starts, and waits
            await asyncio.sleep(0.2)
            assert instance.profile_state == "running"
            assert worker.calls == 0
        for _ in range(500):
            if instance.profile_state != "running":
                break
            await asyncio.sleep(0.01)
        assert instance.profile_state == "done"
        assert worker.calls > 10 and worker.calls_during_client_requests == 0
        await registry.close()

    run(test)


class SlowProfiledWorker(ProfiledWorker):
    """Each call takes 0.3 s of real time: a host too busy for a full profile."""

    async def prefill(self, **kwargs: Any) -> PrefillResult:
        await asyncio.sleep(0.3)
        return await super().prefill(**kwargs)


def test_a_partial_profile_does_not_replace_a_siblings_full_one() -> None:
    async def test() -> None:
        from controlplane.workers.profiling import ProfileSettings

        registry = InstanceRegistry(
            metrics=GatewayMetrics(),
            health_check_timeout_s=1.0,
            store=LocalRegistryStore(),
            profile=ProfileSettings(max_model_len=256, max_batch=4, vocab_size=1000, budget_s=1.0),
        )

        async def profiled(instance: Any) -> None:
            await registry.check_all()
            for _ in range(300):
                if instance.profile_state != "running":
                    return
                await asyncio.sleep(0.01)

        await registry.register_configured(PREFILL, ["127.0.0.1:10001"])
        first = registry.get("w1")
        first.client = ProfiledWorker(registry, "w1")  # type: ignore[assignment]
        await profiled(first)
        await registry.register_configured(PREFILL, ["127.0.0.1:10002"])
        second = registry.get("w2")
        second.client = SlowProfiledWorker(registry, "w2")  # type: ignore[assignment]
        await profiled(second)
        assert first.profile_state == second.profile_state == "done"
        assert first.predictor.calibrated and second.predictor.calibrated
        # The second started from the first's profile and kept it: 3 calls in 1 s are too few.
        assert second.predictor.prefill_fit == first.predictor.prefill_fit
        assert registry.stats().extra["profiles_run"] == 2
        await registry.close()

    run(test)


def test_start_up_profiles_run_a_few_at_a_time_and_waiters_adopt_a_sibling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test() -> None:
        from controlplane.workers.profiling import ProfileSettings

        registry = InstanceRegistry(
            metrics=GatewayMetrics(),
            health_check_timeout_s=1.0,
            store=LocalRegistryStore(),
            profile=ProfileSettings(
                max_model_len=256, max_batch=4, vocab_size=1000, budget_s=2.0, concurrency=1
            ),
        )
        await registry.register_configured(PREFILL, [f"127.0.0.1:{10001 + i}" for i in range(3)])
        instances = [registry.get(f"w{n}") for n in (1, 2, 3)]
        order: list[str] = []  # whose call, call after call

        class Recording(ProfiledWorker):
            async def prefill(self, **kwargs: Any) -> PrefillResult:
                order.append(self._id)
                return await super().prefill(**kwargs)

        for instance in instances:
            instance.client = Recording(registry, instance.id)  # type: ignore[assignment]
        await registry.check_all()  # all three ready at once: their profiles start
        for _ in range(1000):
            if all(m.profile_state != "running" for m in instances):
                break
            await asyncio.sleep(0.01)
        assert [m.profile_state for m in instances] == ["done", "done", "done"]
        # One profile at a time (--profile-concurrency 1): each one's calls in one run.
        runs = [who for i, who in enumerate(order) if i == 0 or order[i - 1] != who]
        assert runs == ["w1", "w2", "w3"], runs
        assert registry.stats().extra["profiles_run"] == 3
        await registry.close()

    with caplog.at_level("INFO", logger="controlplane.instances.registry"):
        run(test)
    adopted = [
        r.getMessage() for r in caplog.records if "starts with the profile of" in r.getMessage()
    ]
    # The two that waited started with the first one's profile as soon as it landed.
    assert len(adopted) == 2 and all("of w1 " in m for m in adopted), adopted
