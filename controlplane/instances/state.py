"""The registry's state machine and health checks: which instances exist and what state each is in.

The first layer of :class:`~controlplane.instances.registry.InstanceRegistry` (the layers:
this one, ``load`` (in-flight counters), ``predictors`` (policy, latency models, profiles),
``registry`` (the admin backend)).

One owner. The registry alone changes instance state; the gateway reads immutable snapshots
(`InstanceInfo`, `InstanceView`) and reports what it saw through three calls:
`report_failure` (a request found the worker failing), the load trackers `track_prefill` /
`track_decode` (in-flight counters), and `note_failover`.

State, per gateway (controlplane/instances/types.py draws the diagram). Health here means
"serves", not "its gRPC server answers":

- **starting**: registered, Health has not said ready yet (a vLLM worker compiles for a minute).
- **ready**: the last Health said ready, with a role that serves the instance's role, model
  limits that agree with the gateway's, and an engine that moves. Only ready instances are
  picked.
- **dead**: a request found it unreachable (marked at once, so the next request does not try
  it), or Health failed:
  - unreachable (refused, UNAVAILABLE) or "not ready": at once;
  - **stalled**: the engine has work and its reported `stalled_s` (time with work and no
    completed step, on the worker's clock) exceeds the instance's *stall bound*;
  - **unresponsive**: Health calls time out (the whole process tree stopped, a host that
    drops packets) and none has answered for longer than the stall bound. A stop shorter than
    the bound aborts nothing.
  The stall bound is max(``stall_floor_s``, ``stall_factor`` × the longest step its latency
  model predicts for its load: the prefill of its queued prompts in one step, or a decode step
  at its batch — `Instance.predicted_step_s`). Going dead trips the instance's tripwire: every
  call of this gateway in flight on it is cut with WorkerError(UNAVAILABLE, the reason), and
  its requests fail over as after a crash (controlplane/request/generation.py); `_on_unhealthy`
  tells the layers above. A dead instance comes back to ready when a Health call shows it
  serving again (ready, and no stall beyond its bound): heartbeats keep going to dead
  instances; it gets a fresh tripwire.
- **draining**: an operator drained it (shared through the store, so every gateway stops picking
  it); requests already on it finish. `remove` waits for them, then forgets it. A worker whose
  Health says ``draining`` (its SIGTERM: `dataplane/shutdown.py`) is draining too, on this
  gateway's own evidence (not stored): nothing new goes to it, its requests are neither cut nor
  failed over, and once it stops answering it stays draining (never dead); a Health without
  ``draining`` (a new process at that endpoint) makes it ready again.

Records (id, role, endpoint, draining, launched, announced) live in a `RegistryStore` — this
process, or Redis when several gateways share one cluster; every gateway polls the store and
health-checks every instance itself on each round, so the state above is each gateway's own.

Announced workers (docs/design/multihost.md §3; a shared registry only): each `sync` also reads
the workers' announcements. An announced endpoint without a record is registered (the store's
register: two gateways at once get one record) with ``announced`` set and the announced role —
``both`` as decode (it prefills for itself when no prefill instance is ready; `set-role` switches
it in place). An ``announced`` record whose announcement has been gone for the announcement
grace (withdrawn on SIGTERM, or expired; `announced.py` also says when an empty scan counts) is
handed to `_on_announcement_gone`: the registry drains it and deletes its record once idle (or
after the drain timeout), as scale-down does; if the endpoint announces itself again before
that ended, the withdrawal is cancelled and the instance undrained when the withdrawal drained it
(`_cancel_withdrawal`; other gateways follow the record). If the announcements cannot be read,
no record is added or withdrawn that round.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Sequence
from contextlib import suppress
from typing import Any

from controlplane.instances.announced import DEFAULT_ANNOUNCEMENT_GRACE_S, AnnouncedWorkers
from controlplane.instances.instance import (
    Instance,
    InstanceView,
    ModelLimits,
    StartupError,
    Tripwire,
)
from controlplane.instances.store import (
    InstanceRecord,
    LocalRegistryStore,
    RegistryStore,
    RegistryStoreError,
)
from controlplane.instances.types import (
    InstanceNotFound,
    InstanceState,
    LaunchedWorker,
    Launcher,
)
from controlplane.metrics import GatewayMetrics
from controlplane.workers.client import WorkerError, WorkerErrorKind, WorkerHealth
from controlplane.workers.roles import WorkerRole, role_name
from strata_common.grpc_auth import ClientAuth

__all__ = ["DEFAULT_STALL_FACTOR", "DEFAULT_STALL_FLOOR_S", "SERVING_ROLES", "InstanceStates"]

logger = logging.getLogger("controlplane.instances.registry")

DEFAULT_STALL_FLOOR_S = 15.0
DEFAULT_STALL_FACTOR = 4.0
SERVING_ROLES = (WorkerRole.PREFILL, WorkerRole.DECODE)


class InstanceStates:
    """The instances and their states, from the store's records and Health heartbeats."""

    def __init__(
        self,
        *,
        metrics: GatewayMetrics,
        health_check_timeout_s: float,
        store: RegistryStore | None = None,
        launcher: Launcher | None = None,
        drain_timeout_s: float = 60.0,
        stall_floor_s: float = DEFAULT_STALL_FLOOR_S,
        stall_factor: float = DEFAULT_STALL_FACTOR,
        clock: Callable[[], float] = time.monotonic,
        worker_auth: ClientAuth | None = None,
        announcement_grace_s: float = DEFAULT_ANNOUNCEMENT_GRACE_S,
    ) -> None:
        self._metrics = metrics
        self._worker_auth = worker_auth
        """The gateway's cluster credentials, sent on every call to a worker (None: none)."""
        self._clock = clock
        self._health_check_timeout_s = health_check_timeout_s
        self._stall_floor_s = stall_floor_s
        self._stall_factor = stall_factor
        self._store: RegistryStore = store if store is not None else LocalRegistryStore()
        self._launcher = launcher
        self._drain_timeout_s = drain_timeout_s
        self._instances: dict[str, Instance] = {}
        self._configured: set[str] = set()
        self._launched: dict[str, LaunchedWorker] = {}
        """Workers this gateway's launcher started, by instance id (it may stop them)."""
        self._limits: ModelLimits | None = None
        self._round_robin = {role: itertools.count() for role in SERVING_ROLES}
        self._tasks: set[asyncio.Task[None]] = set()
        self._announced = AnnouncedWorkers(self._store, grace_s=announcement_grace_s, clock=clock)
        self._withdrawals: dict[str, asyncio.Task[None]] = {}
        """The withdrawals under way (`_withdraw`), by instance id."""

    def _on_ready(self, instance: Instance) -> None:
        """Called each time a Health answer finds ``instance`` ready (a later layer profiles
        it)."""

    def _on_unhealthy(self, instance: Instance, reason: str) -> None:
        """Called once each time ``instance`` stops serving: it goes to dead from another state
        (unreachable, not ready, stalled). A later layer restarts a worker this gateway
        launched."""

    async def _on_announcement_gone(self, instance: Instance) -> None:
        """``instance`` was registered from its worker's announcement, which is gone: the
        registry layer drains it and deletes its record once idle. Runs as a task of its own
        (one per instance at a time)."""

    @property
    def limits(self) -> ModelLimits:
        if self._limits is None:
            raise RuntimeError("InstanceRegistry.limits read before wait_until_ready()")
        return self._limits

    async def register_configured(self, role: WorkerRole, endpoints: Iterable[str]) -> None:
        """Register the gateway's configured workers (an endpoint some other gateway already
        registered keeps its shared record, role included)."""
        for endpoint in endpoints:
            record, created = await self._store.register(role, endpoint, launched=False)
            if not created and record.role is not role:
                logger.warning(
                    "%s is configured as %s but registered as %s (%s): using the registry's role",
                    endpoint,
                    role.name.lower(),
                    record.role.name.lower(),
                    record.id,
                )
            self._configured.add(self._adopt(record).id)
        await self.sync()

    async def wait_until_ready(self, *, timeout_s: float, poll_interval_s: float) -> ModelLimits:
        """Poll until every configured worker is ready, then fix the model limits. A gateway
        with none configured (its workers come from a shared registry: announced, added, other
        gateways') syncs the registry each poll and waits until a decode instance is ready; the
        limits are then those of every instance ready by then."""
        deadline = time.monotonic() + timeout_s
        next_log = time.monotonic() + 10.0
        while True:
            if not self._configured:
                await self.sync()
            await self.check_all()
            self._raise_on_wrong_role()
            configured = [self._instances[i] for i in self._configured if i in self._instances]
            if not self._configured:
                configured = [m for m in self._instances.values() if m.state is InstanceState.READY]
                if any(m.role is WorkerRole.DECODE for m in configured):
                    break
            elif all(m.state is InstanceState.READY for m in configured):
                break
            now = time.monotonic()
            if now >= deadline:
                raise StartupError(
                    f"workers not ready after {timeout_s:g} s: {self._describe_not_ready()}"
                )
            if now >= next_log:
                logger.info("waiting for workers: %s", self._describe_not_ready())
                next_log = now + 10.0
            await asyncio.sleep(poll_interval_s)
        self._limits = self._agree_on_limits(configured)
        logger.info(
            "workers ready: max_model_len=%d block_size=%d registry=%s",
            self._limits.max_model_len,
            self._limits.block_size,
            self._store.description,
        )
        await self.check_all()  # apply the limits to instances that are not configured ones
        return self._limits

    def is_ready(self) -> bool:
        """True when at least one prefill and one decode instance are ready."""
        return all(
            any(m.role is role and m.state is InstanceState.READY for m in self._instances.values())
            for role in SERVING_ROLES
        )

    def get(self, instance_id: str) -> Instance:
        try:
            return self._instances[instance_id]
        except KeyError:
            raise InstanceNotFound(f"no instance {instance_id!r}") from None

    def snapshot(self, role: WorkerRole) -> tuple[InstanceView, ...]:
        """The ready instances of ``role`` with their load (what a policy chooses from)."""
        return tuple(
            InstanceView(m.info(), m.load())
            for m in self._instances.values()
            if m.role is role and m.state is InstanceState.READY
        )

    def pick(self, role: WorkerRole, *, exclude: Collection[str] = ()) -> Instance:
        """A ready instance of ``role`` not in ``exclude``, round-robin; WorkerError(UNAVAILABLE)
        when there is none."""
        ready = [
            m
            for m in self._instances.values()
            if m.role is role and m.state is InstanceState.READY and m.id not in exclude
        ]
        if not ready:
            of_role = [m for m in self._instances.values() if m.role is role]
            details = "; ".join(f"{m.endpoint}: {m.state.value}, {m.detail}" for m in of_role)
            raise WorkerError(
                WorkerErrorKind.UNAVAILABLE,
                ",".join(m.endpoint for m in of_role),
                "pick",
                f"no {role.name.lower()} worker is ready ({details or 'none registered'})",
            )
        return ready[next(self._round_robin[role]) % len(ready)]

    async def check_all(self) -> None:
        """One Health call to every instance, concurrently."""
        await asyncio.gather(*(self._check(m) for m in list(self._instances.values())))

    async def sync(self) -> None:
        """Bring the instances in line with the store's records (other gateways' changes)."""
        known_before = set(self._instances)  # instances added during the load are not stale
        try:
            records = await self._store.load()
        except RegistryStoreError as exc:
            logger.warning("registry sync failed, keeping the instances known: %s", exc)
            return
        try:
            announcements = await self._store.announcements()
        except RegistryStoreError as exc:
            logger.warning("reading the workers' announcements failed (this round): %s", exc)
            announcements = None
        if announcements is not None:
            await self._announced.register(records, announcements)
        for record in records.values():
            instance = self._instances.get(record.id)
            if instance is None:
                self._adopt(record)
                logger.info(
                    "instance %s (%s %s) registered",
                    record.id,
                    role_name(record.role),
                    record.endpoint,
                )
                continue
            if record.role is not instance.role:
                self._change_role(instance, record.role)
            if record.draining and not instance.draining:
                instance.draining = True
                self._set_state(instance, InstanceState.DRAINING, "draining")
                self._cancel_profile(instance)
            elif (
                instance.draining
                and not record.draining
                and record.announced
                and record.id not in self._announced.withdrawing
            ):  # another gateway cancelled the withdrawal that drained it
                self._undrained(instance)
        for instance in list(self._instances.values()):
            if instance.id in known_before and instance.id not in records:
                logger.info("instance %s (%s) was removed", instance.id, instance.endpoint)
                self._forget(instance, stop_after_s=self._drain_timeout_s)
        if announcements is not None:
            for instance_id, drained in self._announced.returned(records, announcements):
                await self._cancel_withdrawal(instance_id, undrain=drained)
            for record in self._announced.gone(records, announcements, set(self._instances)):
                instance = self._instances[record.id]
                self._withdrawals[record.id] = self._spawn(self._withdraw(instance))

    async def _withdraw(self, instance: Instance) -> None:
        try:
            if not instance.draining:
                self._announced.drained(instance.id)  # undone if the announcement comes back
            await self._on_announcement_gone(instance)
        finally:
            self._announced.withdrawn(instance.id)
            self._withdrawals.pop(instance.id, None)

    async def _cancel_withdrawal(self, instance_id: str, *, undrain: bool) -> None:
        """The announcement of ``instance_id`` is back while its withdrawal runs: the withdrawal
        is cancelled, and the instance undrained if the withdrawal drained it (never an
        operator's drain)."""
        task = self._withdrawals.pop(instance_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        instance = self._instances.get(instance_id)
        if not undrain or instance is None or not instance.draining:
            return
        instance.draining = False
        try:
            await self._store.update(instance.record())
        except RegistryStoreError as exc:
            logger.warning("could not mark %s undrained in the registry: %s", instance_id, exc)
        self._undrained(instance)

    def _undrained(self, instance: Instance) -> None:
        instance.draining = False
        self._set_state(instance, InstanceState.STARTING, "undrained: waiting for its Health")

    async def run_health_checks(self, *, interval_s: float) -> None:
        """Sync and check forever (the gateway cancels this task at shutdown)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
                await self.check_all()
            except Exception:  # never let the monitor die silently
                logger.exception("health check round failed")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(m.client.close() for m in self._instances.values()))
        self._instances.clear()
        await self._store.close()

    def _adopt(self, record: InstanceRecord) -> Instance:
        """The local instance of ``record``, created if new (idempotent)."""
        instance = self._instances.get(record.id)
        if instance is None:
            instance = Instance(record, auth=self._worker_auth)
            self._instances[record.id] = instance
            self._publish_ready(instance)
        return instance

    @staticmethod
    def _cancel_profile(instance: Instance) -> None:
        """A drained worker needs no profile: its calls are cancelled (the worker aborts them),
        and :meth:`_wait_idle` waits until they are gone."""
        task = instance.profile_task
        if task is not None and not task.done():
            task.cancel()

    def _forget(self, instance: Instance, *, stop_after_s: float) -> None:
        """Stop using ``instance``: drop it, close its channel once its requests are done, and
        stop its worker if this gateway launched it (after ``stop_after_s`` at most)."""
        if self._instances.get(instance.id) is not instance:
            return
        del self._instances[instance.id]
        self._configured.discard(instance.id)
        instance.forgotten = True
        self._cancel_profile(instance)
        self._unpublish_ready(instance)
        handle = self._launched.pop(instance.id, None)
        self._spawn(self._close_when_idle(instance, handle, stop_after_s))

    async def _close_when_idle(
        self, instance: Instance, handle: LaunchedWorker | None, stop_after_s: float
    ) -> None:
        if handle is not None:
            await self._wait_idle(instance, stop_after_s)
            await handle.stop(timeout_s=10.0)
        await instance.idle.wait()
        await instance.client.close()

    @staticmethod
    async def _wait_idle(instance: Instance, timeout_s: float) -> None:
        """Until nothing of this gateway's runs on ``instance``: client requests and the
        start-up profile's calls (at most ``timeout_s``)."""

        async def idle() -> None:
            await instance.idle.wait()
            task = instance.profile_task
            if task is not None:
                await asyncio.wait({task})

        profiling = instance.profile_task is not None and not instance.profile_task.done()
        if instance.idle.is_set() and not profiling:
            return
        try:
            await asyncio.wait_for(idle(), timeout_s)
        except TimeoutError:
            logger.warning(
                "instance %s still has %d requests%s after %g s",
                instance.id,
                instance.num_requests,
                " and its profile" if profiling else "",
                timeout_s,
            )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("registry task failed", exc_info=task.exception())

    def _begin(self, instance: Instance) -> None:
        instance.num_requests += 1
        instance.idle.clear()

    def _end(self, instance: Instance) -> None:
        instance.num_requests -= 1
        if instance.num_requests == 0:
            instance.idle.set()

    async def _check(self, instance: Instance) -> None:
        """One Health call. It survives the instance being forgotten meanwhile (removed, scaled
        down, replaced): forgetting closes its channel, and grpc.aio ends a call on a closed
        channel with CancelledError, which would otherwise end the whole health-check loop."""
        try:
            health = await instance.client.health(timeout_s=self._health_check_timeout_s)
        except WorkerError as exc:
            self._apply_health_error(instance, exc)
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if instance.forgotten and task is not None and not task.cancelling():
                return  # the call's channel was closed; this task was not cancelled
            raise
        self._apply_health(instance, health)

    def stall_bound_s(self, instance: Instance) -> float:
        """How long ``instance`` may have work without completing a step, or leave Health
        unanswered, before it counts as not serving: max(floor, factor × its longest predicted
        step for its current load)."""
        return max(self._stall_floor_s, self._stall_factor * instance.predicted_step_s())

    def _apply_health(self, instance: Instance, health: WorkerHealth) -> None:
        if instance.forgotten:
            return
        instance.last_health_s = self._clock()
        instance.health = health
        problem = self._health_problem(instance.role, health) or self._stall_problem(
            instance, health
        )
        if instance.draining:
            self._set_state(instance, InstanceState.DRAINING, problem or "draining")
        elif health.draining:  # no new requests; those on it finish (never failed over)
            self._set_state(instance, InstanceState.DRAINING, "the worker is shutting down")
            self._cancel_profile(instance)
        elif problem is None:
            self._set_state(instance, InstanceState.READY, "ready")
            self._on_ready(instance)
        elif instance.state is InstanceState.STARTING:
            self._set_state(instance, InstanceState.STARTING, problem)
        else:
            self._set_state(instance, InstanceState.DEAD, problem)

    def _apply_health_error(self, instance: Instance, exc: WorkerError) -> None:
        if instance.forgotten:
            return
        detail = f"{exc.kind.value}: {exc.detail}"
        if exc.kind is WorkerErrorKind.TIMEOUT and instance.state is not InstanceState.STARTING:
            # A busy or briefly stopped worker answers late: it does not serve only once it has
            # not answered for longer than its stall bound. Refusing is decisive at once.
            bound_s = self.stall_bound_s(instance)
            last_s = instance.last_health_s
            silent_s = self._clock() - last_s if last_s is not None else float("inf")
            if instance.state is InstanceState.READY and silent_s <= bound_s:
                return
            detail = (
                f"unresponsive: Health has not answered for {silent_s:.1f} s "
                f"(bound {bound_s:g} s; {detail})"
            )
        if instance.state in (InstanceState.STARTING, InstanceState.DRAINING):
            self._set_state(instance, instance.state, detail)
        else:
            self._set_state(instance, InstanceState.DEAD, detail)

    def _stall_problem(self, instance: Instance, health: WorkerHealth) -> str | None:
        """ "stalled: ..." when the engine has work and made no step within its bound."""
        if health.num_engine_requests <= 0:
            return None
        bound_s = self.stall_bound_s(instance)
        if health.stalled_s <= bound_s:
            return None
        n = health.num_engine_requests
        return (
            f"stalled: engine made no step for {health.stalled_s:.1f} s with {n} "
            f"request{'s' if n != 1 else ''} (bound {bound_s:g} s)"
        )

    def _health_problem(self, role: WorkerRole, health: WorkerHealth) -> str | None:
        """Why an instance reporting ``health`` cannot serve ``role``; None when it can."""
        if not health.role.can_serve(role):
            return f"wrong role: reports {health.role.name}"
        if not health.ready:
            return "reports not ready"
        limits = self._limits
        if limits is not None:
            if health.block_size != limits.block_size:
                return f"block_size {health.block_size} != {limits.block_size} agreed"
            if health.max_model_len < limits.max_model_len:
                return f"max_model_len {health.max_model_len} < {limits.max_model_len} agreed"
        return None

    def _set_state(self, instance: Instance, state: InstanceState, detail: str) -> None:
        if instance.forgotten:
            return
        if instance.draining and state is not InstanceState.DRAINING:
            state = InstanceState.DRAINING
        if instance.state is not state:
            log = logger.info if state is InstanceState.READY else logger.warning
            log(
                "instance %s (%s %s): %s → %s: %s",
                instance.id,
                instance.role.name.lower(),
                instance.endpoint,
                instance.state.value,
                state.value,
                detail,
            )
        became_dead = state is InstanceState.DEAD and instance.state is not InstanceState.DEAD
        if instance.state is InstanceState.DEAD and state is not InstanceState.DEAD:
            instance.tripwire = Tripwire()  # calls from now on race a fresh one
        instance.state = state
        instance.detail = detail
        self._publish_ready(instance)
        if became_dead:
            instance.tripwire.trip(detail)  # its calls in flight fail over
            self._on_unhealthy(instance, detail)

    def _change_role(self, instance: Instance, role: WorkerRole) -> None:
        self._unpublish_ready(instance)
        logger.info("instance %s now serves %s", instance.id, role_name(role))
        instance.role = role
        self._publish_ready(instance)

    def _publish_ready(self, instance: Instance) -> None:
        self._metrics.worker_ready.labels(instance.endpoint, instance.role.name.lower()).set(
            1 if instance.state is InstanceState.READY else 0
        )

    def _unpublish_ready(self, instance: Instance) -> None:
        with suppress(KeyError):
            self._metrics.worker_ready.remove(instance.endpoint, role_name(instance.role))

    def _raise_on_wrong_role(self) -> None:
        wrong = [
            self._instances[i]
            for i in self._configured
            if i in self._instances and self._instances[i].detail.startswith("wrong role")
        ]
        if wrong:
            raise StartupError(
                "; ".join(
                    f"{m.endpoint} configured as {m.role.name.lower()} but {m.detail}"
                    for m in wrong
                )
            )

    def _describe_not_ready(self) -> str:
        return "; ".join(
            f"{m.role.name.lower()} {m.endpoint}: {m.detail}"
            for m in self._instances.values()
            if m.state is not InstanceState.READY
        ) or (
            "none configured and no decode worker in the registry" if not self._configured else ""
        )

    @staticmethod
    def _agree_on_limits(configured: Sequence[Instance]) -> ModelLimits:
        healths = [m.health for m in configured if m.health is not None]
        block_sizes = {h.block_size for h in healths}
        if len(block_sizes) != 1:
            raise StartupError(f"workers disagree on block_size: {sorted(block_sizes)}")
        models = {h.model for h in healths}
        if len(models) != 1:
            logger.warning("workers report different model names: %s", sorted(models))
        max_model_len = min(h.max_model_len for h in healths)
        if max_model_len < 2:
            raise StartupError(f"workers report max_model_len {max_model_len}")
        return ModelLimits(max_model_len=max_model_len, block_size=block_sizes.pop())
