"""The base of the policies that pick one instance per side by a criterion of their own and never
reject (:class:`PickerPolicy`)."""

from __future__ import annotations

from controlplane.scheduling.policies.base import CostPolicy
from controlplane.scheduling.policies.costs import Candidates, RequestCosts, transport_between
from controlplane.scheduling.types import Assign, Decision, InstanceSnapshot, Route

__all__ = ["PickerPolicy"]


class PickerPolicy(CostPolicy):
    """A policy that picks the decode instance, then (unless the decode instance prefills
    itself) the prefill instance, each by its own criterion, and never rejects."""

    def _choose(self, costs: RequestCosts, prefills: Candidates, decodes: Candidates) -> Decision:
        decode = self._pick_decode(costs, decodes)
        route = costs.local_route(decode)
        prefill: InstanceSnapshot | None = None
        if route is None:
            if not prefills:
                route = Route.LOCAL_NO_PREFILL
            else:
                prefill = self._pick_prefill(costs, prefills)
                if prefill.id == decode.id:
                    route, prefill = Route.LOCAL_SAME_INSTANCE, None
                else:
                    route = Route.DISAGGREGATED
        if prefill is None:
            return Assign(
                None,
                decode.id,
                costs.ttft_s(decode, local=True),
                costs.tpot_s(decode, None),
                costs.cached_blocks(decode),
                route,
                self.name,
            )
        return Assign(
            prefill.id,
            decode.id,
            costs.ttft_s(prefill, local=False),
            costs.tpot_s(decode, transport_between(prefill, decode)),
            costs.cached_blocks(prefill),
            route,
            self.name,
        )

    def _pick_decode(self, costs: RequestCosts, decodes: Candidates) -> InstanceSnapshot:
        raise NotImplementedError

    def _pick_prefill(self, costs: RequestCosts, prefills: Candidates) -> InstanceSnapshot:
        raise NotImplementedError
