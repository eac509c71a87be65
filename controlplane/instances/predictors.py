"""The registry's scheduling layer: the current policy, the latency models and their feeding.

Scheduling (docs/design/scheduling.md): the registry owns one `LatencyPredictor` per instance
(priors at first; calibrated by a profile of real calls when the instance turns ready,
controlplane/workers/profiling.py, if the profile is plausible against physics, its siblings'
models and the online observations, `_implausible`; refitted online from `observe_prefill` /
`observe_decode`),
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
import logging
import math
import time
from collections.abc import Collection
from typing import Any

from controlplane.instances.instance import Instance, KVIdentity
from controlplane.instances.load import LoadTracking
from controlplane.instances.types import (
    InstanceState,
    InvalidAdminRequest,
)
from controlplane.planning import LoadMeter, LoadSample, PoolSizes, PoolView
from controlplane.scheduling import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    Assign,
    Decision,
    PredictionAccuracy,
    Reject,
    RejectReason,
    RequestSnapshot,
    SchedulingConfig,
    make_policy,
)
from controlplane.scheduling.predictor.plausibility import Reference, Rejection, check_profile
from controlplane.workers.client import WorkerError, WorkerHealth
from controlplane.workers.profiling import (
    ProfileResult,
    ProfileSettings,
    YieldTo,
    plan_for,
    profile_worker,
)
from controlplane.workers.roles import WorkerRole, role_name

__all__ = ["SchedulingState"]

logger = logging.getLogger("controlplane.instances.registry")


class SchedulingState(LoadTracking):
    """The policy that decides, one :class:`LatencyPredictor` per instance, and what feeds them:
    observations of requests and the start-up profile of each instance that becomes ready."""

    def __init__(
        self,
        *,
        policy_names: Collection[str] = POLICY_NAMES,
        policy: str | None = None,
        scheduling: SchedulingConfig | None = None,
        profile: ProfileSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._policy_names = tuple(policy_names)
        if policy is None:
            policy = (
                DEFAULT_POLICY if DEFAULT_POLICY in self._policy_names else self._policy_names[0]
            )
        self._scheduling = scheduling if scheduling is not None else SchedulingConfig()
        self._profile = profile if profile is not None else ProfileSettings(enabled=False)
        self._profile_slots = asyncio.Semaphore(self._profile.concurrency)
        """Start-up profiles running at once (``--profile-concurrency``)."""
        self._policy = make_policy(policy, self._scheduling)
        self._accuracy = PredictionAccuracy()
        self._num_rejected = 0
        self._num_profiles = 0
        self.load_meter = LoadMeter()
        """What each request brings, summed per planning interval (controlplane/planning)."""

    def _on_ready(self, instance: Instance) -> None:
        self._maybe_profile(instance)

    def decide(self, request: RequestSnapshot) -> Decision:
        """The current policy's choice for ``request`` over every known instance (only ready
        ones can be chosen); counted in the route / rejection metrics."""
        started = time.perf_counter()
        quantile, now = self._scheduling.slo_margin_quantile, self._clock()
        instances = [m.scheduling_snapshot(quantile, now) for m in self._instances.values()]
        decision = self._policy.decide(request, instances)
        self._metrics.scheduling_decision.observe(time.perf_counter() - started)
        prompt = request.num_prompt_tokens
        if isinstance(decision, Reject):
            self._num_rejected += 1
            self._metrics.requests_rejected.labels(decision.reason.value).inc()
            if decision.reason is not RejectReason.SLO_UNATTAINABLE:  # more workers would not help
                self.load_meter.arrived(prompt, prompt)
        else:
            self._metrics.routes.labels(decision.policy, decision.route.value).inc()
            self.load_meter.arrived(prompt, prompt - decision.cached_blocks * request.block_size)
        return decision

    def note_finished(
        self, output_tokens: int, tpot_s: float | None, *, request: bool = True
    ) -> None:
        """A request ended normally with ``output_tokens`` (its mean TPOT with two or more);
        ``request`` False: a sample after a request's first (n > 1) ended."""
        self.load_meter.finished(output_tokens, tpot_s, request=request)

    def take_load_sample(self, duration_s: float, decode_batch: float | None) -> LoadSample:
        """The planning interval's load (``load_meter``'s sums), and a new interval begins."""
        return self.load_meter.take(duration_s, decode_batch)

    def planning_view(self) -> PoolView:
        """The pools as the planner sees them (controlplane/planning): workers ready or
        starting (not draining), a ready worker's latency model per role (a calibrated one
        first; a decode worker's stands in for prefill when no prefill worker is ready: same
        model and hardware), the decode workers' limits."""
        active = (InstanceState.STARTING, InstanceState.READY)
        prefill = [m for m in self._instances.values() if m.role is WorkerRole.PREFILL]
        decode = [m for m in self._instances.values() if m.role is WorkerRole.DECODE]
        ready_prefill = [m for m in prefill if m.state is InstanceState.READY]
        ready_decode = [m for m in decode if m.state is InstanceState.READY]
        ready_prefill.sort(key=lambda m: not m.predictor.calibrated)
        ready_decode.sort(key=lambda m: not m.predictor.calibrated)
        models = [m.predictor for m in (*ready_prefill, *ready_decode)]
        capacities = [m.capacity for m in ready_decode if m.capacity]
        kv = [h.kv_capacity_tokens for m in ready_decode if (h := m.health) is not None]
        return PoolView(
            sizes=PoolSizes(
                sum(m.state in active for m in prefill), sum(m.state in active for m in decode)
            ),
            prefill_model=models[0] if models else None,
            decode_model=ready_decode[0].predictor if ready_decode else None,
            decode_batch=(
                sum(m.num_running_decodes for m in ready_decode) / len(ready_decode)
                if ready_decode
                else None
            ),
            max_num_seqs=min(capacities, default=0),
            kv_capacity_tokens=min((k for k in kv if k), default=0),
        )

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
        return f"no {role_name(role)} worker is ready ({details or 'none registered'})"

    def observe_prefill(self, instance: Instance, new: int, cached: int, seconds: float) -> None:
        """An observed prefill on ``instance`` (engine time), called as its `track_prefill`
        block ends: refits its model online if no other prefill overlapped it (an overlapped
        one shared engine steps: its time is queueing plus service, which the queue model
        predicts, not the prefill model); kept for the TTFT that follows (`observe_ttft`)."""
        solo, instance.last_prefill_solo = instance.last_prefill_solo, False
        if new >= 0 and cached >= 0 and math.isfinite(seconds) and seconds > 0:
            instance.last_prefill_engine_s = seconds
            if solo:
                before = instance.predictor.num_change_points
                instance.predictor.observe_prefill(new, cached, seconds)
                self._count_change_point(instance, before, "prefill")

    def observe_decode(
        self, instance: Instance, batch_size: float, context_tokens: float, step_s: float
    ) -> None:
        """Mean decode step of one stream on ``instance`` at its mean batch and context."""
        if batch_size >= 1 and context_tokens >= 0 and math.isfinite(step_s) and step_s > 0:
            before = instance.predictor.num_change_points
            instance.predictor.observe_decode_step(round(batch_size), round(context_tokens), step_s)
            self._count_change_point(instance, before, "decode")

    def _count_change_point(self, instance: Instance, before: int, model: str) -> None:
        """Counts and logs a change point of the instance's ``model`` (its latency model was
        rescaled at once: docs/design/scheduling.md §2.3, "Change points")."""
        if instance.predictor.num_change_points == before:
            return
        self._metrics.predictor_change_points.labels(role_name(instance.role), model).inc()
        logger.info(
            "instance %s: its %s model disagreed with the last requests by more than a factor; "
            "rescaled to them (change point %d)",
            instance.id,
            model,
            instance.predictor.num_change_points,
        )

    def observe_ttft(self, assign: Assign, instance: Instance, observed_s: float) -> None:
        """The request's TTFT against its prediction; after a prefill on ``instance`` (the
        gateway calls this right after that prefill's `observe_prefill`, with no await between)
        the part beyond the engine time is a sample of the instance's ``ttft_overhead_s``."""
        engine_s, instance.last_prefill_engine_s = instance.last_prefill_engine_s, None
        if engine_s is not None and assign.prefill == instance.id and observed_s >= engine_s:
            instance.predictor.observe_ttft_overhead(observed_s - engine_s)
        if observed_s > 0:
            self._accuracy.observe_ttft(assign.predicted_ttft_s, observed_s)
            chosen = assign.prefill if assign.prefill is not None else assign.decode
            if instance.id == chosen:  # not a failover's: the prediction was of another
                instance.predictor.observe_ttft(assign.predicted_ttft_s, observed_s, self._clock())
            self._metrics.predictor_ttft_mape.set(self._accuracy.ttft_mape or 0.0)
            self.load_meter.first_token(observed_s)

    def observe_tpot(self, assign: Assign, instance: Instance, observed_s: float) -> None:
        if observed_s > 0:
            self._accuracy.observe_tpot(assign.predicted_tpot_s, observed_s)
            instance.predictor.accuracy.observe_tpot(assign.predicted_tpot_s, observed_s)
            self._metrics.predictor_tpot_mape.set(self._accuracy.tpot_mape or 0.0)

    @property
    def accuracy(self) -> PredictionAccuracy:
        return self._accuracy

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
        self._adopt_sibling(instance, health)
        instance.profile_task = self._spawn(self._profile_instance(instance, health))

    def _adopt_sibling(self, instance: Instance, health: WorkerHealth) -> None:
        """Start ``instance`` with a calibrated sibling's profile, if it has none and one has."""
        if instance.predictor.calibrated:
            return
        siblings = self._calibrated_siblings(instance)
        if not siblings:
            return
        sibling = siblings[0]
        instance.predictor.adopt(sibling.predictor)
        logger.info(
            "instance %s starts with the profile of %s (same model and hardware: %s)",
            instance.id,
            sibling.id,
            health.hardware,
        )

    def _calibrated_siblings(self, instance: Instance) -> list[Instance]:
        """The profiled instances of the same role and model on the same hardware (the roles'
        profiles differ: a prefill worker's decode model is not measured, and a decode
        worker's prefill samples are times to a first token at the gateway)."""
        health = instance.health
        if health is None or not health.hardware or not health.model_fingerprint:
            return []
        return [
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

    def _implausible(self, instance: Instance, result: ProfileResult) -> Rejection | None:
        """Why ``result`` must not replace the instance's model, if it must not: checked against
        physics, its calibrated siblings' models and what it and they observed online
        (docs/design/scheduling.md §2.3, "Plausibility")."""
        siblings = self._calibrated_siblings(instance)
        sources = [instance, *siblings]
        return check_profile(
            result.prefill,
            result.decode if result.measured_decode else None,
            siblings=[
                Reference(m.id, m.predictor.profile_prefill_fit, m.predictor.profile_decode_fit)
                for m in siblings
            ],
            observed_prefill=[s for m in sources for s in m.predictor.recent_prefill()],
            observed_decode=[s for m in sources for s in m.predictor.recent_decode()],
            bounds=self._profile.plausibility(),
        )

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
        """Its start-up profile, once one of the ``--profile-concurrency`` slots is free (while
        it waits it is scheduled with its priors, or with the first sibling's profile to land)."""
        try:
            async with self._profile_slots:
                self._adopt_sibling(instance, health)
                await self._run_profile(instance, health)
        except asyncio.CancelledError:  # drained or stopped while it waited for a slot
            if instance.profile_task is not None:
                instance.profile_state = "cancelled"
                instance.profile_task = None
            raise

    async def _run_profile(self, instance: Instance, health: WorkerHealth) -> None:
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
                self._metrics.profiled_instances.labels(role_name(instance.role)).inc()
                logger.info(
                    "instance %s: only %d profile points in %.1f s; keeping its sibling's profile",
                    instance.id,
                    result.num_prefill_measured,
                    result.seconds,
                )
                return
            rejection = self._implausible(instance, result)
            if rejection is not None:
                instance.profile_state = f"rejected: {rejection.detail}"
                self._metrics.profiles_rejected.labels(
                    role_name(instance.role), rejection.reason
                ).inc()
                kept = "its sibling's profile" if instance.predictor.calibrated else "priors"
                logger.warning(
                    "profile of %s rejected (%s), keeping %s: %s",
                    instance.id,
                    rejection.reason,
                    kept,
                    rejection.detail,
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
        self._metrics.profiled_instances.labels(role_name(instance.role)).inc()
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
