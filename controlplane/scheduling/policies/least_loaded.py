"""``least_loaded``: decode: fewest running sequences, then fewest context tokens; prefill:
fewest queued prefill tokens, then requests."""

from __future__ import annotations

from controlplane.scheduling.policies.costs import Candidates, RequestCosts
from controlplane.scheduling.policies.picker import PickerPolicy
from controlplane.scheduling.types import InstanceSnapshot

__all__ = ["LeastLoadedPolicy"]


class LeastLoadedPolicy(PickerPolicy):
    name = "least_loaded"

    def _pick_decode(self, costs: RequestCosts, decodes: Candidates) -> InstanceSnapshot:
        return min(decodes, key=lambda d: (d.load.running_decodes, d.load.decode_context_tokens))

    def _pick_prefill(self, costs: RequestCosts, prefills: Candidates) -> InstanceSnapshot:
        return min(
            prefills,
            key=lambda p: (p.load.queued_prefill_tokens, p.load.queued_prefill_requests),
        )
