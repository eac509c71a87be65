"""The planner loop: every ``--planner-interval`` the P:D planner (controlplane/planning) sizes
the prefill and decode pools from the interval's load and the scheduler's latency models, and
the registry's ``scale`` acts on it through the launcher (local processes, or the Kubernetes
Deployments): more workers are launched at once, fewer are drained — they take no new request,
finish what they hold, then stop (docs/design/planner.md §1).

Only workers this gateway launches are resized (``scale`` refuses to stop others); a failed
resize is logged and the next interval tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from controlplane.instances.registry import InstanceRegistry
from controlplane.instances.types import AdminError
from controlplane.planning import (
    LatencyModel,
    PlannerSettings,
    PoolPlanner,
    PoolSizes,
    PoolView,
    make_planner,
)
from controlplane.workers.roles import WorkerRole

__all__ = ["DEFAULT_MAX_NUM_SEQS", "PlannerLoop"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_NUM_SEQS = 256
"""vLLM's default ``max_num_seqs``: the decode batch bound while no worker has said its own."""
_UNKNOWN_KV = 1 << 40
"""The KV capacity while no worker has said its own (no KV bound on the batch)."""


class _PoolModel:
    """Prefill times from a prefill worker's model, decode steps from a decode worker's."""

    def __init__(self, prefill: LatencyModel, decode: LatencyModel) -> None:
        self._prefill, self._decode = prefill, decode

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float:
        return self._prefill.prefill_s(new_tokens, cached_tokens)

    def decode_step_s(self, batch_size: int, context_tokens: int) -> float:
        return self._decode.decode_step_s(batch_size, context_tokens)


class PlannerLoop:
    def __init__(
        self,
        registry: InstanceRegistry,
        settings: PlannerSettings,
        *,
        ttft_slo_s: float,
        tpot_slo_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not settings.enabled:
            raise ValueError("the planner is off")
        self._registry = registry
        self._settings = settings
        self._slos = (ttft_slo_s, tpot_slo_s)
        self._clock = clock
        self._last = clock()
        self._planner: PoolPlanner | None = None
        self._limits = (0, 0)
        self.last_target: PoolSizes | None = None

    def _planner_for(self, view: PoolView) -> PoolPlanner:
        """The planner, made once the workers' limits are known (again if they change; the
        forecast starts over then)."""
        limits = (view.max_num_seqs, view.kv_capacity_tokens)
        if self._planner is None or limits != self._limits:
            self._limits = limits
            config = self._settings.config(
                *self._slos,
                max_num_seqs=view.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
                kv_capacity_tokens=view.kv_capacity_tokens or _UNKNOWN_KV,
            )
            self._planner = make_planner(self._settings.kind, config)
        return self._planner

    async def tick(self) -> PoolSizes | None:
        """One planning interval ends: plan and resize. The target, or None when no prefill or
        no decode worker is ready (nothing to take a latency model from)."""
        now = self._clock()
        duration, self._last = max(1e-3, now - self._last), now
        view = self._registry.planning_view()
        sample = self._registry.load_meter.take(duration, view.decode_batch)
        if view.prefill_model is None or view.decode_model is None:
            logger.info("planner: no ready prefill and decode worker yet; nothing planned")
            return None
        planner = self._planner_for(view)
        target = planner.plan(sample, view.sizes, _PoolModel(view.prefill_model, view.decode_model))
        self.last_target = target
        if target == view.sizes:
            return target
        logger.info(
            "planner: %d requests in %.0fs; prefill %d -> %d, decode %d -> %d workers",
            sample.requests,
            duration,
            view.sizes.prefill,
            target.prefill,
            view.sizes.decode,
            target.decode,
        )
        for role, before, after in (
            (WorkerRole.PREFILL, view.sizes.prefill, target.prefill),
            (WorkerRole.DECODE, view.sizes.decode, target.decode),
        ):
            if after != before:
                try:
                    await self._registry.scale(role, after)
                except AdminError as exc:
                    logger.warning("planner: cannot scale the %s pool to %d: %s", role, after, exc)
        return target

    async def run(self) -> None:
        """Plan every interval until cancelled."""
        while True:
            await asyncio.sleep(self._settings.interval_s)
            try:
                await self.tick()
            except Exception:  # a planning bug must not stop the gateway's other work
                logger.exception("planner: planning failed; trying again next interval")
