"""The planner loop: every ``--planner-interval`` the P:D planner (controlplane/planning) sizes
the prefill and decode pools from the interval's load and the scheduler's latency models, and
the registry's ``scale`` acts on it through the launcher (local processes, or the Kubernetes
Deployments): more workers are launched, fewer are drained — they take no new request, finish
what they hold, then stop (docs/design/planner.md §1).

Only workers this gateway launches are resized (``scale`` refuses to stop others); a pool that
shrinks is resized before one that grows (its cores or GPUs go to the other); a failed resize
is logged and the next interval tries again. One gateway of a cluster plans: its meter sees its
own traffic (docs/design/planner.md §5).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.instances.registry import InstanceRegistry
from controlplane.planning import (
    PLANNER_NAMES,
    PlannerConfig,
    PoolPlanner,
    PoolSizes,
    SplitLatencyModel,
    make_planner,
)
from controlplane.workers.roles import WorkerRole
from strata_common.options import option
from strata_common.units import parse_duration

__all__ = ["DEFAULT_MAX_NUM_SEQS", "PLANNER_KINDS", "PlannerLoop", "PlannerSettings"]

logger = logging.getLogger(__name__)

PLANNER_KINDS = ("off", *PLANNER_NAMES)
"""The gateway's ``--planner`` choices (``off``: the pools keep the size the operator sets)."""
DEFAULT_MAX_NUM_SEQS = 256
"""vLLM's default ``max_num_seqs``: the decode batch bound while no worker has said its own."""
_UNKNOWN_KV = 1 << 40
"""The KV capacity while no worker has said its own (no KV bound on the batch)."""


@dataclass(frozen=True, slots=True)
class PlannerSettings:
    """The gateway's ``--planner*`` flags (docs/design/planner.md): which planner resizes the
    pools it launches, how often, within which bounds."""

    kind: str = option(
        "off",
        flag="--planner",
        help="resize the launched prefill and decode pools from a load forecast: strata (the "
        "scheduler's latency model), dynamo (Dynamo's SLA planner formulas) or off; needs "
        "--ttft-slo and --tpot-slo",
    )
    interval_s: float = option(60.0, parse=parse_duration, help="how often the planner plans")
    engine_start_s: float = option(
        60.0,
        parse=parse_duration,
        help="from asking for a worker to its first request (the forecast looks this far ahead)",
    )
    scale_down_after: int = option(
        3, help="planning intervals that must all want a smaller pool before it shrinks"
    )
    max_workers: int = option(8, help="prefill + decode workers the planner may run at most")
    min_prefill: int = option(1, help="prefill workers the planner keeps at least")
    min_decode: int = option(1, help="decode workers the planner keeps at least")

    def __post_init__(self) -> None:
        if self.kind not in PLANNER_KINDS:
            choices = ", ".join(PLANNER_KINDS)
            raise ValueError(f"planner must be one of {choices}, got {self.kind!r}")
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ValueError("planner_interval must be > 0")
        self.config(1.0, 1.0, 1, 1)  # the remaining bounds are PlannerConfig's

    @property
    def enabled(self) -> bool:
        return self.kind != "off"

    def config(
        self, ttft_slo_s: float, tpot_slo_s: float, max_num_seqs: int, kv_capacity_tokens: int
    ) -> PlannerConfig:
        return PlannerConfig(
            ttft_slo_s=ttft_slo_s,
            tpot_slo_s=tpot_slo_s,
            max_num_seqs=max_num_seqs,
            kv_capacity_tokens=kv_capacity_tokens,
            max_instances=self.max_workers,
            min_prefill=self.min_prefill,
            min_decode=self.min_decode,
            interval_s=self.interval_s,
            engine_start_s=self.engine_start_s,
            scale_down_after=self.scale_down_after,
        )


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
        self._last = clock()
        self._clock = clock
        self.planner: PoolPlanner = make_planner(
            settings.kind,
            settings.config(ttft_slo_s, tpot_slo_s, DEFAULT_MAX_NUM_SEQS, _UNKNOWN_KV),
        )
        self.last_target: PoolSizes | None = None

    async def tick(self) -> PoolSizes | None:
        """One planning interval ends: plan and resize. The target, or None when no worker is
        ready (nothing to take a latency model from; the interval's load is still counted)."""
        now = self._clock()
        duration, self._last = max(1e-3, now - self._last), now
        view = self._registry.planning_view()
        sample = self._registry.take_load_sample(duration, view.decode_batch)
        if view.prefill_model is None or view.decode_model is None:
            logger.info("planner: no ready worker to take a latency model from; nothing planned")
            return None
        self.planner.set_limits(
            view.max_num_seqs or DEFAULT_MAX_NUM_SEQS, view.kv_capacity_tokens or _UNKNOWN_KV
        )
        model = SplitLatencyModel(view.prefill_model, view.decode_model)
        target = self.planner.plan(sample, view.sizes, model)
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
        changes = [
            (WorkerRole.PREFILL, view.sizes.prefill, target.prefill),
            (WorkerRole.DECODE, view.sizes.decode, target.decode),
        ]
        changes.sort(key=lambda c: c[2] - c[1])  # the shrinking pool first
        for role, before, after in changes:
            if after == before:
                continue
            try:
                await self._registry.scale(role, after)
            except Exception as exc:  # each pool on its own; the next interval tries again
                logger.warning(
                    "planner: cannot scale the %s pool to %d: %s", role.name.lower(), after, exc
                )
        return target

    async def run(self) -> None:
        """Plan every interval until cancelled."""
        while True:
            await asyncio.sleep(self._settings.interval_s)
            try:
                await self.tick()
            except Exception:  # a planning bug must not stop the gateway's other work
                logger.exception("planner: planning failed; trying again next interval")
