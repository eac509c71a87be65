"""The instance registry: every prefill and decode worker this gateway may use, its state, its load;
and the gateway's :class:`~controlplane.instances.types.AdminBackend`.

One owner: the registry alone changes instance state; the gateway reads immutable snapshots and
reports what it saw through `report_failure`, the load trackers and `note_failover`. It is built
in layers, one file each: ``state`` (records, states and heartbeats: the state machine, written
out in that module), ``load`` (in-flight counters), ``predictors`` (the policy, the latency
models, their feeding and the start-up profiles), ``supervision`` (launching, and replacing
launched workers that stop serving), ``pools`` (scaling pools that something else runs:
Kubernetes Deployments) and this module, the admin backend (add, drain, remove,
set-role, scale, policy, stats). :class:`InstanceRegistry` is the one object the gateway
holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from controlplane.instances.instance import Instance
from controlplane.instances.pools import PoolScaling
from controlplane.instances.state import SERVING_ROLES
from controlplane.instances.store import RegistryStoreError
from controlplane.instances.types import (
    ClusterStats,
    InstanceConflict,
    InstanceInfo,
    InstanceState,
    InvalidAdminRequest,
)
from controlplane.workers.client import WorkerClient, WorkerError, WorkerHealth
from controlplane.workers.roles import WorkerRole, role_name
from strata_common.endpoints import EndpointError, parse_endpoint

__all__ = ["InstanceRegistry"]

logger = logging.getLogger("controlplane.instances.registry")


class InstanceRegistry(PoolScaling):
    """The instances, their state and load; the gateway's `AdminBackend`.

    Keyword arguments: ``metrics``, ``health_check_timeout_s``, ``store``, ``launcher``,
    ``drain_timeout_s``, ``clock``, ``worker_auth``, ``announcement_grace_s``
    (:class:`InstanceStates`); ``policy_names``,
    ``policy``, ``scheduling``, ``profile`` (:class:`SchedulingState`); ``restart``, ``sleep``
    (:class:`Supervision`); ``pool_launcher`` (:class:`PoolScaling`)."""

    def list_instances(self) -> Sequence[InstanceInfo]:
        return [self._info_with_note(m) for m in self._instances.values()]

    async def add_instance(self, role: WorkerRole, endpoint: str) -> InstanceInfo:
        _check_role(role)
        try:
            endpoint = str(parse_endpoint(endpoint))
        except EndpointError as exc:
            raise InvalidAdminRequest(str(exc)) from None
        for m in self._instances.values():
            if m.endpoint == endpoint:
                raise InstanceConflict(f"{endpoint} is already registered as {m.id}")
        # One Health call now, so that a worker of the wrong kind is refused rather than listed
        # as dead forever; an unreachable one may still be starting and is accepted.
        probe = WorkerClient(endpoint, auth=self._worker_auth)
        try:
            health: WorkerHealth | None = await probe.health(timeout_s=self._health_check_timeout_s)
        except WorkerError:
            health = None
        finally:
            await probe.close()
        if health is not None:
            problem = self._health_problem(role, health)
            if problem is not None:
                raise InvalidAdminRequest(
                    f"worker {endpoint} cannot serve {role_name(role)}: {problem}"
                )
        record, created = await self._store.register(role, endpoint, launched=False)
        if not created:
            raise InstanceConflict(f"{endpoint} is already registered as {record.id}")
        instance = self._adopt(record)
        if health is not None:
            self._apply_health(instance, health)
        logger.info("instance %s (%s %s) added", instance.id, role_name(role), endpoint)
        return instance.info()

    async def drain(self, instance_id: str) -> InstanceInfo:
        instance = self.get(instance_id)
        await self._drain(instance)
        return instance.info()

    async def remove(self, instance_id: str, *, wait_s: float) -> None:
        if not wait_s >= 0:
            raise InvalidAdminRequest(f"wait_s must be >= 0, got {wait_s}")
        instance = self.get(instance_id)
        if await self._remove_pool_member(instance, wait_s):
            return
        if instance.announced and instance.endpoint in (await self._store.announcements() or {}):
            raise InstanceConflict(
                f"instance {instance.id} ({instance.endpoint}) announces itself in the registry: "
                "removed, it would be registered again at the next round; stop the worker (its "
                "SIGTERM withdraws the announcement, and every gateway drains and removes it), "
                "or drain it to keep it unused"
            )
        await self.drain(instance_id)
        await self._wait_idle(instance, wait_s)
        await self._store.delete(instance.id)
        self._forget(instance, stop_after_s=0.0)

    async def set_role(
        self, instance_id: str, role: WorkerRole, *, planned: list[str] | None = None
    ) -> InstanceInfo:
        """Change the role an instance serves.

        - a worker started with ``--role both`` (it reports BOTH): switched in place;
        - with a pool launcher, a pod of its role's pool: drained, its pod removed, the other
          pool one larger; the new member *as planned* is returned (no id yet:
          controlplane/instances/pools.py), and a dry run's writes are added to ``planned``;
        - a worker this gateway's launcher started: drained (up to the drain timeout), stopped,
          and a new worker of ``role`` launched; the new instance (new id) is returned;
        - any other (an external worker, whose role is its own ``--role`` flag, or one another
          gateway launched): InstanceConflict — the gateway cannot restart a process it does
          not own.
        """
        _check_role(role)
        instance = self.get(instance_id)
        if instance.role is role:
            return instance.info()
        if instance.health is not None and instance.health.role is WorkerRole.BOTH:
            await self._store.update(replace(instance.record(), role=role))
            self._change_role(instance, role)
            return instance.info()
        if self._pool is not None:
            info, writes = await self._set_pool_role(self._pool, instance, role)
            if planned is not None:
                planned += writes
            return info
        handle = self._launched.get(instance.id)
        if handle is None or self._launcher is None:
            raise InstanceConflict(
                f"instance {instance.id} ({instance.endpoint}) is a {role_name(instance.role)} "
                "worker that this gateway did not launch: its role is fixed by its own --role; "
                f"start a {role_name(role)} worker and `strata admin add` it instead"
            )
        await self.drain(instance.id)
        await self._wait_idle(instance, self._drain_timeout_s)
        await self._store.delete(instance.id)
        del self._launched[instance.id]  # stopped here, before its successor takes its cores
        self._forget(instance, stop_after_s=0.0)
        await handle.stop(timeout_s=10.0)
        return await self._launch(role)

    async def scale(
        self, role: WorkerRole, replicas: int, *, planned: list[str] | None = None
    ) -> Sequence[InstanceInfo]:
        """Launch, or drain and stop launched instances, until ``replicas`` of ``role`` are
        starting or ready (a launched worker being replaced after a failure counts as starting).
        Scaling down stops only workers this gateway launched (pending replacements first, then
        starting ones, then the least loaded); it returns at once, the drained ones stop when
        their requests are done (or after the drain timeout). With a pool launcher the pool's
        own size is what is scaled (controlplane/instances/pools.py); a dry run's writes are
        added to ``planned``."""
        _check_role(role)
        if replicas < 0:
            raise InvalidAdminRequest(f"replicas must be >= 0, got {replicas}")
        if self._pool is not None:
            writes = await self._scale_pool(self._pool, role, replicas)
            if planned is not None:
                planned += writes
            return [self._info_with_note(m) for m in self._instances.values() if m.role is role]
        active = [
            m
            for m in self._instances.values()
            if m.role is role and m.state in (InstanceState.STARTING, InstanceState.READY)
        ]
        pending = self._pending_of(role)
        if replicas > len(active) + len(pending):
            if self._launcher is None:
                raise InstanceConflict("this gateway has no launcher: it cannot start workers")
            for _ in range(replicas - len(active) - len(pending)):
                await self._launch(role)
        elif replicas < len(active) + len(pending):
            excess = len(active) + len(pending) - replicas
            for slot in pending[:excess]:
                self._retire_pending(slot)
            excess -= min(excess, len(pending))
            ours = [m for m in active if m.id in self._launched]
            ours.sort(key=lambda m: (m.state is InstanceState.READY, m.num_requests))
            if len(ours) < excess:
                raise InstanceConflict(
                    f"scaling {role_name(role)} to {replicas} would stop {excess} workers but this "
                    f"gateway launched only {len(ours)} of them; `strata admin remove` the others"
                )
            for instance in ours[:excess]:
                await self.drain(instance.id)
                self._spawn(self._retire(instance))
        return [self._info_with_note(m) for m in self._instances.values() if m.role is role]

    def stats(self) -> ClusterStats:
        instances = list(self._instances.values())
        return ClusterStats(
            policy=self._policy.name,
            instances=tuple(self._info_with_note(m) for m in instances),
            requests_total=self._num_requests,
            requests_rejected=self._num_rejected,
            requests_failed_over=self._num_failovers,
            predictor_ttft_mape=self._accuracy.ttft_mape,
            predictor_tpot_mape=self._accuracy.tpot_mape,
            extra={
                "predictor_ttft_samples": float(self._accuracy.num_ttft),
                "predictor_tpot_samples": float(self._accuracy.num_tpot),
                "instances_calibrated": float(sum(m.predictor.calibrated for m in instances)),
                "profiles_run": float(self._num_profiles),
                "workers_restarted": float(self._num_restarts),
            },
        )

    async def _on_announcement_gone(self, instance: Instance) -> None:
        """Its worker's announcement is gone (withdrawn at SIGTERM, or expired): drained here
        (and, through the record, on every gateway), then deleted once idle, as scale-down
        retires an instance."""
        if instance.forgotten:
            return
        try:
            await self.drain(instance.id)
        except RegistryStoreError as exc:  # drained here all the same; others see it go
            logger.warning("could not mark %s drained in the registry: %s", instance.id, exc)
        await self._retire(instance)

    async def _retire(self, instance: Instance) -> None:
        await self._wait_idle(instance, self._drain_timeout_s)
        try:
            await self._store.delete(instance.id)
        except RegistryStoreError:
            logger.exception("could not delete %s from the registry", instance.id)
        self._forget(instance, stop_after_s=0.0)


def _check_role(role: WorkerRole) -> None:
    if role not in SERVING_ROLES:
        raise InvalidAdminRequest(f"role must be prefill or decode, got {role.name.lower()}")
