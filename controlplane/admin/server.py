"""The admin gRPC server of one gateway: the Admin service behind the token check, and the
standard ``grpc.health.v1.Health`` service, on one port.

Use from the gateway::

    server = AdminServer(AdminConfig.resolve(port=50050), backend)
    port = await server.start()          # health: NOT_SERVING
    await server.set_ready(True)         # health: SERVING once the gateway takes traffic
    ...
    await server.stop(grace_s=5.0)       # health: NOT_SERVING, then in-flight calls finish

With the gateway's TLS credentials the port serves mutual TLS under the cluster CA (callers need
a certificate of the cluster; role ``admin`` needs no token); otherwise it is plaintext gRPC,
for loopback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controlplane.admin.auth import admin_interceptor
from controlplane.admin.config import ADMIN_SERVICE_NAME, AdminConfig, AdminConfigError
from controlplane.admin.service import AdminService
from controlplane.instances.types import (
    AdminBackend,
)
from strata_common.endpoints import bind_port, format_endpoint
from strata_common.grpc_auth import add_port
from strata_proto import admin_pb2_grpc

__all__ = [
    "AdminServer",
]

logger = logging.getLogger(__name__)


class AdminServer:
    """The admin gRPC server of one gateway: the Admin service (token-checked) and the standard
    health service (``""`` and ``strata.admin.v1.Admin``), on one port."""

    _HEALTH_NAMES: Sequence[str] = ("", ADMIN_SERVICE_NAME)

    def __init__(self, config: AdminConfig, backend: AdminBackend) -> None:
        self.config = config
        self._backend = backend
        self._server: Any = None
        self._health: Any = None
        self.port: int | None = None
        """The bound port once started."""

    async def start(self) -> int:
        """Bind and serve (health NOT_SERVING until :meth:`set_ready`); returns the port.

        Raises :class:`AdminConfigError` when the address cannot be bound."""
        if self._server is not None:
            raise RuntimeError("admin server already started")
        config = self.config
        tls = config.tls if config.tls is not None and config.tls.enabled else None
        interceptors = []
        if config.token is not None or config.has_cluster_auth:
            interceptors.append(
                admin_interceptor(config.token, config.cluster_key, tls is not None)
            )
        else:
            logger.warning(
                "admin API on %s WITHOUT authentication (allow_unauthenticated, loopback only)",
                self.config.host,
            )
        # SO_REUSEPORT is gRPC's default; without turning it off a second gateway could bind
        # the same admin port and silently take half of the calls.
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        service = AdminService(self._backend)
        admin_pb2_grpc.add_AdminServicer_to_server(service, server)  # type: ignore[no-untyped-call]
        self._health = health.aio.HealthServicer()
        for name in self._HEALTH_NAMES:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = format_endpoint(self.config.host, self.config.port)
        port = bind_port(add_port(server, tls), address, "the admin API", AdminConfigError)
        await server.start()
        self._server = server
        self.port = int(port)
        print(
            f"strata admin listening on {format_endpoint(self.config.host, self.port)}",
            flush=True,
        )
        return self.port

    async def set_ready(self, ready: bool) -> None:
        """Health reports SERVING while the gateway is ready (takes traffic), else NOT_SERVING."""
        if self._health is None:
            raise RuntimeError("admin server not started")
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._HEALTH_NAMES:
            await self._health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Health goes NOT_SERVING for good; in-flight calls get ``grace_s`` to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await server.stop(grace_s)
