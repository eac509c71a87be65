"""The pools of one run: which instances serve, start, drain and stop; the planner that resizes
them; the GPU-seconds they cost (docs/design/planner.md, docs/design/simulator.md §7).

Every instance that may ever serve exists from the start (a planner's run: the whole GPU budget
in each role), in one of the states the real registry uses: ``STARTING`` (asked for, not serving
yet: it costs GPU time), ``READY`` (the gateway sends it work), ``DRAINING`` (no new work; it
finishes what it holds, then stops) and ``DEAD``, here "stopped" (no GPU). A stopped engine's
prefix cache is gone: its blocks leave the prefix index.

The planner is the real :class:`~controlplane.planning.PoolPlanner`. Each interval it gets the
load the gateway saw (requests arrived, their prompt and computed tokens as the decision
matched them, output tokens; TTFT and inter-token time observed; the decode batch) and the pools
now (ready and starting); scale-ups start stopped instances, cold (``engine_start_s`` until
ready), as long as the GPU budget has a GPU no instance holds (a draining one still holds its
own); scale-downs cancel starting ones, then drain the least busy ready ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.instances.types import InstanceState
from controlplane.planning import (
    LoadMeter,
    PlannerConfig,
    PoolPlanner,
    PoolSizes,
    SplitLatencyModel,
    make_planner,
)
from controlplane.workers.roles import WorkerRole
from simulator.config import Setup, SimConfig
from simulator.gateway import SimInstance

__all__ = ["SimPools"]

_SERVING = (InstanceState.STARTING, InstanceState.READY, InstanceState.DRAINING)


class SimPools:
    def __init__(
        self,
        config: SimConfig,
        setup: Setup,
        instances: Sequence[SimInstance],
        initial: PoolSizes | None,
    ) -> None:
        """``initial``: the instances of each role that serve from the start (None: all)."""
        self.config = config
        self.setup = setup
        self.instances = tuple(instances)
        self.gpus_per_instance = config.profile.tensor_parallel
        self._since: dict[str, float] = {}
        self.gpu_seconds = 0.0
        counts = {WorkerRole.PREFILL: 0, WorkerRole.DECODE: 0, WorkerRole.BOTH: 0}
        limits = (
            {WorkerRole.PREFILL: initial.prefill, WorkerRole.DECODE: initial.decode}
            if (initial is not None)
            else {}
        )
        for instance in self.instances:
            role = instance.role
            serving = counts[role] < limits.get(role, len(self.instances))
            counts[role] += 1
            instance.state = InstanceState.READY if serving else InstanceState.DEAD
            if serving:
                self._since[instance.id] = 0.0
        self.planner: PoolPlanner | None = None
        if setup.planner is not None:
            profile = config.profile
            self.planner = make_planner(
                setup.planner,
                PlannerConfig(
                    ttft_slo_s=config.ttft_slo_s,
                    tpot_slo_s=config.tpot_slo_s,
                    max_num_seqs=profile.max_num_seqs,
                    kv_capacity_tokens=min(i.engine.capacity_tokens for i in self.instances),
                    gpus_per_instance=self.gpus_per_instance,
                    max_instances=config.num_instances,
                    interval_s=config.planning.interval_s,
                    engine_start_s=config.planning.engine_start_s,
                    scale_down_after=config.planning.scale_down_after,
                ),
            )
        self.timeline: list[tuple[float, int, int]] = [(0.0, *self._active())]
        self.meter = LoadMeter()
        """What the gateway saw of the requests this interval (the real gateway's meter)."""

    # -- what the loop reports -----------------------------------------------------------------

    def arrived(self, prompt_tokens: int, computed_tokens: int) -> None:
        self.meter.arrived(prompt_tokens, computed_tokens)

    def first_token(self, ttft_s: float) -> None:
        self.meter.first_token(ttft_s)

    def finished(self, output_tokens: int, tpot_s: float | None) -> None:
        self.meter.finished(output_tokens, tpot_s)

    # -- states --------------------------------------------------------------------------------

    def serving(self) -> list[SimInstance]:
        """The instances the gateway may send new work to."""
        return [i for i in self.instances if i.state is InstanceState.READY]

    def _active(self) -> tuple[int, int]:
        """Prefill and decode instances ready or starting (what the planner counts)."""
        prefill = decode = 0
        for i in self.instances:
            if i.state in (InstanceState.READY, InstanceState.STARTING):
                if i.role is WorkerRole.PREFILL:
                    prefill += 1
                else:
                    decode += 1
        return prefill, decode

    def _set(self, instance: SimInstance, state: InstanceState, now: float) -> None:
        was = instance.state
        if was in _SERVING and state not in _SERVING:
            self.gpu_seconds += (now - self._since.pop(instance.id)) * self.gpus_per_instance
        elif was not in _SERVING and state in _SERVING:
            self._since[instance.id] = now
        instance.state = state

    def ready(self, instance: SimInstance, now: float) -> bool:
        """A started engine is up; False if that start was cancelled meanwhile (the instance
        may have been started again since: its own start ends later)."""
        if instance.state is not InstanceState.STARTING or instance.ready_at != now:
            return False
        self._set(instance, InstanceState.READY, now)
        return True

    def maybe_stop(self, instance: SimInstance, now: float) -> None:
        """A draining instance that holds nothing any more stops."""
        if instance.state is not InstanceState.DRAINING:
            return
        engine = instance.engine
        if instance.pending or engine.has_work or engine.stepping:
            return
        engine.clear_cache()
        self._set(instance, InstanceState.DEAD, now)
        self.timeline.append((now, *self._active()))

    def finish(self, now: float) -> None:
        """The run is over: every serving instance's GPU time up to ``now``."""
        for instance in self.instances:
            if instance.state in _SERVING:
                self._set(instance, InstanceState.DEAD, now)

    # -- the planner ---------------------------------------------------------------------------

    def plan(self, now: float) -> list[SimInstance]:
        """One planning interval ends: the planner's target applied. The instances started
        (the loop makes each ready ``engine_start_s`` later)."""
        assert self.planner is not None
        ready = self.serving()
        prefills = [i for i in ready if i.role is WorkerRole.PREFILL]
        decodes = [i for i in ready if i.role is WorkerRole.DECODE]
        batch = sum(i.running_decodes for i in decodes) / len(decodes) if decodes else None
        sample = self.meter.take(self.config.planning.interval_s, batch)
        if not decodes:
            return []
        # A decode instance's model stands in for prefill when none is ready (the same model).
        prefill_model = (prefills or decodes)[0].predictor
        current = PoolSizes(*self._active())
        model = SplitLatencyModel(prefill_model, decodes[0].predictor)
        target = self.planner.plan(sample, current, model)
        started = self._resize(WorkerRole.PREFILL, target.prefill, now)
        started += self._resize(WorkerRole.DECODE, target.decode, now)
        self.timeline.append((now, *self._active()))
        return started

    def _resize(self, role: WorkerRole, target: int, now: float) -> list[SimInstance]:
        mine = [i for i in self.instances if i.role is role]
        active = [i for i in mine if i.state in (InstanceState.READY, InstanceState.STARTING)]
        started: list[SimInstance] = []
        if target > len(active):
            # A new engine starts cold (the registry launches a fresh worker; a draining one is
            # not taken back), on a GPU no instance holds: draining ones hold theirs.
            held = sum(i.state in _SERVING for i in self.instances)
            need = min(target - len(active), self.config.num_instances - held)
            for instance in [i for i in mine if i.state is InstanceState.DEAD][: max(0, need)]:
                self._set(instance, InstanceState.STARTING, now)
                instance.ready_at = now + self.config.planning.engine_start_s
                started.append(instance)
        elif target < len(active):
            extra = len(active) - target
            starting = [i for i in active if i.state is InstanceState.STARTING]
            for instance in starting[:extra]:
                self._set(instance, InstanceState.DEAD, now)  # cancelled before serving
                extra -= 1
            ready = sorted(
                (i for i in active if i.state is InstanceState.READY),
                key=lambda i: (i.pending, i.engine.used_tokens),
            )
            for instance in ready[:extra]:
                self._set(instance, InstanceState.DRAINING, now)
                self.maybe_stop(instance, now)
        return started
