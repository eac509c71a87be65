"""What crosses the scheduler's boundary: request and instance snapshots in, a Decision out.

All frozen and slotted. The registry builds :class:`InstanceSnapshot` values from its records
(:class:`~controlplane.instances.types.InstanceInfo` plus its in-flight counters and the instance's
:class:`~controlplane.scheduling.predictor.predictor.LatencyPredictor`); the gateway builds a
:class:`RequestSnapshot` per request (its :class:`CachedPrefix` from the prefix index with
:func:`controlplane.scheduling.prefix.cached_prefix`); a policy returns :class:`Assign` or
:class:`Reject`. docs/design/scheduling.md §3 describes each field's use.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from controlplane.instances.types import InstanceState
from controlplane.scheduling.predictor.model import Transport
from controlplane.scheduling.predictor.predictor import LatencyPredictor
from controlplane.workers.roles import WorkerRole
from strata_common.options import option
from strata_common.units import parse_duration

__all__ = [
    "IDLE",
    "NO_CACHE",
    "Assign",
    "CachedPrefix",
    "Decision",
    "InstanceLoad",
    "InstanceSnapshot",
    "Reject",
    "RejectReason",
    "RequestSnapshot",
    "Route",
    "SchedulingConfig",
]


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """What the cluster's KV caches hold of one prompt's block chain.

    ``pool_blocks``: leading blocks readable from the KV pool (store nodes, DRAM or SSD), of which
    ``pool_ssd_blocks`` only from SSD. ``hbm_blocks``: per engine (its KV source id), the leading
    blocks resident in its own GPU memory, which only that engine can use.
    """

    pool_blocks: int = 0
    pool_ssd_blocks: int = 0
    hbm_blocks: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not 0 <= self.pool_ssd_blocks <= self.pool_blocks:
            raise ValueError("need 0 <= pool_ssd_blocks <= pool_blocks")
        if any(depth < 0 for depth in self.hbm_blocks.values()):
            raise ValueError("hbm_blocks depths must be >= 0")


NO_CACHE: Final = CachedPrefix()


@dataclass(frozen=True, slots=True)
class RequestSnapshot:
    """One request as the scheduler sees it.

    ``ttft_slo_s`` / ``tpot_slo_s``: the request's SLOs (from the ``x-strata-*-slo-ms`` headers);
    None falls back to the policy's configured default, and None there means no SLO.
    """

    num_prompt_tokens: int
    max_tokens: int
    block_size: int
    cached: CachedPrefix = NO_CACHE
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1 or self.max_tokens < 1 or self.block_size < 1:
            raise ValueError("num_prompt_tokens, max_tokens and block_size must be >= 1")
        for name, slo in (("ttft_slo_s", self.ttft_slo_s), ("tpot_slo_s", self.tpot_slo_s)):
            if slo is not None and not (math.isfinite(slo) and slo > 0.0):
                raise ValueError(f"{name} must be finite and > 0, got {slo}")


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """In-flight work the gateway has on one instance (maintained by the registry).

    ``queued_prefill_tokens``: uncached prompt tokens of the ``queued_prefill_requests`` requests
    assigned to it whose prefill has not finished (running ones included).
    ``running_decodes``: sequences it is decoding; ``decode_context_tokens``: their tokens in all
    (prompt + generated); ``remaining_decode_tokens``: the sum over them of ``max_tokens`` minus
    tokens generated (0 = unknown; the policies then assume
    :attr:`SchedulingConfig.default_remaining_tokens` per sequence).
    """

    queued_prefill_tokens: int = 0
    queued_prefill_requests: int = 0
    running_decodes: int = 0
    decode_context_tokens: int = 0
    remaining_decode_tokens: int = 0

    def __post_init__(self) -> None:
        if (
            min(
                self.queued_prefill_tokens,
                self.queued_prefill_requests,
                self.running_decodes,
                self.decode_context_tokens,
                self.remaining_decode_tokens,
            )
            < 0
        ):
            raise ValueError("load counters must be >= 0")


IDLE: Final = InstanceLoad()


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    """One instance as the scheduler sees it.

    ``host``: instances with the same non-empty host exchange KV through shared memory.
    ``kv_source``: the source id under which its engine publishes HBM-resident blocks to the
    prefix index (default: the instance id). ``pool_transport``: how it reads the KV pool (SHM
    when a store node runs on its host); ``network_transport``: how it receives KV from another
    host (TCP or RDMA).
    """

    id: str
    role: WorkerRole
    state: InstanceState
    predictor: LatencyPredictor
    load: InstanceLoad = IDLE
    capacity: int = 0
    """Most sequences it decodes at once (max_num_seqs); 0 = unknown (no limit assumed)."""
    host: str = ""
    kv_source: str | None = None
    pool_transport: Transport = Transport.SHM
    network_transport: Transport = Transport.TCP
    ttft_margin: float = 1.0
    """What admission scales its predicted TTFT by while it is busy: the configured quantile of
    its recent observed/predicted TTFT ratios (controlplane/scheduling/predictor/margin.py)."""

    @property
    def source_id(self) -> str:
        return self.id if self.kv_source is None else self.kv_source

    @property
    def schedulable(self) -> bool:
        """Only ready instances get new work (never starting, draining or dead ones)."""
        return self.state is InstanceState.READY

    def can_prefill(self) -> bool:
        return self.role is WorkerRole.PREFILL or self.role is WorkerRole.BOTH

    def can_decode(self) -> bool:
        return self.role is WorkerRole.DECODE or self.role is WorkerRole.BOTH


class Route(enum.Enum):
    """Why an :class:`Assign` has or has not a prefill instance."""

    DISAGGREGATED = "disaggregated"
    """Prefill on the prefill instance, KV moved to the decode instance."""
    LOCAL_SHORT = "local_short"
    """The uncached part on the decode instance is below the threshold: it prefills itself."""
    LOCAL_RESIDENT = "local_resident"
    """Every full block of the prompt is in the decode instance's HBM already."""
    LOCAL_NO_PREFILL = "local_no_prefill"
    """No prefill instance is ready: the decode instance prefills itself."""
    LOCAL_SAME_INSTANCE = "local_same_instance"
    """A BOTH instance was chosen for both sides."""
    LOCAL_FALLBACK = "local_fallback"
    """No disaggregated pair meets the SLOs, but the decode instance prefilling itself does
    (``slo_aware`` with ``local_fallback`` on): e.g. a long prompt with a short output, whose KV
    transfer alone would break the TPOT SLO, or prefill instances too busy for the TTFT SLO."""


@dataclass(frozen=True, slots=True)
class Assign:
    """Serve the request: prefill on ``prefill`` (None: ``decode`` prefills itself), decode on
    ``decode``. Predictions are for the metrics (MAPE) and the logs."""

    prefill: str | None
    decode: str
    predicted_ttft_s: float
    predicted_tpot_s: float
    cached_blocks: int
    """Cached blocks the instance that prefills uses (its own HBM or the pool)."""
    route: Route
    policy: str


class RejectReason(enum.Enum):
    NO_INSTANCE = "no_instance"
    """No ready instance can decode (the gateway answers 503)."""
    OVERLOADED = "overloaded"
    """No pair meets the SLOs now, but one would once queues drain: 429 with Retry-After."""
    SLO_UNATTAINABLE = "slo_unattainable"
    """Not even an idle instance could meet the SLOs: 429 without Retry-After (retrying the same
    request will not help)."""


@dataclass(frozen=True, slots=True)
class Reject:
    reason: RejectReason
    retry_after_s: float | None
    detail: str = ""


Decision = Assign | Reject


@dataclass(frozen=True, slots=True)
class SchedulingConfig:
    """Knobs of every policy (defaults and reasons: docs/design/scheduling.md §1, §4).

    ``local_prefill_threshold_tokens``: conditional disaggregation sends a prompt to a prefill
    instance only if at least this many of its tokens are uncached on the chosen decode instance
    (Dynamo's ``max_local_prefill_length``). ``conditional_disaggregation``: False always uses
    the prefill pool when one is ready. ``overlap_weight``: prefix_aware's weight of blocks to
    prefill against blocks of load (Dynamo's ``kv_overlap_score_weight``).
    ``kv_bytes_per_token``: KV size of one token (all layers, K and V) for transfer times.
    """

    local_prefill_threshold_tokens: int = option(
        512,
        flag="local-prefill-threshold",
        help="uncached prompt tokens below which the decode worker prefills itself",
    )
    conditional_disaggregation: bool = option(
        True,
        negative_flag="no-conditional-disaggregation",
        help="let the decode worker prefill short uncached prompts itself",
    )
    local_fallback: bool = option(
        False,
        help="slo_aware: when no prefill/decode pair meets the SLOs, let a decode worker that "
        "would prefill the request itself take it rather than refuse it",
    )
    overlap_weight: float = 1.0
    kv_bytes_per_token: int = 131_072
    default_ttft_slo_s: float | None = option(
        None,
        flag="ttft-slo",
        parse=parse_duration,
        help="default TTFT SLO, e.g. 500ms (a request's x-strata-ttft-slo-ms overrides it)",
    )
    default_tpot_slo_s: float | None = option(
        None,
        flag="tpot-slo",
        parse=parse_duration,
        help="default time per output token SLO (x-strata-tpot-slo-ms overrides it)",
    )
    slo_margin_quantile: float = option(
        0.9,
        flag="slo-margin-quantile",
        help="admission scales a busy instance's predicted TTFT by this quantile of its recent "
        "observed/predicted TTFT ratios before the SLO check (0: no margin)",
    )
    default_remaining_tokens: int = 256
    min_retry_after_s: float = 1.0
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.local_prefill_threshold_tokens < 0:
            raise ValueError("local_prefill_threshold_tokens must be >= 0")
        if not (math.isfinite(self.overlap_weight) and self.overlap_weight >= 0.0):
            raise ValueError("overlap_weight must be finite and >= 0")
        if self.kv_bytes_per_token < 1 or self.default_remaining_tokens < 1:
            raise ValueError("kv_bytes_per_token and default_remaining_tokens must be >= 1")
        for name in ("default_ttft_slo_s", "default_tpot_slo_s"):
            slo = getattr(self, name)
            if slo is not None and not (math.isfinite(slo) and slo > 0.0):
                raise ValueError(f"{name} must be finite and > 0, got {slo}")
        if not 0.0 <= self.slo_margin_quantile <= 1.0:
            raise ValueError(
                f"slo_margin_quantile must be in [0, 1], got {self.slo_margin_quantile}"
            )
        if not 0.0 < self.min_retry_after_s <= self.max_retry_after_s:
            raise ValueError("need 0 < min_retry_after_s <= max_retry_after_s")
