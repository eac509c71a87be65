"""Cluster snapshots with round-number latency models, for the policy and admission tables.

``SIMPLE``: prefill 1 ms per new token (nothing else), decode step 10 ms + 1 ms per sequence,
transfers with no latency at 1 GB/s (shm, RDMA) or 100 MB/s (TCP, SSD reads); with
``KV_BYTES_PER_TOKEN`` = 1000 a 1000-token prompt moves in 1 ms (shm) or 10 ms (TCP).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from controlplane.instances.types import InstanceState
from controlplane.scheduling import (
    Assign,
    CachedPrefix,
    DecodeCoefficients,
    InstanceLoad,
    InstanceSnapshot,
    LatencyPredictor,
    PrefillCoefficients,
    RequestSnapshot,
    SchedulingConfig,
    TransferCoefficients,
    Transport,
)
from controlplane.workers.roles import WorkerRole

KV_BYTES_PER_TOKEN = 1000
BLOCK = 16

SIMPLE = LatencyPredictor(
    PrefillCoefficients(fixed_s=0.0, per_new_token_s=1e-3, per_cached_token_s=0.0,
                        per_attention_pair_s=0.0),
    DecodeCoefficients(fixed_s=0.010, per_sequence_s=1e-3, per_context_token_s=0.0),
    {
        Transport.SHM: TransferCoefficients(0.0, 1e9),
        Transport.TCP: TransferCoefficients(0.0, 1e8),
        Transport.RDMA: TransferCoefficients(0.0, 1e9),
    },
    TransferCoefficients(0.0, 1e8),
)  # fmt: skip

P, D, B = WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.BOTH
READY, STARTING, DRAINING, DEAD = (
    InstanceState.READY,
    InstanceState.STARTING,
    InstanceState.DRAINING,
    InstanceState.DEAD,
)


def config(**overrides: object) -> SchedulingConfig:
    fields: dict[str, object] = {"kv_bytes_per_token": KV_BYTES_PER_TOKEN}
    fields.update(overrides)
    return SchedulingConfig(**fields)  # type: ignore[arg-type]


def instance(
    id: str,
    role: WorkerRole,
    state: InstanceState = READY,
    *,
    queued: int = 0,
    requests: int | None = None,
    running: int = 0,
    context: int = 0,
    remaining: int = 0,
    capacity: int = 0,
    host: str = "",
    predictor: LatencyPredictor = SIMPLE,
    margin: float = 1.0,
) -> InstanceSnapshot:
    load = InstanceLoad(
        queued_prefill_tokens=queued,
        queued_prefill_requests=(1 if queued else 0) if requests is None else requests,
        running_decodes=running,
        decode_context_tokens=context,
        remaining_decode_tokens=remaining,
    )
    return InstanceSnapshot(
        id=id,
        role=role,
        state=state,
        predictor=predictor,
        load=load,
        capacity=capacity,
        host=host,
        ttft_margin=margin,
    )


def request(
    prompt: int = 1000,
    *,
    max_tokens: int = 101,
    pool: int = 0,
    ssd: int = 0,
    hbm: Mapping[str, int] | None = None,
    ttft_slo_s: float | None = None,
    tpot_slo_s: float | None = None,
) -> RequestSnapshot:
    """The default request: 1000 prompt tokens (62 blocks of 16 can hit), 101 output tokens."""
    cached = CachedPrefix(pool, ssd, MappingProxyType(dict(hbm or {})))
    return RequestSnapshot(prompt, max_tokens, BLOCK, cached, ttft_slo_s, tpot_slo_s)


def assigned(decision: object) -> tuple[str | None, str]:
    """The (prefill, decode) ids of an Assign."""
    assert isinstance(decision, Assign), decision
    return decision.prefill, decision.decode
