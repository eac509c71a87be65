"""The Kubernetes launcher against a test double of the API server (issue 12, acceptance 6).

The registry (with scripted workers: real gRPC servers on 127.0.0.x addresses standing for pod
IPs, so a drain really waits for the in-flight counters) drives the real
:class:`KubernetesLauncher`, which reaches :class:`KubeApiDouble` through a kubeconfig written
here. Each test compares the exact list of requests the double received
(docs/design/multihost.md §7).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tokenizers import Tokenizer

from controlplane.instances.instance import Instance
from controlplane.instances.registry import InstanceRegistry
from controlplane.instances.store import LocalRegistryStore
from controlplane.instances.types import InstanceState, LauncherUnavailable
from controlplane.launch.kubernetes import KubernetesForbidden, KubernetesLauncher
from controlplane.launch.kubernetes_config import KubernetesConfig
from controlplane.metrics import GatewayMetrics
from controlplane.workers.roles import WorkerRole
from tests.integration.controlplane.kube_api_double import (
    COST,
    SERVICE_ACCOUNT,
    KubeApiDouble,
)
from tests.integration.controlplane.scripted_worker import ScriptedWorker, default_script

T = TypeVar("T")
PREFILL, DECODE = WorkerRole.PREFILL, WorkerRole.DECODE
NS = "strata"
PODS = f"/api/v1/namespaces/{NS}/pods"
WRITES = {"PUT", "PATCH", "POST", "DELETE"}


def scale_path(deployment: str) -> str:
    return f"/apis/apps/v1/namespaces/{NS}/deployments/{deployment}/scale"


def get_scale(deployment: str) -> tuple[Any, ...]:
    return ("GET", scale_path(deployment), {}, None)


def put_scale(deployment: str, resource_version: str, replicas: int) -> tuple[Any, ...]:
    body = {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": deployment, "namespace": NS, "resourceVersion": resource_version},
        "spec": {"replicas": replicas},
    }
    return ("PUT", scale_path(deployment), {}, body)


def list_pods(deployment: str) -> tuple[Any, ...]:
    selector = f"app.kubernetes.io/name=strata,strata.dev/pool={deployment}"
    return ("GET", PODS, {"labelSelector": selector}, None)


def patch_cost(pod: str) -> tuple[Any, ...]:
    return ("PATCH", f"{PODS}/{pod}", {}, {"metadata": {"annotations": {COST: "-2147483648"}}})


def delete_pod(pod: str, uid: str) -> tuple[Any, ...]:
    return ("DELETE", f"{PODS}/{pod}", {}, {"preconditions": {"uid": uid}})


def planned_line(request: tuple[Any, ...]) -> str:
    """The dry run's line for a request (what the launcher prints instead of sending it)."""
    method, path, _, body = request
    return f"{method} {path} {json.dumps(body, sort_keys=True, separators=(',', ':'))}"


@dataclass
class Cluster:
    api: KubeApiDouble
    registry: InstanceRegistry
    launcher: KubernetesLauncher
    pods: dict[str, str]
    """Pod name by its IP (the running pods set up)."""

    def requests(self) -> list[tuple[Any, ...]]:
        return [(r.method, r.path, r.query, r.body) for r in self.api.requests]

    def instance_at(self, ip: str) -> Instance:
        (instance,) = [
            self.registry.get(i.id)
            for i in self.registry.list_instances()
            if i.endpoint.startswith(f"{ip}:")
        ]
        return instance


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path,
    tokenizer: Tokenizer,
    *,
    prefill: list[str],
    decode: list[str],
    decode_pending: int = 0,
    dry_run: bool = False,
) -> AsyncIterator[Cluster]:
    """The double with a prefill and a decode Deployment (a running pod per IP), a scripted
    worker per pod registered in a registry whose pool launcher is the Kubernetes launcher."""
    api = KubeApiDouble(NS)
    await api.start()
    names = api.add_deployment("strata-prefill", prefill)
    names += api.add_deployment("strata-decode", decode, pending=decode_pending)
    launcher = KubernetesLauncher(
        KubernetesConfig(
            namespace=NS, kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig"), dry_run=dry_run
        )
    )
    registry = InstanceRegistry(
        metrics=GatewayMetrics(),
        health_check_timeout_s=5.0,
        store=LocalRegistryStore(),
        pool_launcher=launcher,
        drain_timeout_s=60.0,
    )
    workers = []
    try:
        for role, ips in ((PREFILL, prefill), (DECODE, decode)):
            for ip in ips:
                worker = ScriptedWorker(role.value, default_script(tokenizer), tokenizer)
                workers.append(worker)
                info = await registry.add_instance(role, await worker.start(host=ip))
                assert info.state is InstanceState.READY
        api.requests.clear()
        yield Cluster(api, registry, launcher, dict(zip(prefill + decode, names, strict=False)))
    finally:
        await registry.close()
        await launcher.close()
        for worker in workers:
            await worker.stop()
        await api.stop()


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 60.0))


async def until(condition: Callable[[], bool]) -> None:
    """Wait (event-driven, polled) for ``condition``; the test's own timeout bounds it."""
    while not condition():
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def busy(c: Cluster, ip: str, requests: int) -> Iterator[None]:
    """``requests`` decodes in flight on the worker at ``ip``, as the gateway counts them."""
    with contextlib.ExitStack() as stack:
        for _ in range(requests):
            stack.enter_context(c.registry.track_decode(c.instance_at(ip), 10, 10))
        yield


def test_scale_up_sets_replicas(tmp_path: Path, tokenizer: Tokenizer) -> None:
    async def test() -> None:
        async with cluster(tmp_path, tokenizer, prefill=["127.0.0.2"], decode=["127.0.0.3"]) as c:
            rv = c.api.deployments["strata-decode"].resource_version
            infos = await c.registry.scale(DECODE, 3)
            assert c.requests() == [get_scale("strata-decode"), put_scale("strata-decode", rv, 3)]
            assert [i.endpoint.split(":")[0] for i in infos] == ["127.0.0.3"]  # the new announce
            assert len(c.api.pod_names("strata-decode")) == 3
            c.api.requests.clear()
            await c.registry.scale(DECODE, 3)  # already so: read only
            assert c.requests() == [get_scale("strata-decode")]

    run(test)


def test_scale_down_drains_then_removes_exactly_the_chosen_pod(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    """Three decode pods, the oldest least loaded: it is chosen, drained, and only once its
    last request ends is it removed — by the ReplicaSet, which without the deletion cost would
    have removed the newest."""

    async def test() -> None:
        ips = ["127.0.0.3", "127.0.0.4", "127.0.0.5"]
        async with cluster(tmp_path, tokenizer, prefill=["127.0.0.2"], decode=ips) as c:
            rv = c.api.deployments["strata-decode"].resource_version
            chosen = c.instance_at("127.0.0.3")
            with busy(c, "127.0.0.4", 2), busy(c, "127.0.0.5", 2):
                with busy(c, "127.0.0.3", 1):
                    await c.registry.scale(DECODE, 2)
                    # Chosen and drained; nothing written while its request runs.
                    assert c.requests() == [get_scale("strata-decode"), list_pods("strata-decode")]
                    assert chosen.state is InstanceState.DRAINING
                    for _ in range(20):
                        await asyncio.sleep(0)
                    assert c.pods["127.0.0.3"] in c.api.pods
                await until(lambda: chosen.forgotten)
            assert c.requests() == [
                get_scale("strata-decode"),
                list_pods("strata-decode"),
                patch_cost(c.pods["127.0.0.3"]),
                put_scale("strata-decode", rv, 2),  # with the Scale read first
                list_pods("strata-decode"),
            ]
            assert c.api.pod_names("strata-decode") == [c.pods["127.0.0.4"], c.pods["127.0.0.5"]]
            assert sorted(i.endpoint.split(":")[0] for i in c.registry.list_instances()) == [
                "127.0.0.2",
                "127.0.0.4",
                "127.0.0.5",
            ]

    run(test)


def test_scale_down_removes_pods_not_serving_yet_first(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    """A Pending pod (no worker announced yet) goes before any serving worker is drained."""

    async def test() -> None:
        async with cluster(
            tmp_path, tokenizer, prefill=["127.0.0.2"], decode=["127.0.0.3"], decode_pending=1
        ) as c:
            rv = c.api.deployments["strata-decode"].resource_version
            await c.registry.scale(DECODE, 1)
            assert c.requests() == [
                get_scale("strata-decode"),
                list_pods("strata-decode"),
                put_scale("strata-decode", rv, 1),
            ]
            assert c.api.pod_names("strata-decode") == [c.pods["127.0.0.3"]]
            assert c.instance_at("127.0.0.3").state is InstanceState.READY

    run(test)


def test_chosen_pod_kept_by_the_replicaset_is_deleted(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """While the chosen worker drains, the pool grows (an autoscaler): the ReplicaSet removes
    the new Pending pod before the chosen one, and the launcher deletes the chosen pod itself."""

    async def test() -> None:
        ips = ["127.0.0.3", "127.0.0.4"]
        async with cluster(tmp_path, tokenizer, prefill=["127.0.0.2"], decode=ips) as c:
            chosen = c.instance_at("127.0.0.3")
            name = c.pods["127.0.0.3"]
            uid = c.api.pods[name].uid
            first_rv = c.api.deployments["strata-decode"].resource_version
            with busy(c, "127.0.0.4", 1), busy(c, "127.0.0.3", 1):
                await c.registry.scale(DECODE, 1)
                deployment = c.api.deployments["strata-decode"]
                deployment.replicas = 3  # someone else scales up meanwhile
                c.api._reconcile(deployment)
                deployment.resource_version = rv = c.api._next_revision()
            await until(lambda: chosen.forgotten)
            assert c.requests() == [
                get_scale("strata-decode"),
                list_pods("strata-decode"),
                patch_cost(name),
                put_scale("strata-decode", first_rv, 1),  # 409: changed since read
                get_scale("strata-decode"),
                put_scale("strata-decode", rv, 2),
                list_pods("strata-decode"),
                delete_pod(name, uid),
                list_pods("strata-decode"),
            ]
            assert c.api.pod_names("strata-decode") == [c.pods["127.0.0.4"]]

    run(test)


def test_set_role_moves_a_worker_to_the_other_pool(tmp_path: Path, tokenizer: Tokenizer) -> None:
    async def test() -> None:
        ips = ["127.0.0.3", "127.0.0.4"]
        async with cluster(tmp_path, tokenizer, prefill=["127.0.0.2"], decode=ips) as c:
            decode_rv = c.api.deployments["strata-decode"].resource_version
            prefill_rv = c.api.deployments["strata-prefill"].resource_version
            moved = c.instance_at("127.0.0.3")
            info = await c.registry.set_role(moved.id, PREFILL)
            assert c.requests() == [  # the other pool grows first
                get_scale("strata-decode"),
                list_pods("strata-decode"),
                get_scale("strata-prefill"),
                put_scale("strata-prefill", prefill_rv, 2),
                patch_cost(c.pods["127.0.0.3"]),
                put_scale("strata-decode", decode_rv, 1),
                list_pods("strata-decode"),
            ]
            assert (info.id, info.role, info.state, info.endpoint) == (
                "",
                PREFILL,
                InstanceState.STARTING,
                "",
            )
            assert info.detail == (
                "a new pod of Deployment strata/strata-prefill (one more replica): listed once "
                "it announces itself"
            )
            assert moved.forgotten
            assert c.api.pod_names("strata-decode") == [c.pods["127.0.0.4"]]
            assert len(c.api.pod_names("strata-prefill")) == 2

    run(test)


def test_a_conflict_is_read_again_and_retried(tmp_path: Path, tokenizer: Tokenizer) -> None:
    async def test() -> None:
        async with cluster(tmp_path, tokenizer, prefill=["127.0.0.2"], decode=["127.0.0.3"]) as c:
            rv = c.api.deployments["strata-decode"].resource_version
            c.api.conflicts = 1  # another writer changes it between our read and our write
            newer = str(int(c.api.revision) + 1)  # the resourceVersion the other writer makes
            await c.registry.scale(DECODE, 2)
            assert c.requests() == [
                get_scale("strata-decode"),
                put_scale("strata-decode", rv, 2),  # 409
                get_scale("strata-decode"),
                put_scale("strata-decode", newer, 2),
            ]
            assert c.api.deployments["strata-decode"].replicas == 2

            c.api.requests.clear()
            c.api.conflicts = 6  # never gets through: at most 5 retries, then an error
            with pytest.raises(LauncherUnavailable, match="changed under every one of 6 scale"):
                await c.registry.scale(DECODE, 3)
            assert [r[0] for r in c.requests()] == ["GET", "PUT"] * 6
            assert c.api.deployments["strata-decode"].replicas == 2

    run(test)


def test_a_size_changed_between_read_and_write_is_decided_again(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    """1 → 2 while another writer makes it 3 (two Pending pods): the absolute 2, decided on
    the stale read, is not written; read again, the pool is above 2 and the excess is a
    place no worker fills, lowered relative to the new size."""

    async def test() -> None:
        async with cluster(tmp_path, tokenizer, prefill=["127.0.0.2"], decode=["127.0.0.3"]) as c:
            rv = c.api.deployments["strata-decode"].resource_version
            c.api.conflicts, c.api.concurrent_replicas = 1, 3
            await c.registry.scale(DECODE, 2)
            newer = c.api.deployments["strata-decode"].resource_version
            assert c.requests() == [
                get_scale("strata-decode"),
                put_scale("strata-decode", rv, 2),  # 409: the other writer made it 3
                get_scale("strata-decode"),
                list_pods("strata-decode"),
                put_scale("strata-decode", str(int(newer) - 1), 2),
            ]
            assert c.api.deployments["strata-decode"].replicas == 2
            assert c.instance_at("127.0.0.3").state is InstanceState.READY

    run(test)


def test_a_dry_run_plans_several_removals_cumulatively(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    async def test() -> None:
        ips = ["127.0.0.3", "127.0.0.4", "127.0.0.5"]
        async with cluster(
            tmp_path, tokenizer, prefill=["127.0.0.2"], decode=ips, dry_run=True
        ) as c:
            rv = c.api.deployments["strata-decode"].resource_version
            planned: list[str] = []
            with busy(c, "127.0.0.5", 1):
                await c.registry.scale(DECODE, 1, planned=planned)
            assert planned == [
                planned_line(patch_cost(c.pods["127.0.0.3"])),
                planned_line(put_scale("strata-decode", rv, 2)),
                planned_line(patch_cost(c.pods["127.0.0.4"])),
                planned_line(put_scale("strata-decode", rv, 1)),
            ]
            planned = []
            await c.registry.scale(DECODE, 2, planned=planned)  # a new plan: from the real 3
            assert planned == [
                planned_line(patch_cost(c.pods["127.0.0.3"])),
                planned_line(put_scale("strata-decode", rv, 2)),
            ]
            assert not [r for r in c.requests() if r[0] in WRITES]

    run(test)


def test_rbac_refusal_names_what_is_missing(tmp_path: Path, tokenizer: Tokenizer) -> None:
    async def test() -> None:
        async with cluster(tmp_path, tokenizer, prefill=["127.0.0.2"], decode=["127.0.0.3"]) as c:
            rv = c.api.deployments["strata-decode"].resource_version
            c.api.forbid.add(("update", "deployments/scale"))
            with pytest.raises(KubernetesForbidden) as refused:
                await c.registry.scale(DECODE, 2)
            message = str(refused.value)
            assert message.startswith(
                f"Kubernetes RBAC forbids {SERVICE_ACCOUNT} to update deployments/scale "
                "'strata-decode' in namespace strata: the gateway's Role needs verb 'update' on "
                "'deployments/scale'"
            )
            assert c.requests() == [get_scale("strata-decode"), put_scale("strata-decode", rv, 2)]

            c.api.requests.clear()
            c.api.forbid = {("list", "pods")}
            with pytest.raises(KubernetesForbidden, match="to list pods in namespace strata"):
                await c.registry.scale(DECODE, 0)
            assert c.instance_at("127.0.0.3").state is InstanceState.READY  # nothing drained

    run(test)


def test_dry_run_sends_no_write_and_changes_nothing(tmp_path: Path, tokenizer: Tokenizer) -> None:
    async def test() -> None:
        ips = ["127.0.0.3", "127.0.0.4"]
        async with cluster(
            tmp_path, tokenizer, prefill=["127.0.0.2"], decode=ips, dry_run=True
        ) as c:
            decode_rv = c.api.deployments["strata-decode"].resource_version
            prefill_rv = c.api.deployments["strata-prefill"].resource_version
            pods_before = dict(c.api.pods)
            planned: list[str] = []
            await c.registry.scale(DECODE, 3, planned=planned)
            assert planned == [planned_line(put_scale("strata-decode", decode_rv, 3))]

            planned = []
            with busy(c, "127.0.0.4", 1):
                await c.registry.scale(DECODE, 1, planned=planned)
            assert planned == [
                planned_line(patch_cost(c.pods["127.0.0.3"])),
                planned_line(put_scale("strata-decode", decode_rv, 1)),
            ]

            planned = []
            moved = c.instance_at("127.0.0.4").id
            info = await c.registry.set_role(moved, PREFILL, planned=planned)
            assert planned == [
                planned_line(put_scale("strata-prefill", prefill_rv, 2)),
                planned_line(patch_cost(c.pods["127.0.0.4"])),
                planned_line(put_scale("strata-decode", decode_rv, 1)),
            ]
            assert info.detail.startswith("dry run: a new pod of Deployment strata/strata-prefill")

            assert not [r for r in c.requests() if r[0] in WRITES]
            assert c.api.pods == pods_before
            assert {i.state for i in c.registry.list_instances()} == {InstanceState.READY}

    run(test)


def test_remove_of_a_pool_member_removes_its_pod(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """Without its pod going too, the worker would announce itself again and come back."""

    async def test() -> None:
        ips = ["127.0.0.3", "127.0.0.4"]
        async with cluster(tmp_path, tokenizer, prefill=["127.0.0.2"], decode=ips) as c:
            rv = c.api.deployments["strata-decode"].resource_version
            removed = c.instance_at("127.0.0.4")
            await c.registry.remove(removed.id, wait_s=5.0)
            assert c.requests() == [
                get_scale("strata-decode"),  # its selector
                list_pods("strata-decode"),
                patch_cost(c.pods["127.0.0.4"]),
                put_scale("strata-decode", rv, 1),
                list_pods("strata-decode"),
            ]
            assert removed.forgotten
            assert c.api.pod_names("strata-decode") == [c.pods["127.0.0.3"]]

    run(test)


def test_a_second_scale_down_counts_the_removals_under_way(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    """3 → 2 while the chosen worker still drains (replicas still 3), then 2 → 1: one more is
    chosen, not two; and 1 → 2 meanwhile would set replicas to 2 plus the removals under way."""

    async def test() -> None:
        ips = ["127.0.0.3", "127.0.0.4", "127.0.0.5"]
        async with cluster(tmp_path, tokenizer, prefill=["127.0.0.2"], decode=ips) as c:
            rv = c.api.deployments["strata-decode"].resource_version
            first, second = c.instance_at("127.0.0.3"), c.instance_at("127.0.0.4")
            with busy(c, "127.0.0.3", 1), busy(c, "127.0.0.4", 2), busy(c, "127.0.0.5", 3):
                await c.registry.scale(DECODE, 2)
                await c.registry.scale(DECODE, 1)
                assert (first.state, second.state) == (InstanceState.DRAINING,) * 2
                assert c.instance_at("127.0.0.5").state is InstanceState.READY
                assert c.requests() == [
                    get_scale("strata-decode"),
                    list_pods("strata-decode"),
                    get_scale("strata-decode"),
                    list_pods("strata-decode"),
                ]
                c.api.requests.clear()
                await c.registry.scale(DECODE, 2)  # back up: 2 + the 2 being removed
                assert c.requests() == [
                    get_scale("strata-decode"),
                    put_scale("strata-decode", rv, 4),
                ]
            await until(lambda: first.forgotten and second.forgotten)
            assert c.instance_at("127.0.0.5").state is InstanceState.READY
            assert c.api.deployments["strata-decode"].replicas == 2

    run(test)


def test_a_failing_or_unreachable_api_server_is_unavailable(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    async def test() -> None:
        async with cluster(tmp_path, tokenizer, prefill=["127.0.0.2"], decode=["127.0.0.3"]) as c:
            c.api.fail_status = 500
            with pytest.raises(LauncherUnavailable) as failed:
                await c.registry.scale(DECODE, 2)
            assert str(failed.value) == (
                "Kubernetes API: get deployments/scale 'strata-decode' in namespace strata "
                "failed: 500 Internal Server Error: etcdserver: request timed out"
            )
            url = c.api.url
            await c.api.stop()  # gone: nothing listens there any more
            with pytest.raises(LauncherUnavailable) as failed:
                await c.registry.scale(DECODE, 2)
            assert str(failed.value).startswith(
                f"cannot reach the Kubernetes API at {url} (get deployments/scale in namespace "
                "strata): ClientConnectorError"
            )

    run(test)
