"""The policy interface (:class:`SchedulingPolicy`) and the base of the policies built on
:class:`RequestCosts` (:class:`CostPolicy`: the ready candidates, or a rejection when no decode
instance is ready)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from controlplane.scheduling.policies.costs import Candidates, RequestCosts, candidates
from controlplane.scheduling.types import (
    Decision,
    InstanceSnapshot,
    Reject,
    RejectReason,
    RequestSnapshot,
    SchedulingConfig,
)

__all__ = ["CostPolicy", "SchedulingPolicy"]


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

    def _choose(self, costs: RequestCosts, prefills: Candidates, decodes: Candidates) -> Decision:
        """The decision, given at least one ready decode instance."""
        raise NotImplementedError
