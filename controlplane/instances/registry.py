"""The instance registry: every prefill and decode worker this gateway may use, its state, its load.

One owner. The registry alone changes instance state; the gateway reads immutable snapshots
(`InstanceInfo`, `InstanceView`) and reports what it saw through three calls:
`report_failure` (a request found the worker failing), the load trackers `track_prefill` /
`track_decode` (in-flight counters), and `note_failover`.

State, per gateway (controlplane/instances/types.py draws the diagram):

- **starting**: registered, Health has not said ready yet (a vLLM worker compiles for a minute).
- **ready**: the last Health said ready, with a role that serves the instance's role and model
  limits that agree with the gateway's. Only ready instances are picked.
- **dead**: a request found it unreachable (marked at once, so the next request does not try it),
  or Health failed: unreachable or "not ready" at once, a timeout only after 3 in a row (a
  worker busy with a long prefill can answer late). A dead instance comes back to ready when a
  Health call passes: heartbeats keep going to dead instances.
- **draining**: an operator drained it (shared through the store, so every gateway stops picking
  it); requests already on it finish. `remove` waits for them, then forgets it.

Records (id, role, endpoint, draining, launched) live in a `RegistryStore` — this process, or
Redis when several gateways share one cluster; every gateway polls the store and health-checks
every instance itself on each round, so the state above is each gateway's own.

Scheduling (docs/design/scheduling.md): the registry owns one `LatencyPredictor` per instance
(priors at first; calibrated by a profile of real calls when the instance turns ready,
controlplane/workers/profiling.py; refitted online from `observe_prefill` / `observe_decode`),
the current policy (`set_policy`, any of `POLICY_NAMES`) and the cluster-wide `PredictionAccuracy`
(MAPE gauges, `stats()`). What it feeds the predictors (docs/design/scheduling.md §2.2-2.3): engine
times of prefills that had their instance to themselves (`track_prefill` tells), each TTFT's
part beyond its prefill's engine time (`ttft_overhead_s`), each hand-off's first-chunk wait
beyond its steps (`DecodeTracker`, `handoff_s`), decode step means. `decide(request)` builds the
instances' `InstanceSnapshot`s (state, load, predictor) and asks the policy (whose TTFT includes
the instance's `ttft_overhead_s`, so admission sees it too).
`pick(role, exclude=...)` (round-robin over ready instances) is what failover uses once the
policy's choice has failed; `get(id)` turns a choice into an instance.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any

from controlplane.instances.store import (
    InstanceRecord,
    LocalRegistryStore,
    RegistryStore,
    RegistryStoreError,
)
from controlplane.instances.types import (
    ClusterStats,
    InstanceConflict,
    InstanceInfo,
    InstanceNotFound,
    InstanceState,
    InvalidAdminRequest,
    LaunchedWorker,
    Launcher,
)
from controlplane.metrics import GatewayMetrics
from controlplane.scheduling import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    Assign,
    Decision,
    InstanceSnapshot,
    LatencyPredictor,
    PredictionAccuracy,
    Reject,
    RequestSnapshot,
    SchedulingConfig,
    make_policy,
)
from controlplane.scheduling import InstanceLoad as SchedulingLoad
from controlplane.workers.client import WorkerClient, WorkerError, WorkerErrorKind, WorkerHealth
from controlplane.workers.profiling import ProfileSettings, YieldTo, plan_for, profile_worker
from controlplane.workers.roles import WorkerRole
from strata_common.endpoints import EndpointError, parse_endpoint

__all__ = [
    "DecodeTracker",
    "Instance",
    "InstanceLoad",
    "InstanceRegistry",
    "InstanceView",
    "KVIdentity",
    "ModelLimits",
    "StartupError",
]

logger = logging.getLogger(__name__)

_HEALTH_TIMEOUTS_BEFORE_DEAD = 3
_SERVING_ROLES = (WorkerRole.PREFILL, WorkerRole.DECODE)


class StartupError(RuntimeError):
    """The configured workers did not become usable (timeout, wrong role, disagreeing limits)."""


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What the configured workers agreed on at start-up; later instances must agree too."""

    max_model_len: int
    block_size: int


@dataclass(frozen=True, slots=True)
class KVIdentity:
    """What block keys are made of on the workers (their connector's root key inputs)."""

    model_fingerprint: bytes
    kv_layout: str
    block_size: int


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """What this gateway has running on one instance now. The field names are those of
    `controlplane.scheduling.types.InstanceLoad`, which a policy is built from."""

    queued_prefill_tokens: int = 0
    """Prompt tokens of the prefills sent to it and not answered yet."""
    queued_prefill_requests: int = 0
    running_decodes: int = 0
    decode_context_tokens: int = 0
    """Prompt plus generated tokens of its running decodes (the KV they occupy)."""
    remaining_decode_tokens: int = 0
    """Sum over its running decodes of the tokens they may still generate."""


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One ready instance as a scheduling policy sees it: the admin snapshot plus its load."""

    info: InstanceInfo
    load: InstanceLoad


class Instance:
    """One worker as this gateway sees it. Read freely; only the registry writes the fields."""

    __slots__ = (
        "client",
        "detail",
        "draining",
        "endpoint",
        "forgotten",
        "health",
        "id",
        "idle",
        "last_prefill_engine_s",
        "last_prefill_solo",
        "launched",
        "num_context_tokens",
        "num_health_timeouts",
        "num_prefill_starts",
        "num_prefills",
        "num_queued_prefill_tokens",
        "num_remaining_decode_tokens",
        "num_requests",
        "num_running_decodes",
        "predictor",
        "profile_state",
        "profile_task",
        "role",
        "state",
    )

    def __init__(self, record: InstanceRecord) -> None:
        self.id = record.id
        self.role = record.role
        self.endpoint = record.endpoint
        self.launched = record.launched
        self.draining = record.draining
        self.client = WorkerClient(record.endpoint)
        self.state = InstanceState.DRAINING if record.draining else InstanceState.STARTING
        self.detail = "not checked yet"
        self.health: WorkerHealth | None = None
        self.num_health_timeouts = 0
        """Consecutive Health calls that timed out while the instance was ready."""
        self.num_requests = 0
        """Prefills plus decodes this gateway has on it now (what draining waits for)."""
        self.num_prefills = 0
        self.num_prefill_starts = 0
        """Prefills ever started on it (tells a prefill whether another overlapped it)."""
        self.last_prefill_solo = False
        """The prefill that ended last had the instance to itself (its engine time is a clean
        sample of the prefill model, not one inflated by sharing steps with others)."""
        self.last_prefill_engine_s: float | None = None
        """Engine time of the prefill that ended last, until its TTFT is observed."""
        self.num_queued_prefill_tokens = 0
        self.num_running_decodes = 0
        self.num_context_tokens = 0
        self.num_remaining_decode_tokens = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.forgotten = False
        self.predictor = LatencyPredictor()
        """Its latency model (owned by the registry; kept while it is dead, for its return)."""
        self.profile_state = "not run"
        """"not run", "running", "done", "skipped", "cancelled" or "failed: ..." (the start-up
        profile)."""
        self.profile_task: asyncio.Task[None] | None = None
        """The start-up profile while it runs: control-plane work on the worker that draining
        cancels and waits for, like a request."""

    @property
    def kv_source(self) -> str | None:
        """Source id of its engine's HBM events in the prefix index (None: not reported)."""
        return self.health.kv_source or None if self.health is not None else None

    def scheduling_snapshot(self) -> InstanceSnapshot:
        return InstanceSnapshot(
            id=self.id,
            role=self.role,
            state=self.state,
            predictor=self.predictor,
            load=SchedulingLoad(
                queued_prefill_tokens=self.num_queued_prefill_tokens,
                queued_prefill_requests=self.num_prefills,
                running_decodes=self.num_running_decodes,
                decode_context_tokens=self.num_context_tokens,
                remaining_decode_tokens=self.num_remaining_decode_tokens,
            ),
            capacity=self.capacity,
            host=self.endpoint.rpartition(":")[0],
            kv_source=self.kv_source,
        )

    @property
    def capacity(self) -> int:
        return self.health.capacity if self.health is not None else 0

    def record(self) -> InstanceRecord:
        return InstanceRecord(
            self.id, self.role, self.endpoint, draining=self.draining, launched=self.launched
        )

    def info(self) -> InstanceInfo:
        capacity = self.capacity
        return InstanceInfo(
            id=self.id,
            role=self.role,
            state=self.state,
            endpoint=self.endpoint,
            model=self.health.model if self.health is not None else "",
            block_size=self.health.block_size if self.health is not None else 0,
            capacity=capacity,
            in_flight=self.num_requests,
            load=self.num_requests / capacity if capacity else 0.0,
            launched=self.launched,
            detail=self.detail,
        )

    def load(self) -> InstanceLoad:
        return InstanceLoad(
            queued_prefill_tokens=self.num_queued_prefill_tokens,
            queued_prefill_requests=self.num_prefills,
            running_decodes=self.num_running_decodes,
            decode_context_tokens=self.num_context_tokens,
            remaining_decode_tokens=self.num_remaining_decode_tokens,
        )


class DecodeTracker:
    """Moves an instance's decode counters along as its decode streams tokens. A decode that
    prefills its own prompt (a local route) also counts as a queued prefill until its first
    tokens arrive.

    It also times the stream for the latency model: a decode that takes over a request
    prefilled elsewhere (no local prefill) waits ``w`` for its first chunk of ``j`` tokens,
    then steps ``s`` apart on average (over the later chunks); ``w - j·s`` is what the hand-off
    cost beyond the steps (:meth:`handoff_extra_s`, the decode predictor's ``handoff_s``)."""

    __slots__ = (
        "_clock",
        "_first_chunk_s",
        "_first_chunk_tokens",
        "_instance",
        "_last_chunk_s",
        "_num_later_tokens",
        "_start_s",
        "is_handoff",
        "num_context_tokens",
        "num_pending_prefill_tokens",
        "num_remaining_tokens",
        "prefill_pending",
    )

    def __init__(
        self,
        instance: Instance,
        num_context_tokens: int,
        num_remaining_tokens: int,
        num_prefill_tokens: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._instance = instance
        self.num_context_tokens = num_context_tokens
        self.num_remaining_tokens = num_remaining_tokens
        self.prefill_pending = num_prefill_tokens is not None
        self.is_handoff = not self.prefill_pending
        self.num_pending_prefill_tokens = num_prefill_tokens or 0
        if self.prefill_pending:
            instance.num_prefills += 1
            instance.num_prefill_starts += 1
            instance.num_queued_prefill_tokens += self.num_pending_prefill_tokens
        self._clock = clock
        self._start_s = clock()
        self._first_chunk_s: float | None = None
        self._first_chunk_tokens = 0
        self._last_chunk_s = 0.0
        self._num_later_tokens = 0

    def handoff_extra_s(self) -> float | None:
        """First-chunk wait minus its tokens' share of the later steps, for a hand-off that
        streamed at least two tokens after its first chunk; None otherwise."""
        first = self._first_chunk_s
        if not self.is_handoff or first is None or self._num_later_tokens < 2:
            return None
        step_s = (self._last_chunk_s - first) / self._num_later_tokens
        return (first - self._start_s) - self._first_chunk_tokens * step_s

    def end_prefill(self) -> None:
        """The local prefill is done (first tokens, or the decode ended)."""
        if self.prefill_pending:
            self.prefill_pending = False
            self._instance.num_prefills -= 1
            self._instance.num_queued_prefill_tokens -= self.num_pending_prefill_tokens

    def add_tokens(self, num_tokens: int) -> None:
        self.end_prefill()
        if num_tokens > 0:
            now = self._clock()
            if self._first_chunk_s is None:
                self._first_chunk_s = now
                self._first_chunk_tokens = num_tokens
            else:
                self._num_later_tokens += num_tokens
            self._last_chunk_s = now
        num_tokens = min(num_tokens, self.num_remaining_tokens)
        self.num_context_tokens += num_tokens
        self.num_remaining_tokens -= num_tokens
        self._instance.num_context_tokens += num_tokens
        self._instance.num_remaining_decode_tokens -= num_tokens


class InstanceRegistry:
    """The instances, their state and load; the gateway's `AdminBackend`."""

    def __init__(
        self,
        *,
        metrics: GatewayMetrics,
        health_check_timeout_s: float,
        store: RegistryStore | None = None,
        launcher: Launcher | None = None,
        drain_timeout_s: float = 60.0,
        policy_names: Collection[str] = POLICY_NAMES,
        policy: str | None = None,
        scheduling: SchedulingConfig | None = None,
        profile: ProfileSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._health_check_timeout_s = health_check_timeout_s
        self._store: RegistryStore = store if store is not None else LocalRegistryStore()
        self._launcher = launcher
        self._drain_timeout_s = drain_timeout_s
        self._policy_names = tuple(policy_names)
        if policy is None:
            policy = (
                DEFAULT_POLICY if DEFAULT_POLICY in self._policy_names else self._policy_names[0]
            )
        self._scheduling = scheduling if scheduling is not None else SchedulingConfig()
        self._profile = profile if profile is not None else ProfileSettings(enabled=False)
        self._policy = make_policy(policy, self._scheduling)
        self._accuracy = PredictionAccuracy()
        self._num_rejected = 0
        self._num_profiles = 0
        self._instances: dict[str, Instance] = {}
        self._configured: set[str] = set()
        self._launched: dict[str, LaunchedWorker] = {}
        """Workers this gateway's launcher started, by instance id (it may stop them)."""
        self._limits: ModelLimits | None = None
        self._round_robin = {role: itertools.count() for role in _SERVING_ROLES}
        self._tasks: set[asyncio.Task[None]] = set()
        self._num_requests = 0
        self._num_failovers = 0

    # -- start-up -----------------------------------------------------------------------------

    @property
    def limits(self) -> ModelLimits:
        if self._limits is None:
            raise RuntimeError("InstanceRegistry.limits read before wait_until_ready()")
        return self._limits

    @property
    def store_description(self) -> str:
        return self._store.description

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
        """Poll until every configured worker is ready, then fix the model limits."""
        deadline = time.monotonic() + timeout_s
        next_log = time.monotonic() + 10.0
        while True:
            await self.check_all()
            self._raise_on_wrong_role()
            configured = [self._instances[i] for i in self._configured if i in self._instances]
            if all(m.state is InstanceState.READY for m in configured):
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

    # -- selection and load -------------------------------------------------------------------

    def is_ready(self) -> bool:
        """True when at least one prefill and one decode instance are ready."""
        return all(
            any(m.role is role and m.state is InstanceState.READY for m in self._instances.values())
            for role in _SERVING_ROLES
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

    # -- scheduling -----------------------------------------------------------------------------

    def decide(self, request: RequestSnapshot) -> Decision:
        """The current policy's choice for ``request`` over every known instance (only ready
        ones can be chosen); counted in the route / rejection metrics."""
        instances = [m.scheduling_snapshot() for m in self._instances.values()]
        decision = self._policy.decide(request, instances)
        if isinstance(decision, Reject):
            self._num_rejected += 1
            self._metrics.requests_rejected.labels(decision.reason.value).inc()
        else:
            self._metrics.routes.labels(decision.policy, decision.route.value).inc()
        return decision

    def engine_sources(self) -> frozenset[str]:
        """KV source ids of the known engines (holders of HBM blocks in the prefix index)."""
        return frozenset(s for m in self._instances.values() if (s := m.kv_source) is not None)

    def kv_identity(self) -> KVIdentity | None:
        """How the workers name KV blocks, from the first ready instance that reports it."""
        for m in self._instances.values():
            h = m.health
            if m.state is InstanceState.READY and h is not None and h.model_fingerprint:
                return KVIdentity(h.model_fingerprint, h.kv_layout, h.block_size)
        return None

    def describe_role(self, role: WorkerRole) -> str:
        """Why no instance of ``role`` can be used (for error messages)."""
        of_role = [m for m in self._instances.values() if m.role is role]
        details = "; ".join(f"{m.endpoint}: {m.state.value}, {m.detail}" for m in of_role)
        return f"no {_name(role)} worker is ready ({details or 'none registered'})"

    def observe_prefill(self, instance: Instance, new: int, cached: int, seconds: float) -> None:
        """An observed prefill on ``instance`` (engine time), called as its `track_prefill`
        block ends: refits its model online if no other prefill overlapped it (an overlapped
        one shared engine steps: its time is queueing plus service, which the queue model
        predicts, not the prefill model); kept for the TTFT that follows (`observe_ttft`)."""
        solo, instance.last_prefill_solo = instance.last_prefill_solo, False
        if new >= 0 and cached >= 0 and math.isfinite(seconds) and seconds > 0:
            instance.last_prefill_engine_s = seconds
            if solo:
                instance.predictor.observe_prefill(new, cached, seconds)

    def observe_decode(
        self, instance: Instance, batch_size: float, context_tokens: float, step_s: float
    ) -> None:
        """Mean decode step of one stream on ``instance`` at its mean batch and context."""
        if batch_size >= 1 and context_tokens >= 0 and math.isfinite(step_s) and step_s > 0:
            instance.predictor.observe_decode_step(round(batch_size), round(context_tokens), step_s)

    def observe_ttft(self, assign: Assign, instance: Instance, observed_s: float) -> None:
        """The request's TTFT against its prediction; after a prefill on ``instance`` (the
        gateway calls this right after that prefill's `observe_prefill`, with no await between)
        the part beyond the engine time is a sample of the instance's ``ttft_overhead_s``."""
        engine_s, instance.last_prefill_engine_s = instance.last_prefill_engine_s, None
        if engine_s is not None and assign.prefill == instance.id and observed_s >= engine_s:
            instance.predictor.observe_ttft_overhead(observed_s - engine_s)
        if observed_s > 0:
            self._accuracy.observe_ttft(assign.predicted_ttft_s, observed_s)
            instance.predictor.accuracy.observe_ttft(assign.predicted_ttft_s, observed_s)
            self._metrics.predictor_ttft_mape.set(self._accuracy.ttft_mape or 0.0)

    def observe_tpot(self, assign: Assign, instance: Instance, observed_s: float) -> None:
        if observed_s > 0:
            self._accuracy.observe_tpot(assign.predicted_tpot_s, observed_s)
            instance.predictor.accuracy.observe_tpot(assign.predicted_tpot_s, observed_s)
            self._metrics.predictor_tpot_mape.set(self._accuracy.tpot_mape or 0.0)

    @property
    def accuracy(self) -> PredictionAccuracy:
        return self._accuracy

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

    @contextmanager
    def track_prefill(self, instance: Instance, num_prompt_tokens: int) -> Iterator[None]:
        """Counts one prefill of ``num_prompt_tokens`` uncached tokens on ``instance`` while the
        block runs."""
        self._begin(instance)
        overlapped = instance.num_prefills > 0
        starts = instance.num_prefill_starts = instance.num_prefill_starts + 1
        instance.num_prefills += 1
        instance.num_queued_prefill_tokens += num_prompt_tokens
        try:
            yield
        finally:
            instance.num_queued_prefill_tokens -= num_prompt_tokens
            instance.num_prefills -= 1
            # Solo: nothing in flight when it started and nothing started since.
            instance.last_prefill_solo = not overlapped and instance.num_prefill_starts == starts
            self._end(instance)

    @contextmanager
    def track_decode(
        self,
        instance: Instance,
        num_context_tokens: int,
        num_max_tokens: int,
        *,
        num_prefill_tokens: int | None = None,
    ) -> Iterator[DecodeTracker]:
        """Counts one decode on ``instance`` while the block runs; the tracker moves the tokens
        it generates from the instance's remaining tokens to its context tokens.
        ``num_prefill_tokens``: the decode prefills its prompt itself (a local route); these
        uncached tokens count as queued prefill work until its first tokens."""
        self._begin(instance)
        instance.num_running_decodes += 1
        instance.num_context_tokens += num_context_tokens
        instance.num_remaining_decode_tokens += num_max_tokens
        tracker = DecodeTracker(
            instance, num_context_tokens, num_max_tokens, num_prefill_tokens, clock=self._clock
        )
        try:
            yield tracker
        finally:
            extra_s = tracker.handoff_extra_s()
            if extra_s is not None:
                instance.predictor.observe_handoff(extra_s)
            tracker.end_prefill()
            instance.num_context_tokens -= tracker.num_context_tokens
            instance.num_remaining_decode_tokens -= tracker.num_remaining_tokens
            instance.num_running_decodes -= 1
            self._end(instance)

    def note_request(self) -> None:
        self._num_requests += 1

    def note_failover(self, role: WorkerRole) -> None:
        """A request moved to another instance of ``role`` after one failed."""
        self._num_failovers += 1
        self._metrics.failovers.labels(role.name.lower()).inc()

    def report_failure(self, instance: Instance, error: WorkerError) -> None:
        """A request saw ``error`` from ``instance``; unreachable → dead at once."""
        self._metrics.worker_errors.labels(error.rpc, error.kind.value).inc()
        if error.kind is WorkerErrorKind.UNAVAILABLE:
            self._set_state(instance, InstanceState.DEAD, f"unavailable: {error.detail}")

    # -- heartbeats and the shared store ------------------------------------------------------

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
        for record in records.values():
            instance = self._instances.get(record.id)
            if instance is None:
                self._adopt(record)
                logger.info(
                    "instance %s (%s %s) registered", record.id, _name(record.role), record.endpoint
                )
                continue
            if record.role is not instance.role:
                self._change_role(instance, record.role)
            if record.draining and not instance.draining:
                instance.draining = True
                self._set_state(instance, InstanceState.DRAINING, "draining")
                self._cancel_profile(instance)
        for instance in list(self._instances.values()):
            if instance.id in known_before and instance.id not in records:
                logger.info("instance %s (%s) was removed", instance.id, instance.endpoint)
                self._forget(instance, stop_after_s=self._drain_timeout_s)

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

    # -- AdminBackend -------------------------------------------------------------------------

    def list_instances(self) -> Sequence[InstanceInfo]:
        return [m.info() for m in self._instances.values()]

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
        probe = WorkerClient(endpoint)
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
                    f"worker {endpoint} cannot serve {_name(role)}: {problem}"
                )
        record, created = await self._store.register(role, endpoint, launched=False)
        if not created:
            raise InstanceConflict(f"{endpoint} is already registered as {record.id}")
        instance = self._adopt(record)
        if health is not None:
            self._apply_health(instance, health)
        logger.info("instance %s (%s %s) added", instance.id, _name(role), endpoint)
        return instance.info()

    async def drain(self, instance_id: str) -> InstanceInfo:
        instance = self.get(instance_id)
        if not instance.draining:
            instance.draining = True
            await self._store.update(instance.record())
            self._set_state(instance, InstanceState.DRAINING, "draining")
        self._cancel_profile(instance)
        return instance.info()

    @staticmethod
    def _cancel_profile(instance: Instance) -> None:
        """A drained worker needs no profile: its calls are cancelled (the worker aborts them),
        and :meth:`_wait_idle` waits until they are gone."""
        task = instance.profile_task
        if task is not None and not task.done():
            task.cancel()

    async def remove(self, instance_id: str, *, wait_s: float) -> None:
        if not wait_s >= 0:
            raise InvalidAdminRequest(f"wait_s must be >= 0, got {wait_s}")
        instance = self.get(instance_id)
        await self.drain(instance_id)
        await self._wait_idle(instance, wait_s)
        await self._store.delete(instance.id)
        self._forget(instance, stop_after_s=0.0)

    async def set_role(self, instance_id: str, role: WorkerRole) -> InstanceInfo:
        """Change the role an instance serves.

        - a worker started with ``--role both`` (it reports BOTH): switched in place;
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
        handle = self._launched.get(instance.id)
        if handle is None or self._launcher is None:
            raise InstanceConflict(
                f"instance {instance.id} ({instance.endpoint}) is a {_name(instance.role)} worker "
                "that this gateway did not launch: its role is fixed by its own --role; start a "
                f"{_name(role)} worker and `strata admin add` it instead"
            )
        await self.drain(instance.id)
        await self._wait_idle(instance, self._drain_timeout_s)
        await self._store.delete(instance.id)
        del self._launched[instance.id]  # stopped here, before its successor takes its cores
        self._forget(instance, stop_after_s=0.0)
        await handle.stop(timeout_s=10.0)
        return await self._launch(role)

    async def scale(self, role: WorkerRole, replicas: int) -> Sequence[InstanceInfo]:
        """Launch, or drain and stop launched instances, until ``replicas`` of ``role`` are
        starting or ready. Scaling down stops only workers this gateway launched (starting ones
        first, then the least loaded); it returns at once, the drained ones stop when their
        requests are done (or after the drain timeout)."""
        _check_role(role)
        if replicas < 0:
            raise InvalidAdminRequest(f"replicas must be >= 0, got {replicas}")
        active = [
            m
            for m in self._instances.values()
            if m.role is role and m.state in (InstanceState.STARTING, InstanceState.READY)
        ]
        if replicas > len(active):
            if self._launcher is None:
                raise InstanceConflict("this gateway has no launcher: it cannot start workers")
            for _ in range(replicas - len(active)):
                await self._launch(role)
        elif replicas < len(active):
            ours = [m for m in active if m.id in self._launched]
            ours.sort(key=lambda m: (m.state is InstanceState.READY, m.num_requests))
            excess = len(active) - replicas
            if len(ours) < excess:
                raise InstanceConflict(
                    f"scaling {_name(role)} to {replicas} would stop {excess} workers but this "
                    f"gateway launched only {len(ours)} of them; `strata admin remove` the others"
                )
            for instance in ours[:excess]:
                await self.drain(instance.id)
                self._spawn(self._retire(instance))
        return [m.info() for m in self._instances.values() if m.role is role]

    def set_policy(self, name: str) -> None:
        if name not in self._policy_names:
            raise InvalidAdminRequest(
                f"unknown policy {name!r}; available: {', '.join(self._policy_names)}"
            )
        if name != self._policy.name:
            self._policy = make_policy(name, self._scheduling)
            logger.info("scheduling policy is now %s", name)

    @property
    def policy(self) -> str:
        return self._policy.name

    def stats(self) -> ClusterStats:
        instances = list(self._instances.values())
        return ClusterStats(
            policy=self._policy.name,
            instances=tuple(m.info() for m in instances),
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
            },
        )

    # -- internals ----------------------------------------------------------------------------

    def _adopt(self, record: InstanceRecord) -> Instance:
        """The local instance of ``record``, created if new (idempotent)."""
        instance = self._instances.get(record.id)
        if instance is None:
            instance = Instance(record)
            self._instances[record.id] = instance
            self._publish_ready(instance)
        return instance

    async def _launch(self, role: WorkerRole) -> InstanceInfo:
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
        logger.info("instance %s (%s %s) launched", instance.id, _name(role), handle.endpoint)
        return instance.info()

    async def _retire(self, instance: Instance) -> None:
        await self._wait_idle(instance, self._drain_timeout_s)
        try:
            await self._store.delete(instance.id)
        except RegistryStoreError:
            logger.exception("could not delete %s from the registry", instance.id)
        self._forget(instance, stop_after_s=0.0)

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
        try:
            health = await instance.client.health(timeout_s=self._health_check_timeout_s)
        except WorkerError as exc:
            self._apply_health_error(instance, exc)
            return
        self._apply_health(instance, health)

    def _apply_health(self, instance: Instance, health: WorkerHealth) -> None:
        if instance.forgotten:
            return
        instance.num_health_timeouts = 0
        instance.health = health
        problem = self._health_problem(instance.role, health)
        if instance.draining:
            self._set_state(instance, InstanceState.DRAINING, problem or "draining")
        elif problem is None:
            self._set_state(instance, InstanceState.READY, "ready")
            self._maybe_profile(instance)
        elif instance.state is InstanceState.STARTING:
            self._set_state(instance, InstanceState.STARTING, problem)
        else:
            self._set_state(instance, InstanceState.DEAD, problem)

    def _maybe_profile(self, instance: Instance) -> None:
        """Start the instance's profile the first time it is ready (docs/design/scheduling.md
        §2.3); until it lands the instance is scheduled with its priors."""
        if instance.profile_state != "not run":
            return
        health = instance.health
        settings = self._profile
        if (
            not settings.enabled
            or health is None
            or health.capacity < 1
            or settings.vocab_size <= 0
            or health.block_size < 1
        ):
            instance.profile_state = "skipped"  # e.g. a worker that does not report its limits
            return
        instance.profile_state = "running"
        sibling = self._calibrated_sibling(instance)
        if sibling is not None:
            instance.predictor.adopt(sibling.predictor)
            logger.info(
                "instance %s starts with the profile of %s (same model and hardware: %s)",
                instance.id,
                sibling.id,
                health.hardware,
            )
        instance.profile_task = self._spawn(self._profile_instance(instance, health))

    def _calibrated_sibling(self, instance: Instance) -> Instance | None:
        """A profiled instance of the same role and model on the same hardware (the roles'
        profiles differ: a prefill worker's decode model is not measured, and a decode
        worker's prefill samples are times to a first token at the gateway)."""
        health = instance.health
        if health is None or not health.hardware or not health.model_fingerprint:
            return None
        siblings = [
            m
            for m in self._instances.values()
            if m is not instance
            and m.profile_state == "done"
            and m.predictor.calibrated
            and m.health is not None
            and m.health.hardware == health.hardware
            and m.health.model_fingerprint == health.model_fingerprint
            and m.role is instance.role
        ]
        return siblings[0] if siblings else None

    def _yield_to(self, instance: Instance) -> YieldTo:
        """The profile's gate: its next call waits until the instance runs no client request."""

        async def wait(timeout_s: float) -> bool:
            if instance.idle.is_set():
                return True
            try:
                await asyncio.wait_for(instance.idle.wait(), timeout_s)
            except TimeoutError:
                return False
            return True

        return wait

    async def _profile_instance(self, instance: Instance, health: WorkerHealth) -> None:
        plan = plan_for(self._profile, health.max_model_len, health.block_size, health.capacity)
        seed = hash((instance.id, instance.endpoint, time.time_ns()))
        try:
            result = await profile_worker(
                instance.client,
                instance.role,
                plan,
                self._profile,
                seed=seed,
                base=instance.predictor,
                yield_to=self._yield_to(instance),
            )
            if not result.measured_prefill and instance.predictor.calibrated:
                # Too few points to fit (a busy host) and a sibling's full profile in use: the
                # sibling's fit is the better model; the online refits take it from here.
                instance.profile_state = "done"
                self._num_profiles += 1
                self._metrics.profiled_instances.labels(_name(instance.role)).inc()
                logger.info(
                    "instance %s: only %d profile points in %.1f s; keeping its sibling's profile",
                    instance.id,
                    result.num_prefill_measured,
                    result.seconds,
                )
                return
            instance.predictor.calibrate(
                result.prefill,
                result.decode,
                ttft_overhead_s=result.ttft_overhead_s,
                handoff_s=result.handoff_s,
            )
        except asyncio.CancelledError:
            instance.profile_state = "cancelled"
            logger.info("profile of %s cancelled", instance.id)
            raise
        except (WorkerError, ValueError) as exc:
            instance.profile_state = f"failed: {exc}"
            kept = "its sibling's profile" if instance.predictor.calibrated else "priors"
            logger.warning("profile of %s failed, keeping %s: %s", instance.id, kept, exc)
            return
        finally:
            instance.profile_task = None
        instance.profile_state = "done"
        self._num_profiles += 1
        self._metrics.profiled_instances.labels(_name(instance.role)).inc()
        p, d = instance.predictor.prefill, instance.predictor.decode
        logger.info(
            "instance %s profiled in %.1f s (%.1f s waiting for client requests; %d prefill, "
            "%d decode samples%s; %d points skipped by the bounds): prefill %.2f ms + "
            "%.3f us/new + %.3f us/cached + %.4f ns/pair; decode step %.2f ms + %.3f ms/seq + "
            "%.4f us/token; TTFT overhead %.2f ms, hand-off %.2f ms",
            instance.id,
            result.seconds,
            result.waited_s,
            len(result.prefill) if result.measured_prefill else 0,
            len(result.decode) if result.measured_decode else 0,
            "" if result.measured_prefill and result.measured_decode else ", the rest scaled",
            result.num_skipped,
            p.fixed_s * 1e3,
            p.per_new_token_s * 1e6,
            p.per_cached_token_s * 1e6,
            p.per_attention_pair_s * 1e9,
            d.fixed_s * 1e3,
            d.per_sequence_s * 1e3,
            d.per_context_token_s * 1e6,
            instance.predictor.ttft_overhead_s * 1e3,
            instance.predictor.handoff_s * 1e3,
        )

    def _apply_health_error(self, instance: Instance, exc: WorkerError) -> None:
        if instance.forgotten:
            return
        detail = f"{exc.kind.value}: {exc.detail}"
        if instance.state is InstanceState.READY and exc.kind is WorkerErrorKind.TIMEOUT:
            # A busy engine can answer Health late; unreachable or refusing is decisive at once.
            instance.num_health_timeouts += 1
            if instance.num_health_timeouts < _HEALTH_TIMEOUTS_BEFORE_DEAD:
                return
        if instance.state in (InstanceState.STARTING, InstanceState.DRAINING):
            self._set_state(instance, instance.state, detail)
        else:
            self._set_state(instance, InstanceState.DEAD, detail)

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
        instance.state = state
        instance.detail = detail
        self._publish_ready(instance)

    def _change_role(self, instance: Instance, role: WorkerRole) -> None:
        self._unpublish_ready(instance)
        logger.info("instance %s now serves %s", instance.id, _name(role))
        instance.role = role
        self._publish_ready(instance)

    def _publish_ready(self, instance: Instance) -> None:
        self._metrics.worker_ready.labels(instance.endpoint, instance.role.name.lower()).set(
            1 if instance.state is InstanceState.READY else 0
        )

    def _unpublish_ready(self, instance: Instance) -> None:
        with suppress(KeyError):
            self._metrics.worker_ready.remove(instance.endpoint, _name(instance.role))

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


def _check_role(role: WorkerRole) -> None:
    if role not in _SERVING_ROLES:
        raise InvalidAdminRequest(f"role must be prefill or decode, got {role.name.lower()}")


def _name(role: WorkerRole) -> str:
    return role.name.lower()
