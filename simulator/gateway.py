"""The gateway's side of the simulation: instances as the scheduler sees them, and the decision.

:class:`SimInstance` keeps the in-flight counters the real registry keeps
(``controlplane/instances/load.py``; field by field: ``num_prefills`` and
``queued_prefill_tokens`` are ``track_prefill``'s, and a local route's ``DecodeTracker`` adds its
uncached prompt to them until its first token; ``running_decodes``, ``context_tokens`` and
``remaining_decode_tokens`` are ``track_decode``'s) and a real
:class:`~controlplane.scheduling.LatencyPredictor`, calibrated as the start-up profile would
calibrate it and fed the same observations the gateway feeds it. :class:`SimGateway` builds the
real snapshots, matches the prompt against the real :class:`~kvstore.cluster.index.PrefixIndex`
and asks the real policy.
"""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.instances.types import InstanceState
from controlplane.scheduling import (
    NO_CACHE,
    CachedPrefix,
    Decision,
    InstanceLoad,
    InstanceSnapshot,
    LatencyPredictor,
    RequestSnapshot,
    SchedulingConfig,
    Transport,
    cached_prefix,
    make_policy,
)
from controlplane.workers.roles import WorkerRole
from kvstore.blocks.hashing import BlockKey
from kvstore.cluster.index import PrefixIndex
from simulator.config import Setup, Shape, SimConfig
from simulator.engine import SimEngine

__all__ = ["NEVER_DISAGGREGATE", "SimGateway", "SimInstance"]

NEVER_DISAGGREGATE = 1 << 40
"""The local-prefill threshold of a colocated setup: every prompt is prefilled where it is
decoded (the policies' conditional disaggregation, taken to its limit)."""


class SimInstance:
    """One instance: its engine, its latency model and the gateway's counters of it."""

    __slots__ = (
        "context_tokens",
        "engine",
        "host",
        "id",
        "num_prefill_starts",
        "num_prefills",
        "pending",
        "predictor",
        "queued_prefill_tokens",
        "ready_at",
        "remaining_decode_tokens",
        "role",
        "running_decodes",
        "state",
    )

    def __init__(
        self, instance_id: str, role: WorkerRole, host: str, engine: SimEngine,
        predictor: LatencyPredictor,
    ) -> None:  # fmt: skip
        self.id = instance_id
        self.role = role
        self.host = host
        self.engine = engine
        self.predictor = predictor
        self.num_prefills = 0
        self.num_prefill_starts = 0
        self.queued_prefill_tokens = 0
        self.running_decodes = 0
        self.context_tokens = 0
        self.remaining_decode_tokens = 0
        self.state = InstanceState.READY
        """The registry's state: only READY instances get new work (simulator/pools.py)."""
        self.pending = 0
        """Requests decided onto this instance whose part here is not done yet."""
        self.ready_at = 0.0
        """When its latest start ends (simulator/pools.py)."""

    def snapshot(self, now: float, margin_quantile: float, network: Transport) -> InstanceSnapshot:
        return InstanceSnapshot(
            id=self.id,
            role=self.role,
            state=self.state,
            predictor=self.predictor,
            load=InstanceLoad(
                self.queued_prefill_tokens,
                self.num_prefills,
                self.running_decodes,
                self.context_tokens,
                self.remaining_decode_tokens,
            ),
            capacity=self.engine.profile.max_num_seqs,
            host=self.host,
            pool_transport=Transport.SHM,
            network_transport=network,
            ttft_margin=self.predictor.ttft_margin(margin_quantile, now),
        )


def scheduling_config(config: SimConfig, setup: Setup) -> SchedulingConfig:
    colocated = setup.shape is Shape.COLOCATED
    return SchedulingConfig(
        local_prefill_threshold_tokens=(
            NEVER_DISAGGREGATE if colocated else setup.local_prefill_threshold_tokens
        ),
        conditional_disaggregation=colocated or setup.conditional_disaggregation,
        local_fallback=setup.local_fallback,
        kv_bytes_per_token=config.profile.kv_bytes_per_token,
        default_ttft_slo_s=config.ttft_slo_s,
        default_tpot_slo_s=config.tpot_slo_s,
    )


class SimGateway:
    """Decides each request with the setup's real policy over the instances' real snapshots."""

    def __init__(
        self,
        config: SimConfig,
        setup: Setup,
        instances: Sequence[SimInstance],
        index: PrefixIndex,
    ) -> None:
        self.config = config
        self.scheduling = scheduling_config(config, setup)
        self.policy = make_policy(setup.policy, self.scheduling)
        self.instances = tuple(instances)
        self.by_id = {i.id: i for i in self.instances}
        self.index = index
        self.engine_sources = frozenset(self.by_id)

    def cached(self, keys: tuple[BlockKey, ...]) -> CachedPrefix:
        if not keys:
            return NO_CACHE
        return cached_prefix(self.index.match(keys), self.engine_sources)

    def decide(
        self, num_prompt_tokens: int, max_tokens: int, keys: tuple[BlockKey, ...], now: float
    ) -> tuple[Decision, CachedPrefix]:
        cached = self.cached(keys)
        request = RequestSnapshot(
            num_prompt_tokens=num_prompt_tokens,
            max_tokens=max_tokens,
            block_size=self.config.cache_block_tokens,
            cached=cached,
        )
        quantile, network = self.scheduling.slo_margin_quantile, self.config.network
        snapshots = [
            i.snapshot(now, quantile, network)
            for i in self.instances
            if i.state is InstanceState.READY
        ]
        return self.policy.decide(request, snapshots), cached
