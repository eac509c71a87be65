"""One instance as this gateway sees it (:class:`Instance`), and the small records around it.

Only the registry (controlplane/instances/registry.py and the layers it is built of) writes an
:class:`Instance`'s fields; everything else reads them or the immutable snapshots it hands out
(:class:`~controlplane.instances.types.InstanceInfo`, :class:`InstanceView`,
:class:`~controlplane.scheduling.InstanceSnapshot`).

Cutting in-flight calls: each instance has a :class:`Tripwire` that the registry trips when the
instance goes dead (any cause: unreachable, unresponsive, stalled, not ready) and replaces with
a fresh one when it leaves dead. The gateway's worker calls are awaited through
:func:`call_while_up` / :func:`stream_while_up` (each chunk of a stream): a trip cuts them at
once with ``WorkerError(UNAVAILABLE, reason)`` and cancels the gRPC call (the worker aborts it
when it runs again), so the request fails over as after a crash
(controlplane/request/generation.py). A call started after the trip is cut before it is sent.
No task or poll per call: ~1 us of CPU per chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from controlplane.instances.store import (
    InstanceRecord,
)
from controlplane.instances.types import (
    InstanceInfo,
    InstanceState,
)
from controlplane.scheduling import (
    InstanceLoad,
    InstanceSnapshot,
    LatencyPredictor,
)
from controlplane.workers.client import WorkerClient, WorkerError, WorkerErrorKind, WorkerHealth
from strata_common.endpoints import parse_endpoint
from strata_common.grpc_auth import ClientAuth

__all__ = [
    "Instance",
    "InstanceView",
    "KVIdentity",
    "ModelLimits",
    "StartupError",
    "Tripwire",
    "call_while_up",
    "stream_while_up",
]

T = TypeVar("T")

logger = logging.getLogger("controlplane.instances.registry")


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
class InstanceView:
    """One ready instance as a scheduling policy sees it: the admin snapshot plus its load."""

    info: InstanceInfo
    load: InstanceLoad
    """Its in-flight work (the same record a policy's :class:`InstanceSnapshot` carries)."""


class Tripwire:
    """Tripped once, with a reason, when its instance goes dead: the calls awaiting through it
    (:func:`call_while_up`, :func:`stream_while_up`) are cut.

    Cutting costs nothing per call or chunk beyond a set insertion: a call registers the task
    that awaits it while it waits, and the trip cancels those tasks (in this single-threaded
    loop a task can only be waiting when the trip runs, so the cancellation always lands on the
    call's await: the call is cancelled, which cancels its gRPC call). The helper that
    registered the task turns that cancellation, and only that one (``Task.uncancel``, as
    ``asyncio.timeout`` does), into the WorkerError."""

    __slots__ = ("_cut", "_waiting", "reason")

    def __init__(self) -> None:
        self._waiting: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()
        self.reason: str | None = None
        """Why it tripped; None while it has not."""

    @property
    def tripped(self) -> bool:
        return self.reason is not None

    def trip(self, reason: str) -> None:
        """Cut every call waiting through it (idempotent: the first reason stays)."""
        if self.reason is not None:
            return
        self.reason = reason
        for task in self._waiting:
            if task.cancel(f"instance went dead: {reason}"):
                self._cut.add(task)

    async def _await(self, instance: Instance, rpc: str, awaitable: Awaitable[T]) -> T:
        if self.reason is not None:
            raise _cut(instance, rpc, self)
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Tripwire calls need a running task")
        self._waiting.add(task)
        try:
            result = await awaitable
        except asyncio.CancelledError:
            if task in self._cut:
                self._cut.discard(task)
                if task.uncancel() == 0:  # only this wire cancelled it
                    raise _cut(instance, rpc, self) from None
            raise
        finally:
            self._waiting.discard(task)
        if task in self._cut:  # the call swallowed the cancellation: its result is good
            self._cut.discard(task)
            task.uncancel()
        return result


def _cut(instance: Instance, rpc: str, wire: Tripwire) -> WorkerError:
    return WorkerError(WorkerErrorKind.UNAVAILABLE, instance.endpoint, rpc, wire.reason or "down")


async def call_while_up(instance: Instance, rpc: str, call: Coroutine[Any, Any, T]) -> T:
    """Await ``call`` (a call on ``instance``'s worker) unless the instance goes dead first:
    then it is cancelled and WorkerError(UNAVAILABLE, the reason) is raised."""
    wire = instance.tripwire
    if wire.tripped:
        call.close()
        raise _cut(instance, rpc, wire)
    return await wire._await(instance, rpc, call)


async def stream_while_up(
    instance: Instance, rpc: str, stream: AsyncGenerator[T, None]
) -> AsyncGenerator[T, None]:
    """``stream``'s items (a streaming call on ``instance``'s worker) until the instance goes
    dead: then the stream is closed (the call cancelled) and WorkerError(UNAVAILABLE, the
    reason) is raised. Closing this generator closes ``stream``."""
    wire = instance.tripwire
    try:
        while True:
            try:
                item = await wire._await(instance, rpc, anext(stream))
            except StopAsyncIteration:
                return
            yield item
    finally:
        await stream.aclose()


class Instance:
    """One worker as this gateway sees it. Read freely; only the registry writes the fields."""

    __slots__ = (
        "_snapshot",
        "_snapshot_health",
        "_snapshot_inputs",
        "announced",
        "client",
        "detail",
        "draining",
        "endpoint",
        "forgotten",
        "health",
        "host",
        "id",
        "idle",
        "last_health_s",
        "last_prefill_engine_s",
        "last_prefill_solo",
        "launched",
        "num_context_tokens",
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
        "tripwire",
    )

    def __init__(self, record: InstanceRecord, *, auth: ClientAuth | None = None) -> None:
        """``auth``: the gateway's cluster credentials for its calls to the worker."""
        self.id = record.id
        self.role = record.role
        self.endpoint = record.endpoint
        self.host = parse_endpoint(record.endpoint).host
        """The endpoint's host: instances with the same one share memory (KV moves by shm)."""
        self.launched = record.launched
        self.announced = record.announced
        """Registered from the worker's announcement: removed once that is gone."""
        self.draining = record.draining
        self.client = WorkerClient(record.endpoint, auth=auth)
        self.state = InstanceState.DRAINING if record.draining else InstanceState.STARTING
        self.detail = "not checked yet"
        self.health: WorkerHealth | None = None
        self.last_health_s: float | None = None
        """When (the registry's clock) a Health call last answered; None: never."""
        self.tripwire = Tripwire()
        """Tripped when it goes dead: cuts the gateway's calls in flight on it (a fresh one
        when it leaves dead)."""
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
        """"not run", "running", "done", "skipped", "cancelled", "failed: ..." or "rejected:
        ..." (the start-up profile; a rejected one failed its plausibility check)."""
        self.profile_task: asyncio.Task[None] | None = None
        """The start-up profile while it runs: control-plane work on the worker that draining
        cancels and waits for, like a request."""
        self._snapshot: InstanceSnapshot | None = None
        self._snapshot_inputs: tuple[object, ...] = ()
        self._snapshot_health: WorkerHealth | None = None
        """What the last scheduling snapshot was built from (it is reused while they hold)."""

    @property
    def kv_source(self) -> str | None:
        """Source id of its engine's HBM events in the prefix index (None: not reported)."""
        return self.health.kv_source or None if self.health is not None else None

    def scheduling_snapshot(
        self, margin_quantile: float = 0.0, now: float = 0.0
    ) -> InstanceSnapshot:
        """What the policy sees of it; ``margin_quantile``: the quantile of its recent TTFT
        ratios that admission scales its predictions by (its ``ttft_margin``, at ``now``).

        Every decision takes one of every instance, and most instances have not changed since
        the last (a snapshot cost ~2.7 us, 0.7 ms a decision at 256 instances): the last one is
        reused while everything it was built from is the same — the predictor's object too (a
        snapshot holds it, not its coefficients)."""
        margin = self.predictor.ttft_margin(margin_quantile, now)
        inputs = (
            self.state,
            self.role,
            margin,
            self.num_queued_prefill_tokens,
            self.num_prefills,
            self.num_running_decodes,
            self.num_context_tokens,
            self.num_remaining_decode_tokens,
        )
        snapshot = self._snapshot
        if (
            snapshot is not None
            and snapshot.predictor is self.predictor
            and self._snapshot_health is self.health  # by identity: == compares every field
            and inputs == self._snapshot_inputs
        ):
            return snapshot
        snapshot = InstanceSnapshot(
            id=self.id,
            role=self.role,
            state=self.state,
            predictor=self.predictor,
            load=self.load(),
            capacity=self.capacity,
            host=self.host,
            kv_source=self.kv_source,
            ttft_margin=margin,
        )
        self._snapshot, self._snapshot_inputs = snapshot, inputs
        self._snapshot_health = self.health
        return snapshot

    def predicted_step_s(self) -> float:
        """The longest engine step its latency model predicts for the work this gateway has on
        it: the prefill of every queued prompt in one step (prefill is not chunked in every
        configuration, and an engine may batch all waiting prompts), or a decode step at its
        batch and context; 0 when this gateway has nothing on it. Work of others that the
        worker reports beyond this gateway's (another gateway's requests, a profile's calls) is
        counted as one prefill of the longest prompt it accepts."""
        predictor = self.predictor
        step_s = 0.0
        if self.num_prefills > 0:
            step_s = predictor.queue_s(self.num_queued_prefill_tokens, self.num_prefills)
        if self.num_running_decodes > 0:
            step_s = max(
                step_s,
                predictor.decode_step_s(self.num_running_decodes, self.num_context_tokens),
            )
        health = self.health
        if health is not None and health.num_engine_requests > self.num_requests:
            step_s = max(step_s, predictor.prefill_s(health.max_model_len, 0))
        return step_s

    @property
    def capacity(self) -> int:
        return self.health.capacity if self.health is not None else 0

    def record(self) -> InstanceRecord:
        return InstanceRecord(
            self.id,
            self.role,
            self.endpoint,
            draining=self.draining,
            launched=self.launched,
            announced=self.announced,
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
