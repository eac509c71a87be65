"""One instance as this gateway sees it (:class:`Instance`), and the small records around it.

Only the registry (controlplane/instances/registry.py and the layers it is built of) writes an
:class:`Instance`'s fields; everything else reads them or the immutable snapshots it hands out
(:class:`~controlplane.instances.types.InstanceInfo`, :class:`InstanceView`,
:class:`~controlplane.scheduling.InstanceSnapshot`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

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
from controlplane.workers.client import WorkerClient, WorkerHealth
from strata_common.endpoints import parse_endpoint

__all__ = ["Instance", "InstanceView", "KVIdentity", "ModelLimits", "StartupError"]

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


class Instance:
    """One worker as this gateway sees it. Read freely; only the registry writes the fields."""

    __slots__ = (
        "client",
        "detail",
        "draining",
        "endpoint",
        "forgotten",
        "health",
        "host",
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
        self.host = parse_endpoint(record.endpoint).host
        """The endpoint's host: instances with the same one share memory (KV moves by shm)."""
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
            load=self.load(),
            capacity=self.capacity,
            host=self.host,
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
