"""The registry's pool layer: `scale`, `set-role` and `remove` when the workers are members of
pools that something else runs (Kubernetes Deployments), through a
:class:`~controlplane.instances.types.PoolLauncher` (docs/design/multihost.md §7).

The layer between ``supervision`` and ``registry`` (controlplane/instances/registry.py names
the layers). A pool launcher starts nothing and hands out no process: it reads and changes a
pool's desired size and removes chosen members. New members announce themselves
(multihost.md §3) and the registry learns of them as of any announced worker. An instance is a
member of a pool when its endpoint's host is the IP of one of the pool's pods (a pod runs one
worker; its announced endpoint is ``POD_IP:PORT``).

- **Scale up** (``replicas`` above the pool's size): the desired size becomes ``replicas``
  plus the removals under way whose lower size is not written yet (the launcher's ``remove``
  calls back once it is: from then on the size no longer counts the pod). A size that changed
  between its read and the write (:class:`PoolChanged`) is read and decided again.
- **Scale down**: the size minus those removals is the pool's current size; of the
  excess, the desired places no known instance fills (pods not yet announced, still Pending,
  or not created yet) go first, by lowering the size by that many: the pool removes pods that
  do not serve first (a ReplicaSet deletes unscheduled, then Pending, then not-ready pods
  before ready ones). The rest are chosen among the pool's instances, the same preference as
  the local launcher's scale-down with the ones that serve nothing ahead: dead and draining
  ones, then starting ones, then the least loaded. Each is drained at once (the call returns),
  and once idle (or after the drain timeout) the launcher removes exactly its pod; its record
  is deleted once the pod is gone (a record deleted while the pod still announces itself would
  be registered again by the next announcement scan). A removal that fails before its lower
  size is written (launcher unavailable, conflicts without end, cancelled) takes back the
  drain it made (not an earlier admin drain) and logs why.
- **set-role**: the other pool grows by one first (a removal that fails then leaves a worker
  too many, not one too few), then the instance is drained and its pod removed as above
  (waiting for it). The new instance is not known yet (its pod has to start and
  announce itself), so the call returns an :class:`InstanceInfo` of the new member *as
  planned*: no id, no endpoint, the new role, state ``starting``, ``launched`` and a detail
  naming the pool it joins and its size (what ``strata admin set-role`` prints).
- **remove** of a pool member removes its pod too (without that the pod, still running and
  announcing itself, would come back at the next scan).
- **Dry run** (:attr:`PoolLauncher.dry_run`): nothing changes, in the registry either (no
  drain, no record deleted): the instances are chosen as above and the launcher's write
  requests, not sent, are appended to the caller's ``planned`` list.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from controlplane.instances.instance import Instance
from controlplane.instances.store import RegistryStoreError
from controlplane.instances.supervision import Supervision
from controlplane.instances.types import (
    MAX_CONFLICT_RETRIES,
    InstanceConflict,
    InstanceInfo,
    InstanceState,
    LauncherUnavailable,
    PoolChanged,
    PoolLauncher,
    PoolPod,
)
from controlplane.workers.roles import WorkerRole, role_name
from strata_common.endpoints import EndpointError, parse_endpoint

__all__ = ["PoolScaling"]

logger = logging.getLogger("controlplane.instances.registry")

_REMOVAL_ORDER = {
    InstanceState.DEAD: 0,
    InstanceState.DRAINING: 0,
    InstanceState.STARTING: 1,
    InstanceState.READY: 2,
}
"""Scale-down takes the members that serve nothing first, then starting ones, then ready ones
(the least loaded first within each)."""


class PoolScaling(Supervision):
    """Scaling through a :class:`PoolLauncher` (see the module docstring).

    Keyword arguments: ``pool_launcher`` (None: no pools; it excludes ``launcher``); the rest go
    to :class:`Supervision`."""

    def __init__(self, *, pool_launcher: PoolLauncher | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if pool_launcher is not None and self._launcher is not None:
            raise ValueError("a registry has a process launcher or a pool launcher, not both")
        self._pool = pool_launcher
        self._removing: dict[str, _Removal] = {}
        """Pods being removed (their instance drained, waiting to be idle, or the pod going),
        by pod name: the desired size counts them until their removal has lowered it."""

    async def _drain(self, instance: Instance) -> bool:
        """No new requests to ``instance`` (in every gateway: the record says so); its
        requests finish. The admin API's `drain`, and the first step of every removal. True
        when this call drained it (it was not draining already)."""
        drained = not instance.draining
        if drained:
            instance.draining = True
            await self._store.update(instance.record())
            self._set_state(instance, InstanceState.DRAINING, "draining")
        self._cancel_profile(instance)
        return drained

    async def _undrain(self, instance: Instance, state: InstanceState, why: str) -> None:
        """Take back the drain of a removal that failed before the pool's size changed: the
        worker keeps its place in the pool, so it serves again, in ``state`` (the one before
        the drain; the health checks go on from there)."""
        if instance.forgotten or not instance.draining:
            return
        instance.draining = False
        logger.warning("instance %s serves again: its removal failed: %s", instance.id, why)
        self._set_state(instance, state, f"removal failed: {why}")
        try:
            await self._store.update(instance.record())
        except RegistryStoreError:
            logger.exception("could not record that %s no longer drains", instance.id)

    def _removals_unresized(self, role: WorkerRole) -> int:
        """Removals of ``role`` whose lower size is not written yet: ``replicas`` still
        counts their pods."""
        return sum(1 for r in self._removing.values() if r.role is role and not r.resized)

    # -- scale -------------------------------------------------------------------------------

    async def _scale_pool(self, pool: PoolLauncher, role: WorkerRole, replicas: int) -> list[str]:
        """Make the pool of ``role`` ``replicas`` members; returns the planned writes (dry
        run). A size that changed between its read and the write (another gateway, an
        autoscaler) is read again and the decision made again."""
        for _ in range(MAX_CONFLICT_RETRIES + 1):
            try:
                return await self._scale_pool_once(pool, role, replicas)
            except PoolChanged:
                logger.info("%s changed since read: deciding again", pool.describe(role))
        raise LauncherUnavailable(
            f"{pool.describe(role)} changed under every one of {MAX_CONFLICT_RETRIES + 1} scale "
            "writes (409 Conflict: another writer, e.g. an autoscaler, is changing it); try again"
        )

    async def _scale_pool_once(
        self, pool: PoolLauncher, role: WorkerRole, replicas: int
    ) -> list[str]:
        planned: list[str] = []
        removing = self._removals_unresized(role)
        current = await pool.replicas(role) - removing
        if replicas > current:
            planned += await pool.set_replicas(role, replicas + removing)
            logger.info("scaling %s %d → %d", pool.describe(role), current, replicas)
            return planned
        if replicas == current:
            return planned
        excess = current - replicas
        members = await self._members(pool, role)
        # Desired places no known instance fills: pods not announced yet, Pending, not created.
        unfilled = max(0, current - len(members))
        if unfilled:
            count = min(excess, unfilled)
            planned += await pool.add_replicas(role, -count)
            logger.info("scaling %s down by %d members not serving yet", pool.describe(role), count)
            excess -= count
        if excess > len(members):  # only when pods are missing from the list: a race
            raise InstanceConflict(
                f"{pool.describe(role)} has {len(members)} members this gateway knows; it "
                f"cannot remove {excess} of them"
            )
        chosen = sorted(
            members, key=lambda m: (_REMOVAL_ORDER[m[0].state], m[0].num_requests, m[0].id)
        )[:excess]
        for instance, pod in chosen:
            if pool.dry_run:
                planned += await pool.remove(role, pod)
                continue
            logger.info(
                "scale-down of %s: draining %s (pod %s)", pool.describe(role), instance.id, pod.name
            )
            removal = await self._begin_removal(instance, pod)
            self._spawn(self._retire_member(pool, removal, self._drain_timeout_s))
        return planned

    async def _members(
        self, pool: PoolLauncher, role: WorkerRole
    ) -> list[tuple[Instance, PoolPod]]:
        """The instances of ``role`` that are pods of its pool (not being removed), with the
        pod."""
        by_ip = {pod.ip: pod for pod in await pool.pods(role) if pod.ip}
        members = []
        for instance in self._instances.values():
            pod = by_ip.get(_host(instance.endpoint))
            if instance.role is role and pod is not None and pod.name not in self._removing:
                members.append((instance, pod))
        return members

    async def _begin_removal(self, instance: Instance, pod: PoolPod) -> _Removal:
        state = instance.state
        removal = _Removal(instance, pod, state, drained_here=await self._drain(instance))
        self._removing[pod.name] = removal
        return removal

    async def _retire_member(self, pool: PoolLauncher, removal: _Removal, wait_s: float) -> None:
        """Wait until the instance is idle (at most ``wait_s``), remove its pod, then its
        record. When that fails before the pool's size is lowered (the API server
        unavailable, conflicts without end, the call cancelled), the drain this removal made
        is taken back; after it, the pod goes anyway (its record stays until the worker's
        announcements stop)."""
        instance, pod = removal.instance, removal.pod
        try:
            await self._wait_idle(instance, wait_s)
            await pool.remove(instance.role, pod, removal.mark_resized)
        except BaseException as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            logger.warning("removal of %s (pod %s) failed: %s", instance.id, pod.name, why)
            if not removal.resized and removal.drained_here:
                await asyncio.shield(self._undrain(instance, removal.state, why))
            raise
        finally:
            self._removing.pop(pod.name, None)
        try:
            await self._store.delete(instance.id)
        except RegistryStoreError:
            logger.exception("could not delete %s from the registry", instance.id)
        self._forget(instance, stop_after_s=0.0)
        logger.info("instance %s removed with its pod %s", instance.id, pod.name)

    # -- set-role, remove --------------------------------------------------------------------

    async def _set_pool_role(
        self, pool: PoolLauncher, instance: Instance, role: WorkerRole
    ) -> tuple[InstanceInfo, list[str]]:
        """Move ``instance``'s place to the pool of ``role``: the other pool one larger
        first, then its pod removed (after the drain). Returns the new member as planned (module
        docstring) and the planned writes (dry run)."""
        pod = await self._pod_of(pool, instance)
        if pod is None:
            raise InstanceConflict(
                f"instance {instance.id} ({instance.endpoint}) is not a pod of "
                f"{pool.describe(instance.role)}: its role is fixed by its own --role; start a "
                f"{role_name(role)} worker and `strata admin add` it instead"
            )
        # The other pool grows first: a removal that fails then leaves one worker too many,
        # not one too few.
        planned = list(await pool.add_replicas(role, 1))
        if pool.dry_run:
            planned += await pool.remove(instance.role, pod)
        else:
            removal = await self._begin_removal(instance, pod)
            await self._retire_member(pool, removal, self._drain_timeout_s)
        detail = (
            f"a new pod of {pool.describe(role)} (one more replica): listed once it announces "
            "itself"
        )
        logger.info("instance %s moved: %s", instance.id, detail)
        info = InstanceInfo(
            id="",
            role=role,
            state=InstanceState.STARTING,
            endpoint="",
            launched=True,
            detail=("dry run: " if pool.dry_run else "") + detail,
        )
        return info, planned

    async def _remove_pool_member(self, instance: Instance, wait_s: float) -> bool:
        """`remove` of a pool member: its pod goes too (after the drain, at most ``wait_s``).
        False when ``instance`` is not a pool member (the caller forgets it as before)."""
        pool = self._pool
        if pool is None:
            return False
        pod = await self._pod_of(pool, instance)
        if pod is None:
            return False
        if pool.dry_run:
            raise InstanceConflict(
                f"the gateway's launcher is a dry run: it would remove pod {pod.name} of "
                f"{pool.describe(instance.role)}; nothing changed"
            )
        removal = await self._begin_removal(instance, pod)
        await self._retire_member(pool, removal, wait_s)
        return True

    async def _pod_of(self, pool: PoolLauncher, instance: Instance) -> PoolPod | None:
        host = _host(instance.endpoint)
        for pod in await pool.pods(instance.role):
            if pod.ip and pod.ip == host and pod.name not in self._removing:
                return pod
        return None


@dataclass(slots=True)
class _Removal:
    """A pool member being removed (drained, waiting to be idle, its pod going)."""

    instance: Instance
    pod: PoolPod
    state: InstanceState
    """The instance's state before the removal."""
    drained_here: bool
    """The drain came from this removal (an admin `drain` before it stays if it fails)."""
    resized: bool = False
    """The pool's lower size is written: ``replicas`` no longer counts the pod."""

    @property
    def role(self) -> WorkerRole:
        return self.instance.role

    def mark_resized(self) -> None:
        self.resized = True


def _host(endpoint: str) -> str:
    try:
        return parse_endpoint(endpoint).host
    except EndpointError:
        return ""
