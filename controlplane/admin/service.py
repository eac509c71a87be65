"""The Admin gRPC service (proto/strata_proto/admin.proto), typed with the committed stubs.

The service is a thin, strict shell around :class:`~controlplane.instances.types.AdminBackend`
(the registry): it checks every argument (:mod:`controlplane.admin.convert`), calls the backend,
and turns the result into protobuf or the backend's error into a status code. Nothing
protobuf-shaped reaches the backend; nothing backend-shaped leaves except as protobuf.
Authentication happens before it (:mod:`controlplane.admin.auth`); the server that hosts it next
to the health service: :mod:`controlplane.admin.server`.

Status codes: bad arguments (checked here before the backend is called, and
:class:`InvalidAdminRequest` from the backend) → INVALID_ARGUMENT; :class:`InstanceNotFound` →
NOT_FOUND; :class:`InstanceConflict` → ALREADY_EXISTS for ``Add`` (the endpoint is registered
already) and FAILED_PRECONDITION elsewhere; :class:`LauncherUnavailable` (the Kubernetes API
failing or unreachable) → UNAVAILABLE; anything else → INTERNAL with the traceback logged.
The service keeps serving after every error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc

from controlplane.admin.config import DEFAULT_REMOVE_WAIT_S
from controlplane.admin.convert import (
    ANY_ROLE,
    POOL_ROLES,
    check_endpoint,
    check_id,
    check_policy_name,
    check_replicas,
    check_role,
    check_wait_s,
    instance_to_proto,
    stats_to_proto,
)
from controlplane.instances.types import (
    AdminBackend,
    ClusterStats,
    InstanceConflict,
    InstanceNotFound,
    InvalidAdminRequest,
    LauncherUnavailable,
)
from strata_proto import admin_pb2, admin_pb2_grpc

__all__ = [
    "AdminService",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Context: TypeAlias = grpc.aio.ServicerContext
"""The servicer context of an Admin RPC (grpc ships no type stubs: it is ``Any`` to mypy)."""


class AdminService(admin_pb2_grpc.AdminServicer):
    """Admin RPCs → :class:`AdminBackend` calls, with argument checks and status codes."""

    def __init__(self, backend: AdminBackend) -> None:
        self._backend = backend

    async def _call(
        self,
        context: Context,
        rpc: str,
        work: Callable[[], Awaitable[T]],
        conflict: Any = grpc.StatusCode.FAILED_PRECONDITION,
    ) -> T:
        try:
            return await work()
        except InvalidAdminRequest as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except InstanceNotFound as exc:
            code, message = grpc.StatusCode.NOT_FOUND, str(exc)
        except InstanceConflict as exc:
            code, message = conflict, str(exc)
        except LauncherUnavailable as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("admin: %s failed", rpc)
            code, message = grpc.StatusCode.INTERNAL, f"{rpc} failed; see the gateway log"
        await context.abort(code, message or code.name.lower())
        raise AssertionError("unreachable: context.abort raises")

    async def List(
        self, request: admin_pb2.ListRequest, context: Context
    ) -> admin_pb2.ListResponse:
        async def work() -> admin_pb2.ListResponse:
            infos = sorted(self._backend.list_instances(), key=lambda i: i.id)
            return admin_pb2.ListResponse(instances=[instance_to_proto(i) for i in infos])

        return await self._call(context, "List", work)

    async def Add(self, request: admin_pb2.AddRequest, context: Context) -> admin_pb2.AddResponse:
        async def work() -> admin_pb2.AddResponse:
            role = check_role(request.role, ANY_ROLE, "Add")
            check_endpoint(request.endpoint)
            info = await self._backend.add_instance(role, request.endpoint)
            return admin_pb2.AddResponse(instance=instance_to_proto(info))

        return await self._call(context, "Add", work, conflict=grpc.StatusCode.ALREADY_EXISTS)

    async def Drain(
        self, request: admin_pb2.DrainRequest, context: Context
    ) -> admin_pb2.DrainResponse:
        async def work() -> admin_pb2.DrainResponse:
            info = await self._backend.drain(check_id(request.id))
            return admin_pb2.DrainResponse(instance=instance_to_proto(info))

        return await self._call(context, "Drain", work)

    async def Remove(
        self, request: admin_pb2.RemoveRequest, context: Context
    ) -> admin_pb2.RemoveResponse:
        async def work() -> admin_pb2.RemoveResponse:
            instance_id = check_id(request.id)
            wait_s = request.wait_s if request.HasField("wait_s") else DEFAULT_REMOVE_WAIT_S
            await self._backend.remove(instance_id, wait_s=check_wait_s(wait_s))
            return admin_pb2.RemoveResponse()

        return await self._call(context, "Remove", work)

    async def Scale(
        self, request: admin_pb2.ScaleRequest, context: Context
    ) -> admin_pb2.ScaleResponse:
        async def work() -> admin_pb2.ScaleResponse:
            role = check_role(request.role, POOL_ROLES, "Scale")
            planned: list[str] = []
            infos = await self._backend.scale(
                role, check_replicas(request.replicas), planned=planned
            )
            ordered = sorted(infos, key=lambda i: i.id)
            return admin_pb2.ScaleResponse(
                instances=[instance_to_proto(i) for i in ordered], planned=planned
            )

        return await self._call(context, "Scale", work)

    async def SetRole(
        self, request: admin_pb2.SetRoleRequest, context: Context
    ) -> admin_pb2.SetRoleResponse:
        async def work() -> admin_pb2.SetRoleResponse:
            instance_id = check_id(request.id)
            role = check_role(request.role, ANY_ROLE, "SetRole")
            planned: list[str] = []
            info = await self._backend.set_role(instance_id, role, planned=planned)
            return admin_pb2.SetRoleResponse(instance=instance_to_proto(info), planned=planned)

        return await self._call(context, "SetRole", work)

    async def SetPolicy(
        self, request: admin_pb2.SetPolicyRequest, context: Context
    ) -> admin_pb2.SetPolicyResponse:
        async def work() -> admin_pb2.SetPolicyResponse:
            self._backend.set_policy(check_policy_name(request.name))
            return admin_pb2.SetPolicyResponse(policy=self._backend.stats().policy)

        return await self._call(context, "SetPolicy", work)

    async def Stats(
        self, request: admin_pb2.StatsRequest, context: Context
    ) -> admin_pb2.StatsResponse:
        async def work() -> admin_pb2.StatsResponse:
            stats = self._backend.stats()
            ordered = sorted(stats.instances, key=lambda i: i.id)
            return stats_to_proto(
                ClusterStats(
                    policy=stats.policy,
                    instances=tuple(ordered),
                    requests_total=stats.requests_total,
                    requests_rejected=stats.requests_rejected,
                    requests_failed_over=stats.requests_failed_over,
                    predictor_ttft_mape=stats.predictor_ttft_mape,
                    predictor_tpot_mape=stats.predictor_tpot_mape,
                    extra=stats.extra,
                )
            )

        return await self._call(context, "Stats", work)
