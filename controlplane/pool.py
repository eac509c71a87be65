"""The configured prefill and decode workers, their readiness, and which one serves a request.

The pool is the only owner of worker readiness. It is set by Health polls (at start-up until every
worker is ready, then every `health_check_interval_s` in the background) and cleared at once when
a request finds a worker unreachable, so the next request does not try it again. A ready worker
whose Health times out stays ready until it has done so 3 times in a row: a worker busy with a
long prefill may answer late, and turning it away would fail requests it could serve. Selection is
round-robin over ready workers of the role: the walking skeleton's policy until the scheduler's
policies (docs/design, ARCHITECTURE §6) replace it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from controlplane.metrics import GatewayMetrics
from controlplane.workers import (
    WorkerClient,
    WorkerError,
    WorkerErrorKind,
    WorkerHealth,
    WorkerRole,
)

__all__ = ["ModelLimits", "StartupError", "WorkerPool", "WorkerStatus"]

logger = logging.getLogger(__name__)

_HEALTH_TIMEOUTS_BEFORE_UNREADY = 3


class StartupError(RuntimeError):
    """The workers did not become usable (timeout, wrong role, inconsistent model limits)."""


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What every worker agreed on at start-up."""

    max_model_len: int
    block_size: int


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    endpoint: str
    role: WorkerRole
    ready: bool
    detail: str


@dataclass(slots=True)
class _Member:
    client: WorkerClient
    role: WorkerRole
    ready: bool = False
    detail: str = "not checked yet"
    health: WorkerHealth | None = None
    num_health_timeouts: int = 0
    """Consecutive Health calls that timed out while the worker was ready."""


class WorkerPool:
    def __init__(
        self,
        prefill_endpoints: Sequence[str],
        decode_endpoints: Sequence[str],
        *,
        health_check_timeout_s: float,
        metrics: GatewayMetrics,
    ) -> None:
        self._members = [
            _Member(WorkerClient(e), WorkerRole.PREFILL) for e in prefill_endpoints
        ] + [_Member(WorkerClient(e), WorkerRole.DECODE) for e in decode_endpoints]
        self._health_check_timeout_s = health_check_timeout_s
        self._metrics = metrics
        self._limits: ModelLimits | None = None
        self._round_robin = {
            WorkerRole.PREFILL: itertools.count(),
            WorkerRole.DECODE: itertools.count(),
        }

    @property
    def limits(self) -> ModelLimits:
        if self._limits is None:
            raise RuntimeError("WorkerPool.limits read before wait_until_ready()")
        return self._limits

    def is_ready(self) -> bool:
        """True when at least one prefill and one decode worker are ready."""
        return all(
            any(m.ready for m in self._members if m.role is role)
            for role in (WorkerRole.PREFILL, WorkerRole.DECODE)
        )

    def statuses(self) -> list[WorkerStatus]:
        return [WorkerStatus(m.client.endpoint, m.role, m.ready, m.detail) for m in self._members]

    def pick(self, role: WorkerRole) -> WorkerClient:
        """A ready worker of `role`, round-robin; WorkerError(UNAVAILABLE) if there is none."""
        ready = [m for m in self._members if m.role is role and m.ready]
        if not ready:
            details = "; ".join(f"{m.client.endpoint}: {m.detail}" for m in self._of(role))
            raise WorkerError(
                WorkerErrorKind.UNAVAILABLE,
                ",".join(m.client.endpoint for m in self._of(role)),
                "pick",
                f"no {role.name.lower()} worker is ready ({details})",
            )
        return ready[next(self._round_robin[role]) % len(ready)].client

    def report_failure(self, client: WorkerClient, error: WorkerError) -> None:
        """A request saw `error` from `client`: stop picking it until a health check passes."""
        self._metrics.worker_errors.labels(error.rpc, error.kind.value).inc()
        if error.kind is WorkerErrorKind.UNAVAILABLE:
            for member in self._members:
                if member.client is client:
                    self._set(member, False, f"unavailable: {error.detail}")

    async def check_all(self) -> None:
        """One Health poll of every worker, concurrently."""
        await asyncio.gather(*(self._check(m) for m in self._members))

    async def wait_until_ready(self, *, timeout_s: float, poll_interval_s: float) -> ModelLimits:
        """Poll until every configured worker is ready, then fix the model limits."""
        deadline = time.monotonic() + timeout_s
        next_log = time.monotonic() + 10.0
        while True:
            await self.check_all()
            self._raise_on_wrong_role()
            if all(m.ready for m in self._members):
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
        self._limits = self._agree_on_limits()
        logger.info(
            "workers ready: max_model_len=%d block_size=%d",
            self._limits.max_model_len,
            self._limits.block_size,
        )
        return self._limits

    async def run_health_checks(self, *, interval_s: float) -> None:
        """Poll forever (the gateway cancels this task at shutdown)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check_all()
            except Exception:  # never let the monitor die silently
                logger.exception("health check round failed")

    async def close(self) -> None:
        await asyncio.gather(*(m.client.close() for m in self._members))

    # -----------------------------------------------------------------------------------------

    def _of(self, role: WorkerRole) -> Iterator[_Member]:
        return (m for m in self._members if m.role is role)

    async def _check(self, member: _Member) -> None:
        try:
            health = await member.client.health(timeout_s=self._health_check_timeout_s)
        except WorkerError as exc:
            # A busy engine can answer Health late; unreachable or refusing is decisive at once.
            if exc.kind is WorkerErrorKind.TIMEOUT and member.ready:
                member.num_health_timeouts += 1
                if member.num_health_timeouts < _HEALTH_TIMEOUTS_BEFORE_UNREADY:
                    return
            self._set(member, False, f"{exc.kind.value}: {exc.detail}")
            return
        member.num_health_timeouts = 0
        member.health = health
        if not health.role.can_serve(member.role):
            self._set(member, False, f"wrong role: reports {health.role.name}")
        elif not health.ready:
            self._set(member, False, "reports not ready")
        elif self._limits is not None and health.max_model_len < self._limits.max_model_len:
            self._set(
                member,
                False,
                f"max_model_len {health.max_model_len} < {self._limits.max_model_len} agreed",
            )
        else:
            self._set(member, True, "ready")

    def _set(self, member: _Member, ready: bool, detail: str) -> None:
        if member.ready != ready:
            log = logger.info if ready else logger.warning
            log("worker %s (%s): %s", member.client.endpoint, member.role.name.lower(), detail)
        member.ready = ready
        member.detail = detail
        self._metrics.worker_ready.labels(member.client.endpoint, member.role.name.lower()).set(
            1 if ready else 0
        )

    def _raise_on_wrong_role(self) -> None:
        wrong = [m for m in self._members if m.detail.startswith("wrong role")]
        if wrong:
            raise StartupError(
                "; ".join(
                    f"{m.client.endpoint} configured as {m.role.name.lower()} but {m.detail}"
                    for m in wrong
                )
            )

    def _describe_not_ready(self) -> str:
        return "; ".join(
            f"{m.role.name.lower()} {m.client.endpoint}: {m.detail}"
            for m in self._members
            if not m.ready
        )

    def _agree_on_limits(self) -> ModelLimits:
        healths = [m.health for m in self._members if m.health is not None]
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
