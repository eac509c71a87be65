"""Sizing rules, one per module (docs/design/planner.md §3): ``slo_model`` (Strata's),
``dynamo_sla`` (Dynamo's SLA planner, a baseline) and ``fixed``."""

from __future__ import annotations

from controlplane.planning.policies.base import SizingPolicy, best_decode_batch
from controlplane.planning.policies.dynamo_sla import DynamoSla
from controlplane.planning.policies.fixed import FixedSizes
from controlplane.planning.policies.slo_model import SloModel

__all__ = [
    "DynamoSla",
    "FixedSizes",
    "SizingPolicy",
    "SloModel",
    "best_decode_batch",
]
