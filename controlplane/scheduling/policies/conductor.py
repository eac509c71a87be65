"""``conductor``: Mooncake's Conductor as published (FAST'25, §6, Algorithm 1), a baseline for the
simulator and a choice for the gateway.

For each prefill instance P: its own cached prefix ``local(P)`` (blocks in its HBM), the longest
prefix anywhere ``best`` (any engine's HBM, or the pool); if ``best`` is not much longer than
``local(P)`` (``best / local(P) <= BALANCING_THRESHOLD``) P recomputes the rest, otherwise it
first fetches the ``best - local(P)`` blocks it lacks (Mooncake's KVCache balancing: from the pool
through its host's store node, or from another engine over the network)::

    TTFT(P) = overhead + queue_s(P) + prefill_s(prompt - bs·c, bs·c) [+ transfer of the fetched]

with ``c`` the blocks it then has. The prefill instance with the lowest TTFT wins; the decode
instance is the one with the lowest predicted TBT (its step with the request added, plus the KV
transfer spread over the output) among those with a free slot (all of them when none has one:
the TBT check then decides). If the TTFT or the TBT misses its
SLO the request is rejected (Mooncake's early rejection; Retry-After: the configured minimum —
Mooncake predicts no wait). What it does not have that ``slo_aware`` has: the admission margin,
the quiet-TTFT test, the SSD tier's read cost, conditional disaggregation, a wait estimate.
"""

from __future__ import annotations

from typing import Final

from controlplane.scheduling.policies.base import CostPolicy
from controlplane.scheduling.policies.costs import INF, Candidates, RequestCosts, transport_between
from controlplane.scheduling.types import (
    Assign,
    Decision,
    InstanceSnapshot,
    Reject,
    RejectReason,
    Route,
)

__all__ = ["BALANCING_THRESHOLD", "ConductorPolicy"]

BALANCING_THRESHOLD: Final = 1.5
"""Fetch the longest prefix from elsewhere only if it is this many times the local one (the
paper's ``kvcache_balancing_threshold``; its value is not published)."""


class ConductorPolicy(CostPolicy):
    name = "conductor"

    def _choose(self, costs: RequestCosts, prefills: Candidates, decodes: Candidates) -> Decision:
        request = costs.request
        bs = request.block_size
        usable = (request.num_prompt_tokens - 1) // bs
        pool = min(usable, request.cached.pool_blocks)
        # FindBestPrefixMatch: the pool (Mooncake's store) and the prefill instances' caches.
        best = max([pool, *(costs.hbm_blocks(p) for p in prefills)])
        chosen: tuple[float, int, InstanceSnapshot, int] | None = None
        for order, prefill in enumerate(prefills):
            local = costs.hbm_blocks(prefill)
            fetch = best > local and (local == 0 or best / local > BALANCING_THRESHOLD)
            have = best if fetch else local
            predictor = prefill.predictor
            ttft = (
                predictor.ttft_overhead_s
                + costs.queue_s(prefill)
                + predictor.prefill_s(request.num_prompt_tokens - bs * have, bs * have)
            )
            if fetch:  # from the pool (through its host's node) or from another engine
                num_bytes = (best - local) * bs * self.config.kv_bytes_per_token
                transport = prefill.pool_transport if pool >= best else prefill.network_transport
                ttft += predictor.transfer(transport).predict_s(num_bytes)
            if chosen is None or (ttft, order) < chosen[:2]:
                chosen = (ttft, order, prefill, have)
        free = [d for d in decodes if costs.has_free_slot(d)] or list(decodes)
        if chosen is None:  # no prefill instance: the decode instance prefills itself
            decode = min(free, key=lambda d: costs.tpot_s(d, None))
            ttft, tbt = costs.ttft_s(decode, local=True), costs.tpot_s(decode, None)
            assign = Assign(
                None, decode.id, ttft, tbt, costs.cached_blocks(decode),
                Route.LOCAL_NO_PREFILL, self.name,
            )  # fmt: skip
        else:
            ttft, _, prefill, have = chosen
            others = [d for d in free if d.id != prefill.id]
            if others:
                decode, tbt = min(
                    ((d, costs.tpot_s(d, transport_between(prefill, d))) for d in others),
                    key=lambda pair: pair[1],
                )
                route = Route.DISAGGREGATED
                assign = Assign(prefill.id, decode.id, ttft, tbt, have, route, self.name)
            else:  # a BOTH instance, the only decode instance: it decodes what it prefilled
                tbt = costs.tpot_s(prefill, None)
                route = Route.LOCAL_SAME_INSTANCE
                assign = Assign(None, prefill.id, ttft, tbt, have, route, self.name)
        ttft_slo = costs.ttft_slo_s if costs.ttft_slo_s is not None else INF
        tpot_slo = costs.tpot_slo_s if costs.tpot_slo_s is not None else INF
        if ttft > ttft_slo or tbt > tpot_slo:
            return Reject(
                RejectReason.OVERLOADED,
                self.config.min_retry_after_s,
                f"predicted TTFT {ttft * 1e3:.0f} ms, TBT {tbt * 1e3:.1f} ms against the SLOs",
            )
        return assign
