"""Admin arguments and messages: checks of every request field (:class:`InvalidAdminRequest`
when wrong), role names, and protobuf ⇄ :class:`InstanceInfo` / :class:`ClusterStats`.
Nothing protobuf-shaped goes further than this package."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import cast

from controlplane.admin.config import MAX_ID_CHARS, MAX_REMOVE_WAIT_S, MAX_REPLICAS
from controlplane.instances.types import (
    ClusterStats,
    InstanceInfo,
    InstanceState,
    InvalidAdminRequest,
)
from controlplane.workers.roles import WorkerRole, role_name
from strata_common.endpoints import EndpointError, parse_endpoint
from strata_proto import admin_pb2, worker_pb2

_POLICY_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

__all__ = [
    "ANY_ROLE",
    "POOL_ROLES",
    "check_endpoint",
    "check_id",
    "check_policy_name",
    "check_replicas",
    "check_role",
    "check_wait_s",
    "instance_from_proto",
    "instance_to_proto",
    "role_from_name",
    "stats_from_proto",
    "stats_to_proto",
]


def role_from_name(name: str) -> WorkerRole:
    try:
        role = WorkerRole[name.upper()]
    except KeyError:
        role = WorkerRole.UNSPECIFIED
    if role is WorkerRole.UNSPECIFIED:
        raise InvalidAdminRequest(f"unknown role {name!r} (expected prefill, decode or both)")
    return role


def check_endpoint(text: str) -> str:
    """``HOST:PORT`` (IPv6 in brackets; :func:`strata_common.endpoints.parse_endpoint`), or
    :class:`InvalidAdminRequest` saying why not."""
    try:
        return str(parse_endpoint(text))
    except EndpointError as exc:
        raise InvalidAdminRequest(str(exc)) from None


def check_role(value: int, allowed: Iterable[WorkerRole], what: str) -> WorkerRole:
    allowed = tuple(allowed)
    try:
        role = WorkerRole(value)
    except ValueError:
        role = WorkerRole.UNSPECIFIED
    if role not in allowed:
        names = ", ".join(role_name(r) for r in allowed)
        shown = role_name(role) if role is not WorkerRole.UNSPECIFIED else f"{value} (unset)"
        raise InvalidAdminRequest(f"{what}: role must be one of {names}, got {shown}")
    return role


ANY_ROLE = (WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.BOTH)
POOL_ROLES = (WorkerRole.PREFILL, WorkerRole.DECODE)


def check_id(instance_id: str) -> str:
    if not instance_id:
        raise InvalidAdminRequest("instance id must not be empty")
    if len(instance_id) > MAX_ID_CHARS or not instance_id.isprintable() or " " in instance_id:
        raise InvalidAdminRequest(f"malformed instance id {instance_id[:MAX_ID_CHARS]!r}")
    return instance_id


def check_replicas(replicas: int) -> int:
    if not 0 <= replicas <= MAX_REPLICAS:
        raise InvalidAdminRequest(f"replicas must be in [0, {MAX_REPLICAS}], got {replicas}")
    return replicas


def check_wait_s(wait_s: float) -> float:
    if not (math.isfinite(wait_s) and 0 <= wait_s <= MAX_REMOVE_WAIT_S):
        raise InvalidAdminRequest(f"wait_s must be in [0, {MAX_REMOVE_WAIT_S:g}], got {wait_s}")
    return wait_s


def check_policy_name(name: str) -> str:
    if not _POLICY_NAME.fullmatch(name):
        raise InvalidAdminRequest(
            f"malformed policy name {name[:64]!r} (lower-case letters, digits and '_')"
        )
    return name


_STATE_TO_PROTO = {
    InstanceState.STARTING: admin_pb2.INSTANCE_STATE_STARTING,
    InstanceState.READY: admin_pb2.INSTANCE_STATE_READY,
    InstanceState.DRAINING: admin_pb2.INSTANCE_STATE_DRAINING,
    InstanceState.DEAD: admin_pb2.INSTANCE_STATE_DEAD,
}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}


def instance_to_proto(info: InstanceInfo) -> admin_pb2.Instance:
    return admin_pb2.Instance(
        id=info.id,
        role=cast(worker_pb2.Role, info.role.value),  # the same numbers (workers/roles.py)
        state=_STATE_TO_PROTO[info.state],
        endpoint=info.endpoint,
        model=info.model,
        block_size=info.block_size,
        capacity=info.capacity,
        in_flight=info.in_flight,
        load=info.load,
        launched=info.launched,
        detail=info.detail,
    )


def instance_from_proto(msg: admin_pb2.Instance) -> InstanceInfo:
    """The client side's conversion; raises ValueError on a state or role this build does not
    know (a newer server)."""
    state = _STATE_FROM_PROTO.get(msg.state)
    if state is None:
        raise ValueError(f"unknown instance state {msg.state}")
    return InstanceInfo(
        id=msg.id,
        role=WorkerRole(msg.role),
        state=state,
        endpoint=msg.endpoint,
        model=msg.model,
        block_size=msg.block_size,
        capacity=msg.capacity,
        in_flight=msg.in_flight,
        load=msg.load,
        launched=msg.launched,
        detail=msg.detail,
    )


def stats_to_proto(stats: ClusterStats) -> admin_pb2.StatsResponse:
    msg = admin_pb2.StatsResponse(
        policy=stats.policy,
        instances=[instance_to_proto(i) for i in stats.instances],
        requests_total=stats.requests_total,
        requests_rejected=stats.requests_rejected,
        requests_failed_over=stats.requests_failed_over,
        extra=dict(stats.extra),
    )
    if stats.predictor_ttft_mape is not None:
        msg.predictor_ttft_mape = stats.predictor_ttft_mape
    if stats.predictor_tpot_mape is not None:
        msg.predictor_tpot_mape = stats.predictor_tpot_mape
    return msg


def stats_from_proto(msg: admin_pb2.StatsResponse) -> ClusterStats:
    return ClusterStats(
        policy=msg.policy,
        instances=tuple(instance_from_proto(i) for i in msg.instances),
        requests_total=msg.requests_total,
        requests_rejected=msg.requests_rejected,
        requests_failed_over=msg.requests_failed_over,
        predictor_ttft_mape=(
            msg.predictor_ttft_mape if msg.HasField("predictor_ttft_mape") else None
        ),
        predictor_tpot_mape=(
            msg.predictor_tpot_mape if msg.HasField("predictor_tpot_mape") else None
        ),
        extra=dict(msg.extra),
    )
