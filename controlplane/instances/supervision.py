"""The registry's supervision layer: a worker this gateway launched that stops serving is replaced.

The layer between ``predictors`` and ``registry`` (controlplane/instances/registry.py names the
layers). It owns launching (:meth:`Supervision._launch`, which `scale` and `set-role` use too) and
the restart policy (docs/design/gateway.md, "Restarting launched workers"):

- **What is restarted**: an instance whose worker *this gateway's launcher started* (its handle is
  in ``_launched``) when it goes to dead from another state, for any reason: its process exited
  (noticed within ``run_supervision``'s interval through the handle's ``alive()``, not only
  through a failed Health call), it became unreachable, or it stopped making progress
  (``_on_unhealthy``, called by the state machine). Nothing else: a dead instance that another
  gateway launched or that an operator added stays dead (no new work) and comes back when its
  Health passes again; draining, removed and scaled-down instances are never restarted (their
  state is draining, never dead, and a forgotten instance is left alone). With several gateways
  sharing a Redis registry only the one that launched a worker holds its handle, so only that
  one restarts it; the others see its record deleted and the replacement's registered.
- **When**: a worker whose process exited at once; one that is dead while its process lives is
  given ``grace_s`` to serve again (a worker too busy to answer three Health calls in time
  must not be killed for it), then replaced.
- **How**: the worker's whole process group is killed at once (SIGKILL, no grace: it is not
  serving, and SIGKILL also ends a SIGSTOPped tree; its cores and port go back to the
  launcher), its record is deleted and the instance forgotten, then, after a back-off, a worker
  of the same role is launched; it registers and becomes ready through the normal path (and is
  profiled, or takes a sibling's profile, like any new instance).
- **Crash loops**: one *slot* is a launched worker and the replacements that followed it. The
  n-th consecutive failure of a slot waits ``backoff_s · 2^(n-1)`` (at most ``backoff_max_s``)
  before its replacement starts. A slot restarted ``limit`` times within ``window_s`` with no
  worker serving ``reset_after_s`` in between (a crash loop) is given up: its dead instance stays
  listed with the reason (`strata admin list`), an error is logged, and the
  ``strata_gateway_worker_restarts_given_up`` counter counts it; the pool stays one short until an
  operator scales it again.
- Supervision begins when the gateway serves (:meth:`run_supervision`); during start-up a
  launched worker that exits fails the start instead (controlplane/gateway.py), since it most
  likely cannot start at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane.instances.instance import Instance
from controlplane.instances.predictors import SchedulingState
from controlplane.instances.store import RegistryStoreError
from controlplane.instances.types import (
    InstanceConflict,
    InstanceInfo,
    InstanceState,
    LaunchedWorker,
)
from controlplane.workers.roles import WorkerRole, role_name

__all__ = ["RestartPolicy", "Supervision"]

logger = logging.getLogger("controlplane.instances.registry")

EXITED = "its process exited"
"""The detail of a launched instance whose process is gone."""


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a launched worker that stopped serving is replaced (see the module docstring)."""

    grace_s: float = 10.0
    """A launched worker that is dead while its process lives (unreachable, not ready,
    stalled) is replaced only if it is still dead this long after (it may serve again: a
    worker busy enough to miss its Health calls is not killed at once). An exited one is
    replaced without waiting."""
    backoff_s: float = 1.0
    """Wait before the first replacement of a slot; doubles with each consecutive failure."""
    backoff_max_s: float = 60.0
    reset_after_s: float = 60.0
    """A worker ready this long has recovered: its slot's next failure is a new incident (it
    waits ``backoff_s`` and the restarts before it no longer count towards ``limit``)."""
    limit: int = 5
    """At most this many restarts of one slot within ``window_s`` while none of its workers
    served ``reset_after_s``; then it is given up (a crash loop)."""
    window_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("grace_s", "backoff_s", "backoff_max_s", "reset_after_s", "window_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"restart_{name} must be >= 0, got {getattr(self, name)}")
        if self.backoff_max_s < self.backoff_s:
            raise ValueError(
                f"restart_backoff_max_s ({self.backoff_max_s}) < restart_backoff_s "
                f"({self.backoff_s})"
            )
        if self.limit < 1:
            raise ValueError(f"restart_limit must be >= 1, got {self.limit}")

    def delay_s(self, failures: int) -> float:
        """The wait before the replacement after the ``failures``-th consecutive failure."""
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        return min(self.backoff_max_s, self.backoff_s * 2.0 ** min(failures - 1, 60))


@dataclass(eq=False)
class _Slot:
    """A launched worker and the replacements that followed it."""

    role: WorkerRole
    restarts: deque[float] = field(default_factory=deque)
    """When each restart within the window happened (the clock's times)."""
    failures: int = 0
    """Consecutive failures: reset once a worker of the slot served ``reset_after_s``."""
    ready_since: float | None = None
    retired: bool = False
    """Scaled down while its replacement was pending: not to be replaced."""


class Supervision(SchedulingState):
    """Launching, and replacing launched workers that stop serving.

    Keyword arguments: ``restart`` (:class:`RestartPolicy`; None = never restart), ``sleep``
    (the back-off's wait, ``asyncio.sleep`` unless a test injects one); the rest go to
    :class:`SchedulingState`."""

    def __init__(
        self,
        *,
        restart: RestartPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._restart = restart
        self._sleep = sleep
        self._slots: dict[str, _Slot] = {}
        """The slot of each launched instance, by instance id."""
        self._pending: dict[_Slot, asyncio.Task[None]] = {}
        """Slots whose replacement is being prepared (back-off, launch)."""
        self._given_up: dict[str, str] = {}
        """Dead launched instances left dead (crash loop), by id: why."""
        self._suspects: dict[str, tuple[float, str]] = {}
        """Dead launched instances whose process lives, in their grace period: since, why."""
        self._num_restarts = 0
        self._supervising = False

    # -- launching ---------------------------------------------------------------------------

    async def _launch(self, role: WorkerRole, slot: _Slot | None = None) -> InstanceInfo:
        """Start a worker of ``role`` through the launcher and register it (a new slot unless
        it replaces one)."""
        assert self._launcher is not None
        handle = await self._launcher.launch(role)
        try:
            record, created = await self._store.register(role, handle.endpoint, launched=True)
            if not created:
                raise InstanceConflict(f"launched {handle.endpoint} is registered as {record.id}")
        except BaseException:
            await handle.stop(timeout_s=10.0)
            raise
        instance = self._adopt(record)
        self._launched[instance.id] = handle
        self._slots[instance.id] = slot if slot is not None else _Slot(role)
        logger.info("instance %s (%s %s) launched", instance.id, role_name(role), handle.endpoint)
        # A standby worker (controlplane/launch/standby.py) is ready already: serve from now,
        # not from the next heartbeat. A fresh one refuses the call and stays starting.
        await self._check(instance)
        return instance.info()

    def _pending_of(self, role: WorkerRole) -> list[_Slot]:
        """Slots of ``role`` waiting for their replacement (scale counts them as starting)."""
        return [slot for slot in self._pending if slot.role is role]

    def _retire_pending(self, slot: _Slot) -> None:
        """Scale-down of a slot whose replacement is pending: it is not launched."""
        slot.retired = True
        self._pending.pop(slot, None)
        logger.info("a pending %s replacement is no longer wanted", role_name(slot.role))

    # -- supervision -------------------------------------------------------------------------

    async def run_supervision(self, *, interval_s: float) -> None:
        """Restart launched workers from now on, and watch their processes: one that exited
        makes its instance dead within ``interval_s`` (the gateway runs this while it serves
        and cancels it at shutdown)."""
        self._supervising = True
        try:
            while True:
                self.check_launched()
                await asyncio.sleep(interval_s)
        finally:
            self._supervising = False

    def check_launched(self) -> None:
        """One look at every launched worker: a process that exited makes its instance dead
        (and replaced); a live one dead for the grace period is replaced."""
        for instance_id, handle in list(self._launched.items()):
            instance = self._instances.get(instance_id)
            if instance is None or instance.draining or handle.alive():
                continue
            if instance.state is InstanceState.DEAD:
                # Dead already (a failed Health or request saw it first, or it is in its grace
                # period): replaced now, unless restarting is off or the slot was given up.
                if instance_id not in self._given_up:
                    self._supervise_dead(instance, EXITED)
            else:
                self._set_state(instance, InstanceState.DEAD, EXITED)
        now = self._clock()
        for instance_id, (since, reason) in list(self._suspects.items()):
            instance = self._instances.get(instance_id)
            suspect = self._launched.get(instance_id)
            if instance is None or suspect is None or instance.draining:
                del self._suspects[instance_id]
            elif instance.state is not InstanceState.DEAD:
                del self._suspects[instance_id]
                logger.info("instance %s serves again: not restarted", instance_id)
            elif self._restart is not None and now - since >= self._restart.grace_s:
                del self._suspects[instance_id]
                self._restart_now(instance, suspect, f"{reason}; dead for {now - since:.1f} s")

    def _on_ready(self, instance: Instance) -> None:
        super()._on_ready(instance)
        slot = self._slots.get(instance.id)
        if slot is not None and slot.ready_since is None:
            slot.ready_since = self._clock()

    def _on_unhealthy(self, instance: Instance, reason: str) -> None:
        super()._on_unhealthy(instance, reason)
        self._supervise_dead(instance, reason)

    def _supervise_dead(self, instance: Instance, reason: str) -> None:
        """``instance`` is dead: replace it now (its process exited), after the grace period
        (it lives: it may serve again), or not at all (not ours, on its way out, start-up,
        restart off)."""
        handle = self._launched.get(instance.id)
        if handle is None or instance.forgotten or instance.draining:
            return  # not ours, or on its way out: left as it is
        if not self._supervising:
            return  # start-up: the gateway fails the start when a launched worker exits
        if self._restart is None:
            if not handle.alive():  # exited: reap it, its cores and port go back
                del self._launched[instance.id]
                self._spawn(handle.stop(timeout_s=0.0))
            return
        if handle.alive() and self._restart.grace_s > 0:
            if instance.id not in self._suspects:
                self._suspects[instance.id] = (self._clock(), reason)
                logger.warning(
                    "instance %s (%s %s) stopped serving (%s): replaced unless it serves "
                    "again within %g s",
                    instance.id,
                    role_name(instance.role),
                    instance.endpoint,
                    reason,
                    self._restart.grace_s,
                )
            return
        self._suspects.pop(instance.id, None)
        self._restart_now(instance, handle, reason)

    def _restart_now(self, instance: Instance, handle: LaunchedWorker, reason: str) -> None:
        """Kill ``instance``'s worker and replace it after its slot's back-off (or give the
        slot up)."""
        assert self._restart is not None
        slot = self._slots.pop(instance.id, None) or _Slot(instance.role)
        del self._launched[instance.id]
        delay_s = self._count_failure(slot, reason)
        if delay_s is None:
            note = (
                f"not restarted: restarted {self._restart.limit} times within "
                f"{self._restart.window_s:g} s (crash loop); last: {reason}"
            )
            self._give_up(instance.role, f"instance {instance.id} ({instance.endpoint})", note)
            self._given_up[instance.id] = note
            self._spawn(handle.stop(timeout_s=0.0))
            return
        self._num_restarts += 1
        self._metrics.worker_restarts.labels(role_name(instance.role)).inc()
        logger.warning(
            "instance %s (%s %s) stopped serving (%s): restarting it in %g s",
            instance.id,
            role_name(instance.role),
            instance.endpoint,
            reason,
            delay_s,
        )
        self._pending[slot] = self._spawn(self._replace(instance, handle, slot, delay_s))

    def _count_failure(self, slot: _Slot, reason: str) -> float | None:
        """Count one failure of ``slot``: the back-off before its replacement, or None when
        the slot has been restarted ``limit`` times within the window since a worker of it last
        served ``reset_after_s`` (give up)."""
        policy = self._restart
        assert policy is not None
        now = self._clock()
        if slot.ready_since is not None and now - slot.ready_since >= policy.reset_after_s:
            # It served: a new incident, not a crash loop (back-off and cap start over).
            slot.failures = 0
            slot.restarts.clear()
        slot.ready_since = None
        slot.failures += 1
        while slot.restarts and now - slot.restarts[0] >= policy.window_s:
            slot.restarts.popleft()
        if len(slot.restarts) >= policy.limit:
            return None
        slot.restarts.append(now)
        return policy.delay_s(slot.failures)

    def _give_up(self, role: WorkerRole, what: str, note: str) -> None:
        logger.error("%s: %s; the %s pool stays one short", what, note, role_name(role))
        self._metrics.worker_restarts_given_up.labels(role_name(role)).inc()

    async def _replace(
        self, instance: Instance, handle: LaunchedWorker, slot: _Slot, delay_s: float
    ) -> None:
        """Kill what is left of ``instance``'s worker, forget it, wait ``delay_s``, launch its
        replacement (retried with the slot's back-off while launching fails)."""
        try:
            await handle.stop(timeout_s=0.0)
            if instance.forgotten or instance.draining:
                return  # removed or drained meanwhile: not to be replaced
            try:
                await self._store.delete(instance.id)
            except RegistryStoreError as exc:
                # Retried until it goes: a record left behind would come back as a dead
                # instance (in this gateway at its next sync, and in every other).
                logger.warning("could not delete %s from the registry: %s", instance.id, exc)
                self._spawn(self._delete_record(instance.id))
            self._forget(instance, stop_after_s=0.0)
            while True:
                await self._sleep(delay_s)
                if slot.retired:
                    return
                try:
                    info = await self._launch(slot.role, slot)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    next_delay_s = self._count_failure(slot, f"launch failed: {exc}")
                    if next_delay_s is None:
                        note = f"not restarted: its replacement could not be launched: {exc}"
                        self._give_up(slot.role, f"a launched {role_name(slot.role)} slot", note)
                        return
                    logger.warning(
                        "replacing %s failed (%s): retry in %g s", instance.id, exc, next_delay_s
                    )
                    delay_s = next_delay_s
                    continue
                logger.info("instance %s replaces %s (%s)", info.id, instance.id, info.endpoint)
                return
        finally:
            if self._pending.get(slot) is asyncio.current_task():
                del self._pending[slot]

    async def _delete_record(self, instance_id: str) -> None:
        """Delete a replaced instance's record, retrying (1 s, doubling to 30 s) while the
        store is unreachable."""
        delay_s = 1.0
        while True:
            await self._sleep(delay_s)
            try:
                await self._store.delete(instance_id)
            except RegistryStoreError as exc:
                logger.warning("could not delete %s from the registry: %s", instance_id, exc)
                delay_s = min(2 * delay_s, 30.0)
                continue
            logger.info("record of %s deleted", instance_id)
            return

    def _info_with_note(self, instance: Instance) -> InstanceInfo:
        """``instance.info()``, its detail led by why it is not restarted (when given up)."""
        info = instance.info()
        note = self._given_up.get(instance.id)
        if note is None:
            return info
        if instance.state is not InstanceState.DEAD:
            del self._given_up[instance.id]  # back (e.g. an operator restarted it by hand)
            return info
        return replace(info, detail=f"{note} ({info.detail})")

    def _forget(self, instance: Instance, *, stop_after_s: float) -> None:
        super()._forget(instance, stop_after_s=stop_after_s)
        if self._instances.get(instance.id) is None:
            self._given_up.pop(instance.id, None)
            self._slots.pop(instance.id, None)
