"""KubeApiDouble: a TEST DOUBLE of the Kubernetes API server, for the Kubernetes launcher's tests.

It is not Kubernetes: a real HTTP server (aiohttp, loopback) that serves the few resources the
launcher (controlplane/launch/kubernetes.py) uses, with the API server's semantics where the
launcher depends on them, and records every request (method, path, query, body) so that a test
can compare the exact list:

- ``GET/PUT /apis/apps/v1/namespaces/NS/deployments/NAME/scale``: an ``autoscaling/v1`` Scale
  with ``status.selector``; a PUT whose ``metadata.resourceVersion`` is not the current one is
  refused 409 Conflict (``conflicts``: that many next PUTs meet a concurrent writer first,
  which sets ``replicas`` to ``concurrent_replicas`` when that is not None);
- ``GET /api/v1/namespaces/NS/pods?labelSelector=k=v,...``: equality selectors;
- ``PATCH /api/v1/namespaces/NS/pods/NAME`` (merge of ``metadata.annotations``) and
  ``DELETE`` of it (``preconditions.uid`` / ``resourceVersion`` checked: 409);
- a ReplicaSet's reaction to a new ``replicas``, at once: too many pods → it deletes them in
  the ReplicaSet's order (Pending before running, then the lower
  ``controller.kubernetes.io/pod-deletion-cost``, then the newer); too few → new Pending pods
  (no IP yet);
- RBAC: ``forbid`` holds (verb, resource) pairs answered 403 Forbidden with the API server's
  message naming the service account ``SERVICE_ACCOUNT``;
- ``fail_status``: every request answered with that status (e.g. 500, 503: a failing server).

Every object change bumps one global resourceVersion, as etcd's revision does. Test code only.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

SERVICE_ACCOUNT = "system:serviceaccount:strata:strata-gateway"
TOKEN = "test-double-token"
COST = "controller.kubernetes.io/pod-deletion-cost"


@dataclass(frozen=True)
class Request:
    """One request as the double received it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    """The parsed JSON body (None without one)."""


@dataclass
class Pod:
    name: str
    uid: str
    labels: dict[str, str]
    ip: str
    phase: str
    created: int
    resource_version: str
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self, namespace: str) -> dict[str, Any]:
        status: dict[str, Any] = {"phase": self.phase}
        if self.ip:
            status["podIP"] = self.ip
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": namespace,
                "uid": self.uid,
                "resourceVersion": self.resource_version,
                "labels": dict(self.labels),
                "annotations": dict(self.annotations),
            },
            "status": status,
        }


@dataclass
class Deployment:
    name: str
    replicas: int
    labels: dict[str, str]
    resource_version: str


class KubeApiDouble:
    """See the module docstring. ``start()`` returns the base URL; ``write_kubeconfig`` writes
    a kubeconfig for it."""

    def __init__(self, namespace: str = "strata") -> None:
        self.namespace = namespace
        self.requests: list[Request] = []
        self.deployments: dict[str, Deployment] = {}
        self.pods: dict[str, Pod] = {}
        self.forbid: set[tuple[str, str]] = set()
        self.conflicts = 0
        self.concurrent_replicas: int | None = None
        self.fail_status: int | None = None
        self.url = ""
        self._revision = itertools.count(100)
        self.revision = ""
        """The last resourceVersion handed out."""
        self._uids = itertools.count(1)
        self._created = itertools.count(1)
        self._runner: web.AppRunner | None = None

    # -- set-up ------------------------------------------------------------------------------

    def add_deployment(self, name: str, pod_ips: list[str], *, pending: int = 0) -> list[str]:
        """A Deployment with a running pod per IP and ``pending`` Pending pods; their names."""
        labels = {"app.kubernetes.io/name": "strata", "strata.dev/pool": name}
        self.deployments[name] = Deployment(
            name, len(pod_ips) + pending, labels, self._next_revision()
        )
        names = [self._new_pod(name, ip, "Running") for ip in pod_ips]
        return names + [self._new_pod(name, "", "Pending") for _ in range(pending)]

    def pod_names(self, deployment: str) -> list[str]:
        labels = self.deployments[deployment].labels
        return [p.name for p in self.pods.values() if p.labels == labels]

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "gateway", "user": {"token": TOKEN}}],
            "contexts": [
                {
                    "name": "double",
                    "context": {
                        "cluster": "double",
                        "user": "gateway",
                        "namespace": self.namespace,
                    },
                }
            ],
            "current-context": "double",
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- serving -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.requests.append(Request(request.method, request.path, dict(request.query), body))
        if self.fail_status is not None:
            return _status(self.fail_status, "InternalError", "etcdserver: request timed out")
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _status(401, "Unauthorized", "Unauthorized")
        parts = request.path.strip("/").split("/")
        ns_apps = ["apis", "apps", "v1", "namespaces", self.namespace, "deployments"]
        if parts[:6] == ns_apps and len(parts) == 8 and parts[7] == "scale":
            return self._scale(request.method, parts[6], body)
        if parts[:5] == ["api", "v1", "namespaces", self.namespace, "pods"]:
            if len(parts) == 5 and request.method == "GET":
                return self._list_pods(request.query.get("labelSelector", ""))
            if len(parts) == 6:
                return self._pod(request.method, parts[5], body)
        return _status(404, "NotFound", f"the server could not find {request.path}")

    def _forbidden(self, verb: str, resource: str, name: str, group: str) -> web.Response | None:
        if (verb, resource) not in self.forbid:
            return None
        kind = f"{resource.split('/')[0]}.{group}" if group else resource
        return _status(
            403,
            "Forbidden",
            f'{kind} "{name}" is forbidden: User "{SERVICE_ACCOUNT}" cannot {verb} resource '
            f'"{resource}" in API group "{group}" in the namespace "{self.namespace}"',
        )

    def _scale(self, method: str, name: str, body: Any) -> web.Response:
        verb = {"GET": "get", "PUT": "update"}.get(method)
        if verb is None:
            return _status(405, "MethodNotAllowed", method)
        refused = self._forbidden(verb, "deployments/scale", name, "apps")
        if refused is not None:
            return refused
        deployment = self.deployments.get(name)
        if deployment is None:
            return _status(404, "NotFound", f'deployments.apps "{name}" not found')
        if method == "PUT":
            if self.conflicts > 0:  # another writer got there first
                self.conflicts -= 1
                if self.concurrent_replicas is not None:
                    deployment.replicas = self.concurrent_replicas
                    self._reconcile(deployment)
                deployment.resource_version = self._next_revision()
            wanted = body["metadata"].get("resourceVersion")
            if wanted and wanted != deployment.resource_version:
                return _status(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on deployments.apps "{name}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                )
            deployment.replicas = int(body["spec"].get("replicas", 0))
            deployment.resource_version = self._next_revision()
            self._reconcile(deployment)
        return web.json_response(self._scale_json(deployment))

    def _scale_json(self, deployment: Deployment) -> dict[str, Any]:
        spec = {"replicas": deployment.replicas} if deployment.replicas else {}
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                "name": deployment.name,
                "namespace": self.namespace,
                "resourceVersion": deployment.resource_version,
            },
            "spec": spec,
            "status": {
                "replicas": len(self.pod_names(deployment.name)),
                "selector": ",".join(f"{k}={v}" for k, v in sorted(deployment.labels.items())),
            },
        }

    def _list_pods(self, selector: str) -> web.Response:
        refused = self._forbidden("list", "pods", "", "")
        if refused is not None:
            return refused
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        items = [
            p.to_json(self.namespace)
            for p in self.pods.values()
            if all(p.labels.get(k) == v for k, v in wanted.items())
        ]
        return web.json_response(
            {
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": {"resourceVersion": self.revision},
                "items": items,
            }
        )

    def _pod(self, method: str, name: str, body: Any) -> web.Response:
        verb = {"GET": "get", "PATCH": "patch", "DELETE": "delete"}.get(method)
        if verb is None:
            return _status(405, "MethodNotAllowed", method)
        refused = self._forbidden(verb, "pods", name, "")
        if refused is not None:
            return refused
        pod = self.pods.get(name)
        if pod is None:
            return _status(404, "NotFound", f'pods "{name}" not found')
        if method == "PATCH":
            annotations = (body.get("metadata") or {}).get("annotations") or {}
            for key, value in annotations.items():
                if value is None:
                    pod.annotations.pop(key, None)
                else:
                    pod.annotations[key] = value
            pod.resource_version = self._next_revision()
        elif method == "DELETE":
            preconditions = (body or {}).get("preconditions") or {}
            if preconditions.get("uid") not in (None, pod.uid) or preconditions.get(
                "resourceVersion"
            ) not in (None, pod.resource_version):
                return _status(409, "Conflict", f'Precondition failed for pod "{name}"')
            del self.pods[name]
        return web.json_response(pod.to_json(self.namespace))

    # -- the ReplicaSet ----------------------------------------------------------------------

    def _reconcile(self, deployment: Deployment) -> None:
        names = self.pod_names(deployment.name)
        excess = len(names) - deployment.replicas
        if excess > 0:

            def rank(name: str) -> tuple[int, int, int]:
                pod = self.pods[name]
                return (pod.phase != "Pending", int(pod.annotations.get(COST, "0")), -pod.created)

            for name in sorted(names, key=rank)[:excess]:
                del self.pods[name]
        for _ in range(-excess):
            self._new_pod(deployment.name, "", "Pending")

    def _new_pod(self, deployment: str, ip: str, phase: str) -> str:
        n = next(self._uids)
        name = f"{deployment}-{n:03d}"
        self.pods[name] = Pod(
            name=name,
            uid=f"uid-{n:03d}",
            labels=dict(self.deployments[deployment].labels),
            ip=ip,
            phase=phase,
            created=next(self._created),
            resource_version=self._next_revision(),
        )
        return name

    def _next_revision(self) -> str:
        self.revision = str(next(self._revision))
        return self.revision


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        },
        status=code,
    )
