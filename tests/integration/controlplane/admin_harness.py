"""A real AdminServer on a loopback port in the shared event-loop thread, in front of
FakeAdminBackend (a test double), with a synchronous gRPC client (test code only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.admin.config import AdminConfig
from controlplane.admin.server import AdminServer
from strata_proto import admin_pb2_grpc
from tests.integration.controlplane.conftest import LoopThread
from tests.integration.controlplane.fake_admin_backend import FakeAdminBackend

TOKEN = "test-admin-token-0123456789abcdef"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@dataclass
class Admin:
    backend: FakeAdminBackend
    server: AdminServer
    channel: grpc.Channel
    stub: Any
    loop: LoopThread

    def call(self, method: str, request: Any, metadata: Any = AUTH) -> Any:
        return getattr(self.stub, method)(request, metadata=metadata, timeout=10)

    def error(self, method: str, request: Any, metadata: Any = AUTH) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            self.call(method, request, metadata)
        return info.value

    def health(self, service: str = "") -> Any:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def start_admin(loop: LoopThread, config: AdminConfig) -> Admin:
    backend = FakeAdminBackend()
    server = AdminServer(config, backend)
    port = loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Admin(backend, server, channel, admin_pb2_grpc.AdminStub(channel), loop)


def stop_admin(admin: Admin) -> None:
    admin.channel.close()
    admin.loop.run(admin.server.stop(grace_s=1.0))
