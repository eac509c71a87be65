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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from controlplane.workers.roles import WorkerRole

__all__ = [
    "MAX_CONFLICT_RETRIES",
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
    "LauncherUnavailable",
    "PoolChanged",
    "PoolLauncher",
    "PoolPod",
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


class LauncherUnavailable(AdminError):
    """The launcher's backend (e.g. the Kubernetes API server) failed or cannot be reached;
    the message names the request and the status (UNAVAILABLE)."""


class PoolChanged(Exception):
    """:meth:`PoolLauncher.set_replicas` met a concurrent change of the pool's size (409
    Conflict): the size read is stale, the caller reads it again and decides again."""


MAX_CONFLICT_RETRIES = 5
"""A pool write that meets a concurrent change is read (and decided) again this many times."""


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

    async def set_role(
        self, instance_id: str, role: WorkerRole, *, planned: list[str] | None = None
    ) -> InstanceInfo:
        """Change the role ``instance_id`` serves. With a dry-run launcher nothing changes and
        the write requests it would have sent are appended to ``planned``."""
        ...

    async def scale(
        self, role: WorkerRole, replicas: int, *, planned: list[str] | None = None
    ) -> Sequence[InstanceInfo]:
        """Launch or drain-and-stop launched instances until ``replicas`` of ``role`` remain
        (with a dry-run launcher: nothing changes, ``planned`` gets the writes not sent)."""
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


@dataclass(frozen=True, slots=True)
class PoolPod:
    """One pod of a pool, as a :class:`PoolLauncher` sees it."""

    name: str
    uid: str
    ip: str
    """Its ``status.podIP`` ("" while unscheduled): the host of the endpoint it announces."""
    phase: str
    """``Pending``, ``Running``, ...: a pod the ReplicaSet removes before a running one."""


class PoolLauncher(Protocol):
    """A pool of workers that something else runs (Kubernetes Deployments): the launcher
    changes a pool's size and removes chosen members; it starts no process and returns no
    handle. New members announce themselves in the registry (docs/design/multihost.md §3);
    the registry matches an instance to its pod by the endpoint's host (the pod's IP).

    Write methods return the requests a dry-run launcher did not send (one human-readable
    line each: method, path, body); empty when it sends them."""

    @property
    def dry_run(self) -> bool:
        """True when writes are planned, not sent (the registry then changes nothing either)."""
        ...

    def describe(self, role: WorkerRole) -> str:
        """The pool of ``role`` in words, e.g. ``Deployment strata/strata-decode``."""
        ...

    async def replicas(self, role: WorkerRole) -> int:
        """The pool's desired size (``spec.replicas``), read now: the next
        :meth:`set_replicas` writes against this read."""
        ...

    async def pods(self, role: WorkerRole) -> Sequence[PoolPod]:
        """The pool's members that are not being deleted."""
        ...

    async def set_replicas(self, role: WorkerRole, replicas: int) -> Sequence[str]:
        """Make the pool's desired size ``replicas`` if it is still what :meth:`replicas`
        last read; :class:`PoolChanged` if another writer changed it since (nothing written:
        the caller decides again against a new read)."""
        ...

    async def add_replicas(self, role: WorkerRole, delta: int) -> Sequence[str]:
        """Change the desired size by ``delta`` (relative: a concurrent change is kept). When
        it shrinks the pool chooses which members go (those not serving yet first)."""
        ...

    async def remove(
        self, role: WorkerRole, pod: PoolPod, resized: Callable[[], None] | None = None
    ) -> Sequence[str]:
        """Remove exactly ``pod`` and lower the desired size by one; ``resized`` is called
        once the lower size is written (before the pod is gone), so that the caller stops
        counting the removal against the size."""
        ...

    async def close(self) -> None: ...
