"""Sizing rules, one per module (docs/design/planner.md §3): ``slo_model`` (Strata's) and
``dynamo_sla`` (Dynamo's SLA planner, a baseline). Stateless: each call gets the planner's
config (the engines' limits may change while the gateway runs)."""

from __future__ import annotations

from controlplane.planning.policies.base import SizingPolicy, best_decode_batch
from controlplane.planning.policies.dynamo_sla import DynamoSla
from controlplane.planning.policies.slo_model import SloModel

__all__ = ["DynamoSla", "SizingPolicy", "SloModel", "best_decode_batch"]
