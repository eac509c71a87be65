"""``prefix_aware`` (Dynamo's KV router): prefill: ``w·new(P)/bs + q(P)/bs`` (blocks to prefill
plus queued blocks); decode: ``w·(prompt blocks not in D's HBM) + k(D)/bs`` (blocks to move in
plus active blocks)."""

from __future__ import annotations

from controlplane.scheduling.policies.costs import Candidates, RequestCosts
from controlplane.scheduling.policies.picker import PickerPolicy
from controlplane.scheduling.types import InstanceSnapshot

__all__ = ["PrefixAwarePolicy"]


class PrefixAwarePolicy(PickerPolicy):
    """Dynamo's KV-router cost, in blocks: work the instance would add plus work it has."""

    name = "prefix_aware"

    def _pick_decode(self, costs: RequestCosts, decodes: Candidates) -> InstanceSnapshot:
        return min(decodes, key=lambda d: self.decode_cost(costs, d))

    def _pick_prefill(self, costs: RequestCosts, prefills: Candidates) -> InstanceSnapshot:
        return min(prefills, key=lambda p: self.prefill_cost(costs, p))

    def prefill_cost(self, costs: RequestCosts, prefill: InstanceSnapshot) -> float:
        """``w·new(P)/bs + q(P)/bs``: blocks to prefill plus queued blocks."""
        block_size = costs.request.block_size
        return (
            self.config.overlap_weight * costs.new_tokens(prefill)
            + prefill.load.queued_prefill_tokens
        ) / block_size

    def decode_cost(self, costs: RequestCosts, decode: InstanceSnapshot) -> float:
        """``w·(prompt blocks not in D's HBM) + k(D)/bs``: blocks to bring in plus active ones."""
        request = costs.request
        block_size = request.block_size
        prompt_blocks = -(-request.num_prompt_tokens // block_size)
        missing = prompt_blocks - costs.hbm_blocks(decode)
        return self.config.overlap_weight * missing + decode.load.decode_context_tokens / block_size
