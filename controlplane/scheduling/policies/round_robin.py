"""``round_robin``: decode instances in turn; prefill instances in turn when one is needed."""

from __future__ import annotations

from controlplane.scheduling.policies.costs import Candidates, RequestCosts
from controlplane.scheduling.policies.picker import PickerPolicy
from controlplane.scheduling.types import (
    InstanceSnapshot,
    SchedulingConfig,
)

__all__ = ["RoundRobinPolicy"]


class RoundRobinPolicy(PickerPolicy):
    """Each side in turn over its ready instances (positions survive membership changes as
    counters modulo the current number of candidates)."""

    name = "round_robin"

    def __init__(self, config: SchedulingConfig | None = None) -> None:
        super().__init__(config)
        self._next_decode = 0
        self._next_prefill = 0

    def _pick_decode(self, costs: RequestCosts, decodes: Candidates) -> InstanceSnapshot:
        chosen = decodes[self._next_decode % len(decodes)]
        self._next_decode += 1
        return chosen

    def _pick_prefill(self, costs: RequestCosts, prefills: Candidates) -> InstanceSnapshot:
        chosen = prefills[self._next_prefill % len(prefills)]
        self._next_prefill += 1
        return chosen
