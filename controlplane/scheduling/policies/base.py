"""The policy interface (:class:`SchedulingPolicy`), the base of the policies built on
:class:`RequestCosts` (:class:`CostPolicy`), and the base of those that pick one instance per side
by a criterion of their own and never reject (:class:`PickerPolicy`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from controlplane.scheduling.policies.costs import RequestCosts, candidates, transport_between
from controlplane.scheduling.types import (
    Assign,
    Decision,
    InstanceSnapshot,
    Reject,
    RejectReason,
    RequestSnapshot,
    Route,
    SchedulingConfig,
)

__all__ = ["CostPolicy", "PickerPolicy", "SchedulingPolicy"]


class SchedulingPolicy(Protocol):
    """Chooses the instances of one request. ``instances``: the registry's snapshot, in a stable
    order (ties go to the first listed); only ready ones are ever chosen."""

    @property
    def name(self) -> str:
        """The name :func:`make_policy` knows it by."""
        ...

    def decide(
        self, request: RequestSnapshot, instances: Sequence[InstanceSnapshot]
    ) -> Decision: ...


class CostPolicy:
    """A policy that chooses among the ready candidates by the request's :class:`RequestCosts`;
    with no ready decode instance it rejects (``NO_INSTANCE``) before asking ``_choose``."""

    name: str

    def __init__(self, config: SchedulingConfig | None = None) -> None:
        self.config = config if config is not None else SchedulingConfig()

    def decide(self, request: RequestSnapshot, instances: Sequence[InstanceSnapshot]) -> Decision:
        prefills, decodes = candidates(instances)
        if not decodes:
            return Reject(
                RejectReason.NO_INSTANCE,
                None,
                f"no ready decode instance among {len(instances)} known",
            )
        return self._choose(RequestCosts(request, self.config), prefills, decodes)

    def _choose(
        self,
        costs: RequestCosts,
        prefills: Sequence[InstanceSnapshot],
        decodes: Sequence[InstanceSnapshot],
    ) -> Decision:
        """The decision, given at least one ready decode instance."""
        raise NotImplementedError


class PickerPolicy(CostPolicy):
    """A policy that picks the decode instance, then (unless the decode instance prefills
    itself) the prefill instance, each by its own criterion, and never rejects."""

    def _choose(
        self,
        costs: RequestCosts,
        prefills: Sequence[InstanceSnapshot],
        decodes: Sequence[InstanceSnapshot],
    ) -> Decision:
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

    def _pick_decode(
        self, costs: RequestCosts, decodes: Sequence[InstanceSnapshot]
    ) -> InstanceSnapshot:
        raise NotImplementedError

    def _pick_prefill(
        self, costs: RequestCosts, prefills: Sequence[InstanceSnapshot]
    ) -> InstanceSnapshot:
        raise NotImplementedError
