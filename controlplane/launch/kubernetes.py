"""The Kubernetes launcher: `strata admin scale` and `set-role` change the prefill and decode
Deployments (docs/design/multihost.md §7).

A :class:`~controlplane.instances.types.PoolLauncher`: each pool is a Deployment whose pods run
`strata worker --announce ...` and register themselves (multihost.md §3); this launcher only
changes a Deployment's size through its ``scale`` subresource and removes chosen pods. The
registry (controlplane/instances/pools.py) decides what to change; this module says how, in
exactly these requests (namespace ``NS``, Deployment ``D``):

- read a pool's size: ``GET /apis/apps/v1/namespaces/NS/deployments/D/scale`` (its
  ``status.selector`` selects the pool's pods);
- change it: ``PUT`` of the same path, the Scale last read (or written) with its
  ``resourceVersion`` and the new ``spec.replicas``: a concurrent change makes it fail 409
  Conflict. A size the registry decided on that read (``set_replicas``) is then not written:
  :class:`~controlplane.instances.types.PoolChanged` sends the registry back to read and decide
  again; a relative change (one pod fewer, one more) is read again and applied to the new size,
  so a concurrent change is kept (at most
  :data:`~controlplane.instances.types.MAX_CONFLICT_RETRIES` retries, then an error);
- the pool's pods: ``GET /api/v1/namespaces/NS/pods?labelSelector=SELECTOR``;
- remove exactly one pod: ``PATCH`` it (merge patch) with the annotation
  ``controller.kubernetes.io/pod-deletion-cost: "-2147483648"``, then lower ``replicas`` by one
  as above: the ReplicaSet deletes the pod of lowest cost, this one. It deletes unscheduled,
  Pending and not-ready pods before any ready one whatever their cost, so the launcher then
  lists the pool until the pod is gone; when the pool is at its new size and the pod is still
  there (another pod went first), it deletes it itself (``DELETE`` with a ``uid``
  precondition) and logs so (the ReplicaSet then starts a replacement for the other).

Errors: 403 Forbidden → :class:`KubernetesForbidden` (an
:class:`~controlplane.instances.types.InstanceConflict`: FAILED_PRECONDITION on the admin API),
its message naming the verb, the resource, the namespace and the account refused; 404 on a
Deployment → :class:`KubernetesNotFound` (also a conflict: the flag names a Deployment that does
not exist); any other status, or an API server that cannot be reached →
:class:`~controlplane.instances.types.LauncherUnavailable` (UNAVAILABLE) with the status.

**Dry run** (``--k8s-dry-run true``): reads are sent, writes are not; each write is logged and
returned as one line ``METHOD PATH BODY`` (the body as compact JSON with sorted keys), which
`strata admin` prints (the admin replies' ``planned`` list). The writes of one plan are
cumulative: each planned size starts from the size the plan's earlier writes would have made
(a 3 → 1 scale-down plans ``replicas: 2`` then ``1``); a plan starts at the registry's next read
of a pool (its size or its pods).

Client library: ``kubernetes_asyncio`` (the official client's generated API, in asyncio on the
aiohttp the gateway already runs; each call is exactly one request, with no discovery round
trips). In a pod it uses the pod's service account (in-cluster config); elsewhere
``--k8s-kubeconfig PATH``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from controlplane.instances.types import (
    MAX_CONFLICT_RETRIES,
    InstanceConflict,
    LauncherUnavailable,
    PoolChanged,
    PoolPod,
)
from controlplane.launch.kubernetes_config import KubernetesConfig
from controlplane.workers.roles import WorkerRole

__all__ = [
    "DELETION_COST_ANNOTATION",
    "KubernetesForbidden",
    "KubernetesLauncher",
    "KubernetesNotFound",
]

logger = logging.getLogger("controlplane.launch.kubernetes")

T = TypeVar("T")

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
LOWEST_DELETION_COST = "-2147483648"
"""The lowest cost there is (an int32): the ReplicaSet removes this pod before its peers."""
_POLL_INTERVAL_S = 1.0
"""How often a removal looks whether the pod is gone."""
_USER = re.compile(r'User "([^"]+)"')


class KubernetesForbidden(InstanceConflict):
    """RBAC refused a request (403): the message names the verb, resource, namespace and account."""


class KubernetesNotFound(InstanceConflict):
    """A configured Deployment does not exist (404)."""


class _Conflict(Exception):
    """409: the object changed since it was read."""


@dataclass(frozen=True, slots=True)
class _Scale:
    replicas: int
    resource_version: str
    selector: str


class KubernetesLauncher:
    """A :class:`~controlplane.instances.types.PoolLauncher` over two Deployments (see the
    module docstring). ``sleep`` and ``clock`` time the wait for a removed pod to go (tests
    inject them)."""

    def __init__(
        self,
        config: KubernetesConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not config.enabled:
            raise ValueError("KubernetesLauncher needs k8s_namespace")
        self._config = config
        self._namespace = config.namespace
        self._sleep = sleep
        self._clock = clock
        self._api_client: k8s.ApiClient | None = None
        self._open_lock = asyncio.Lock()
        self._selectors: dict[WorkerRole, str] = {}
        """The pods of each pool (a Deployment's selector cannot change: cached once read)."""
        self._simulated: dict[WorkerRole, int] = {}
        """Dry run: the size each pool would have after the writes planned so far (module
        docstring)."""
        self._scales: dict[WorkerRole, _Scale] = {}
        """The last Scale read or written per pool: the next write starts from it (a stale one
        meets 409 Conflict and is read again), so a read and the write that follows it are two
        requests, not three."""

    @property
    def dry_run(self) -> bool:
        return self._config.dry_run

    def describe(self, role: WorkerRole) -> str:
        return f"Deployment {self._namespace}/{self._config.deployment(role)}"

    async def open(self) -> None:
        """Load the credentials (kubeconfig or the service account); the gateway calls it at
        start so that a missing config fails the start, not the first scale. Idempotent."""
        await self._api()

    async def close(self) -> None:
        if self._api_client is not None:
            await self._api_client.close()
            self._api_client = None

    # -- the PoolLauncher protocol ---------------------------------------------------------

    async def replicas(self, role: WorkerRole) -> int:
        self._simulated.clear()  # a new plan (dry run)
        return (await self._read_scale(role)).replicas

    async def pods(self, role: WorkerRole) -> Sequence[PoolPod]:
        self._simulated.clear()  # a new plan (dry run)
        return [_pool_pod(p) for p in await self._list_pods(role) if not _terminating(p)]

    async def set_replicas(self, role: WorkerRole, replicas: int) -> Sequence[str]:
        _, planned = await self._resize(role, lambda _current: replicas, retry=False)
        return planned

    async def add_replicas(self, role: WorkerRole, delta: int) -> Sequence[str]:
        _, planned = await self._resize(role, lambda current: max(0, current + delta))
        return planned

    async def remove(
        self, role: WorkerRole, pod: PoolPod, resized: Callable[[], None] | None = None
    ) -> Sequence[str]:
        planned: list[str] = []
        patch = {"metadata": {"annotations": {DELETION_COST_ANNOTATION: LOWEST_DELETION_COST}}}
        path = f"/api/v1/namespaces/{self._namespace}/pods/{pod.name}"
        if self.dry_run:
            planned.append(await self._plan("PATCH", path, patch))
        else:
            core = k8s.CoreV1Api(await self._api())
            try:  # a strategic merge patch (the client's choice for an object body)
                await self._call(
                    "patch",
                    "pods",
                    pod.name,
                    core.patch_namespaced_pod(
                        pod.name,
                        self._namespace,
                        patch,
                        _request_timeout=self._config.request_timeout_s,
                    ),
                )
            except KubernetesNotFound:
                logger.warning("pod %s is gone already; lowering %s", pod.name, self.describe(role))
        replicas, writes = await self._resize(role, lambda current: max(0, current - 1))
        planned += writes
        if not self.dry_run:
            if resized is not None:
                resized()
            await self._wait_gone(role, pod, replicas)
        return planned

    # -- requests ----------------------------------------------------------------------------

    async def _resize(
        self, role: WorkerRole, target: Callable[[int], int], *, retry: bool = True
    ) -> tuple[int, list[str]]:
        """Write ``target(replicas)`` against the pool's Scale last read (else read now), with
        its resourceVersion. On 409 Conflict: with ``retry`` (a relative ``target``) read and
        write again; without (an absolute one, decided on the read) :class:`PoolChanged`.
        Returns the replicas written and the planned write (dry run: planned against the
        size the plan's earlier writes would have made)."""
        name = self._config.deployment(role)
        path = f"/apis/apps/v1/namespaces/{self._namespace}/deployments/{name}/scale"
        for attempt in range(MAX_CONFLICT_RETRIES + 1):
            scale = self._scales.pop(role, None) if attempt == 0 else None
            if scale is None:
                scale = await self._read_scale(role)
            current = self._simulated.get(role, scale.replicas) if self.dry_run else scale.replicas
            replicas = target(current)
            if replicas == current:
                self._scales[role] = scale
                return replicas, []
            body = k8s.V1Scale(
                api_version="autoscaling/v1",
                kind="Scale",
                metadata=k8s.V1ObjectMeta(
                    name=name,
                    namespace=self._namespace,
                    resource_version=scale.resource_version,
                ),
                spec=k8s.V1ScaleSpec(replicas=replicas),
            )
            if self.dry_run:
                self._scales[role] = scale
                self._simulated[role] = replicas
                return replicas, [await self._plan("PUT", path, body)]
            apps = k8s.AppsV1Api(await self._api())
            try:
                written = await self._call(
                    "update",
                    "deployments/scale",
                    name,
                    apps.replace_namespaced_deployment_scale(
                        name, self._namespace, body, _request_timeout=self._config.request_timeout_s
                    ),
                )
            except _Conflict:
                if not retry:
                    raise PoolChanged(f"{self.describe(role)} changed since read") from None
                logger.info(
                    "%s changed since read (409, attempt %d): reading it again",
                    self.describe(role),
                    attempt + 1,
                )
                continue
            self._scales[role] = self._remember(role, written)
            logger.info("%s: replicas %d → %d", self.describe(role), scale.replicas, replicas)
            return replicas, []
        raise LauncherUnavailable(
            f"{self.describe(role)} changed under every one of {MAX_CONFLICT_RETRIES + 1} scale "
            "writes (409 Conflict: another writer, e.g. an autoscaler, is changing it); try again"
        )

    async def _read_scale(self, role: WorkerRole) -> _Scale:
        name = self._config.deployment(role)
        apps = k8s.AppsV1Api(await self._api())
        scale = await self._call(
            "get",
            "deployments/scale",
            name,
            apps.read_namespaced_deployment_scale(
                name, self._namespace, _request_timeout=self._config.request_timeout_s
            ),
        )
        self._scales[role] = read = self._remember(role, scale)
        return read

    def _remember(self, role: WorkerRole, scale: Any) -> _Scale:
        """A Scale from the API server (its selector cached)."""
        selector = (scale.status.selector if scale.status is not None else None) or ""
        if selector:
            self._selectors[role] = selector
        spec_replicas = scale.spec.replicas if scale.spec is not None else None
        return _Scale(
            replicas=spec_replicas or 0,
            resource_version=scale.metadata.resource_version or "",
            selector=selector,
        )

    async def _list_pods(self, role: WorkerRole) -> list[Any]:
        selector = self._selectors.get(role)
        if selector is None:
            selector = (await self._read_scale(role)).selector
        if not selector:
            raise LauncherUnavailable(f"{self.describe(role)} reports no pod selector yet")
        core = k8s.CoreV1Api(await self._api())
        pods = await self._call(
            "list",
            "pods",
            "",
            core.list_namespaced_pod(
                self._namespace,
                label_selector=selector,
                _request_timeout=self._config.request_timeout_s,
            ),
        )
        return list(pods.items or [])

    async def _wait_gone(self, role: WorkerRole, pod: PoolPod, replicas: int) -> None:
        """Until ``pod`` no longer exists (module docstring): deleted by the ReplicaSet, or by
        this launcher when the pool reached ``replicas`` without it."""
        deadline = self._clock() + self._config.removal_timeout_s
        deleted = False
        while True:
            listed = await self._list_pods(role)
            mine = next((p for p in listed if p.metadata.uid == pod.uid), None)
            if mine is None:
                return
            live = [p for p in listed if not _terminating(p)]
            if not _terminating(mine) and not deleted and len(live) <= replicas:
                logger.warning(
                    "%s is at %d pods but kept pod %s (another pod, not ready, went first): "
                    "deleting it",
                    self.describe(role),
                    replicas,
                    pod.name,
                )
                await self._delete_pod(pod)
                deleted = True
                continue
            if self._clock() >= deadline:
                logger.warning(
                    "pod %s of %s still exists %g s after its removal",
                    pod.name,
                    self.describe(role),
                    self._config.removal_timeout_s,
                )
                return
            await self._sleep(_POLL_INTERVAL_S)

    async def _delete_pod(self, pod: PoolPod) -> None:
        core = k8s.CoreV1Api(await self._api())
        try:
            await self._call(
                "delete",
                "pods",
                pod.name,
                core.delete_namespaced_pod(
                    pod.name,
                    self._namespace,
                    body=k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(uid=pod.uid)),
                    _request_timeout=self._config.request_timeout_s,
                ),
            )
        except (KubernetesNotFound, _Conflict):
            return  # gone meanwhile (or a new pod of that name: not ours)

    async def _call(self, verb: str, resource: str, name: str, request: Awaitable[T]) -> T:
        """``request``, its failures mapped to the admin errors (module docstring)."""
        try:
            return await request
        except ApiException as exc:
            status = exc.status
            message = _status_message(exc)
            if status == 409:
                raise _Conflict(message) from None
            where = f"{resource} {name!r}" if name else resource
            if status == 403:
                user = _USER.search(message)
                who = user.group(1) if user else self._account()
                raise KubernetesForbidden(
                    f"Kubernetes RBAC forbids {who} to {verb} {where} in namespace "
                    f"{self._namespace}: the gateway's Role needs verb {verb!r} on {resource!r} "
                    f"(docs/design/multihost.md §7); API server: {message}"
                ) from None
            if status == 404 and resource.startswith("deployments"):
                raise KubernetesNotFound(
                    f"no Deployment {name!r} in namespace {self._namespace} "
                    f"(--k8s-namespace, --k8s-prefill-deployment, --k8s-decode-deployment): "
                    f"{message}"
                ) from None
            if status == 404:
                raise KubernetesNotFound(f"{where} not found: {message}") from None
            raise LauncherUnavailable(
                f"Kubernetes API: {verb} {where} in namespace {self._namespace} failed: "
                f"{status} {exc.reason}: {message}"
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            host = self._api_client.configuration.host if self._api_client else "?"
            raise LauncherUnavailable(
                f"cannot reach the Kubernetes API at {host} ({verb} {resource} in namespace "
                f"{self._namespace}): {type(exc).__name__}: {exc}"
            ) from None

    async def _api(self) -> k8s.ApiClient:
        async with self._open_lock:
            if self._api_client is None:
                path = self._config.kubeconfig
                try:
                    if path is not None:
                        self._api_client = await k8s_config.new_client_from_config(
                            config_file=str(path), persist_config=False
                        )
                    else:
                        configuration = k8s.Configuration()
                        k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                            client_configuration=configuration
                        )
                        self._api_client = k8s.ApiClient(configuration=configuration)
                except (ConfigException, OSError) as exc:
                    where = f"kubeconfig {path}" if path else "in-cluster service account"
                    raise LauncherUnavailable(
                        f"Kubernetes credentials ({where}) unusable: {exc}; outside a pod give "
                        "--k8s-kubeconfig PATH"
                    ) from None
            return self._api_client

    def _account(self) -> str:
        path = self._config.kubeconfig
        return f"the user of kubeconfig {path}" if path else "the gateway's service account"

    async def _plan(self, method: str, path: str, body: object) -> str:
        """The line of a write not sent: its body as the client would serialize it."""
        sent = (await self._api()).sanitize_for_serialization(body)
        line = f"{method} {path} {json.dumps(sent, sort_keys=True, separators=(',', ':'))}"
        logger.info("dry run: not sent: %s", line)
        return line


def _terminating(pod: Any) -> bool:
    return pod.metadata.deletion_timestamp is not None


def _pool_pod(pod: Any) -> PoolPod:
    status = pod.status
    return PoolPod(
        name=pod.metadata.name,
        uid=pod.metadata.uid or "",
        ip=(status.pod_ip if status is not None else None) or "",
        phase=(status.phase if status is not None else None) or "",
    )


def _status_message(exc: ApiException) -> str:
    """The ``message`` of the API server's Status body, else the raw body."""
    raw = exc.body
    body = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        return str(body)[:500]
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        return str(parsed["message"])
    return str(body)[:500]
