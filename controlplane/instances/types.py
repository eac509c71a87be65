"""Instance records shared by the registry, the scheduler and the admin API.

An instance is one worker (one vLLM engine) known to the gateway. Its lifecycle
(docs/design/scheduling.md §7):

    starting ──Health ready──▶ ready ──drain──▶ draining ──in-flight done──▶ (removed)
                               │  ▲
     stalled, unanswered, or   ▼  │ Health shows it serving again
     a request finds it gone ▶ dead

A starting instance whose Health fails stays starting; a draining one stays draining. The
registry is the one owner of these records and changes states from heartbeats, from requests that
find a worker unreachable, and from :class:`AdminBackend` calls; everything else reads immutable
:class:`InstanceInfo` snapshots.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from controlplane.workers.roles import WorkerRole

__all__ = [
    "AdminBackend",
    "AdminError",
    "ClusterStats",
    "InstanceConflict",
    "InstanceInfo",
    "InstanceNotFound",
    "InstanceState",
    "InvalidAdminRequest",
    "LaunchedWorker",
    "Launcher",
]


class InstanceState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """A snapshot of one instance, as the admin API and the CLI show it."""

    id: str
    role: WorkerRole
    state: InstanceState
    endpoint: str
    model: str = ""
    block_size: int = 0
    capacity: int = 0
    """Most sequences the engine runs at once (its max_num_seqs); 0 = unknown yet."""
    in_flight: int = 0
    """Requests this gateway has running on it now."""
    load: float = 0.0
    """in_flight / capacity (0 when the capacity is unknown)."""
    launched: bool = False
    """True when a launcher started it (scale may stop it); False for `admin add` instances."""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """What `strata admin stats` prints."""

    policy: str
    instances: tuple[InstanceInfo, ...]
    requests_total: int = 0
    requests_rejected: int = 0
    requests_failed_over: int = 0
    predictor_ttft_mape: float | None = None
    predictor_tpot_mape: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


class AdminError(Exception):
    """Base of the errors the admin API maps to gRPC status codes."""


class InvalidAdminRequest(AdminError):
    """Bad arguments (INVALID_ARGUMENT)."""


class InstanceNotFound(AdminError):
    """No instance with that id (NOT_FOUND)."""


class InstanceConflict(AdminError):
    """The request conflicts with the instance's state, e.g. adding an endpoint twice
    (ALREADY_EXISTS / FAILED_PRECONDITION)."""


class AdminBackend(Protocol):
    """What the admin gRPC service needs from the gateway; implemented by the registry side.

    Methods raise :class:`InvalidAdminRequest`, :class:`InstanceNotFound` or
    :class:`InstanceConflict`; anything else is an internal error.
    """

    def list_instances(self) -> Sequence[InstanceInfo]: ...

    async def add_instance(self, role: WorkerRole, endpoint: str) -> InstanceInfo:
        """Register an externally started worker; returns once it is known (state starting)."""
        ...

    async def drain(self, instance_id: str) -> InstanceInfo:
        """Stop sending new requests to it; in-flight requests finish. Returns at once."""
        ...

    async def remove(self, instance_id: str, *, wait_s: float) -> None:
        """Drain, wait up to ``wait_s`` for in-flight requests, then forget it (and stop it
        when a launcher started it)."""
        ...

    async def set_role(self, instance_id: str, role: WorkerRole) -> InstanceInfo: ...

    async def scale(self, role: WorkerRole, replicas: int) -> Sequence[InstanceInfo]:
        """Launch or drain-and-stop launched instances until ``replicas`` of ``role`` remain."""
        ...

    def set_policy(self, name: str) -> None: ...

    def stats(self) -> ClusterStats: ...


class LaunchedWorker(Protocol):
    """A worker process a launcher started."""

    @property
    def endpoint(self) -> str: ...

    @property
    def role(self) -> WorkerRole: ...

    def alive(self) -> bool: ...

    async def stop(self, *, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the whole process tree is gone on return."""
        ...


class Launcher(Protocol):
    """Starts workers for `scale` and `set-role` (local processes here; Kubernetes elsewhere)."""

    async def launch(self, role: WorkerRole) -> LaunchedWorker:
        """Start a worker of ``role``; returns once its gRPC endpoint is chosen (the registry then
        waits for Health to report ready)."""
        ...

    async def close(self) -> None:
        """Stop every worker this launcher started."""
        ...
