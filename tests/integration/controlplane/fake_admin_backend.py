"""FakeAdminBackend: a test double of controlplane.instances.types.AdminBackend (test code only).

It keeps instances in a dict and records every call, so admin-service and CLI tests can check
exactly what reached the backend. Its behaviour is the documented contract, simplified:

- ids are ``{role}-{n}`` in order of creation; ``add`` of a known endpoint → InstanceConflict;
- ``scale`` adds launched instances (endpoints 127.0.0.1:7000+n, state starting) or removes the
  newest launched ones of that role (InstanceConflict when that would stop an instance added
  by hand); ``drain`` → draining; ``remove`` forgets the instance;
- policies: round_robin, least_loaded, prefix_aware, slo_aware; another name → InvalidAdminRequest;
- ``fail_with``: the next call raises that exception (to test the INTERNAL path);
- ``planned_writes``: what ``scale`` and ``set_role`` add to their ``planned`` list (a dry-run
  launcher's requests not sent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane.instances.types import (
    ClusterStats,
    InstanceConflict,
    InstanceInfo,
    InstanceNotFound,
    InstanceState,
    InvalidAdminRequest,
)
from controlplane.workers.roles import WorkerRole

POLICIES = ("round_robin", "least_loaded", "prefix_aware", "slo_aware")


@dataclass
class FakeAdminBackend:
    instances: dict[str, InstanceInfo] = field(default_factory=dict)
    policy: str = "slo_aware"
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    fail_with: BaseException | None = None
    planned_writes: list[str] = field(default_factory=list)
    _next_n: int = 0

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc

    def _new(self, role: WorkerRole, endpoint: str, *, launched: bool) -> InstanceInfo:
        self._next_n += 1
        info = InstanceInfo(
            id=f"{role.name.lower()}-{self._next_n}",
            role=role,
            state=InstanceState.STARTING,
            endpoint=endpoint,
            launched=launched,
        )
        self.instances[info.id] = info
        return info

    def _get(self, instance_id: str) -> InstanceInfo:
        try:
            return self.instances[instance_id]
        except KeyError:
            raise InstanceNotFound(f"no instance {instance_id!r}") from None

    # -- AdminBackend --------------------------------------------------------------------------

    def list_instances(self) -> Sequence[InstanceInfo]:
        self._record("list_instances")
        return list(self.instances.values())

    async def add_instance(self, role: WorkerRole, endpoint: str) -> InstanceInfo:
        self._record("add_instance", role, endpoint)
        if any(i.endpoint == endpoint for i in self.instances.values()):
            raise InstanceConflict(f"{endpoint} is already registered")
        return self._new(role, endpoint, launched=False)

    async def drain(self, instance_id: str) -> InstanceInfo:
        self._record("drain", instance_id)
        info = replace(self._get(instance_id), state=InstanceState.DRAINING)
        self.instances[instance_id] = info
        return info

    async def remove(self, instance_id: str, *, wait_s: float) -> None:
        self._record("remove", instance_id, wait_s)
        self._get(instance_id)
        del self.instances[instance_id]

    async def set_role(
        self, instance_id: str, role: WorkerRole, *, planned: list[str] | None = None
    ) -> InstanceInfo:
        self._record("set_role", instance_id, role)
        if planned is not None:
            planned += self.planned_writes
        info = self._get(instance_id)
        if info.state is InstanceState.DEAD:
            raise InstanceConflict(f"{instance_id} is dead")
        info = replace(info, role=role)
        self.instances[instance_id] = info
        return info

    async def scale(
        self, role: WorkerRole, replicas: int, *, planned: list[str] | None = None
    ) -> Sequence[InstanceInfo]:
        self._record("scale", role, replicas)
        if planned is not None:
            planned += self.planned_writes
        current = [i for i in self.instances.values() if i.role is role]
        for _ in range(replicas - len(current)):
            self._new(role, f"127.0.0.1:{7000 + self._next_n + 1}", launched=True)
        excess = len(current) - replicas
        if excess > 0:
            launched = [i for i in current if i.launched]
            if excess > len(launched):
                raise InstanceConflict("cannot scale below the instances added by hand")
            for info in launched[-excess:]:
                del self.instances[info.id]
        return [i for i in self.instances.values() if i.role is role]

    def set_policy(self, name: str) -> None:
        self._record("set_policy", name)
        if name not in POLICIES:
            raise InvalidAdminRequest(f"unknown policy {name!r}")
        self.policy = name

    def stats(self) -> ClusterStats:
        self._record("stats")
        return ClusterStats(
            policy=self.policy,
            instances=tuple(self.instances.values()),
            requests_total=12,
            requests_rejected=3,
            requests_failed_over=1,
            predictor_ttft_mape=0.125,
            predictor_tpot_mape=None,
            extra={"decisions_per_s": 250.0},
        )
