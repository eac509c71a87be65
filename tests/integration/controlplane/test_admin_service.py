"""The admin gRPC service over real grpc.aio on loopback, in front of FakeAdminBackend (a test
double): every RPC, the token check, argument checks, unknown ids, conflicts, internal errors, and
the standard health service."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from controlplane.admin.config import AdminConfig, AdminConfigError
from controlplane.admin.server import AdminServer
from controlplane.instances.types import InstanceInfo, InstanceState, LauncherUnavailable
from controlplane.launch.kubernetes import KubernetesForbidden
from controlplane.workers.roles import WorkerRole
from strata_proto import admin_pb2, worker_pb2
from tests.integration.controlplane.admin_harness import (
    TOKEN,
    Admin,
    start_admin,
    stop_admin,
)
from tests.integration.controlplane.conftest import LoopThread
from tests.integration.controlplane.fake_admin_backend import FakeAdminBackend


@pytest.fixture
def admin(loop_thread: LoopThread) -> Iterator[Admin]:
    a = start_admin(loop_thread, AdminConfig(host="127.0.0.1", port=0, token=TOKEN))
    yield a
    stop_admin(a)


def _seed(admin: Admin) -> None:
    """Two instances added by hand: prefill-1 and decode-2."""
    admin.call("Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_PREFILL, endpoint="10.0.0.1:9001"))
    admin.call("Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_DECODE, endpoint="10.0.0.2:9002"))
    admin.backend.calls.clear()


# -- every RPC, authorized -------------------------------------------------------------------


def test_add_then_list(admin: Admin) -> None:
    reply = admin.call(
        "Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_DECODE, endpoint="[::1]:9100")
    )
    assert reply.instance == admin_pb2.Instance(
        id="decode-1",
        role=worker_pb2.ROLE_DECODE,
        state=admin_pb2.INSTANCE_STATE_STARTING,
        endpoint="[::1]:9100",
    )
    admin.call("Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_BOTH, endpoint="host-a:9101"))
    listed = admin.call("List", admin_pb2.ListRequest()).instances
    assert [(i.id, i.role, i.endpoint) for i in listed] == [
        ("both-2", worker_pb2.ROLE_BOTH, "host-a:9101"),
        ("decode-1", worker_pb2.ROLE_DECODE, "[::1]:9100"),
    ]  # ordered by id
    assert admin.backend.calls == [
        ("add_instance", (WorkerRole.DECODE, "[::1]:9100")),
        ("add_instance", (WorkerRole.BOTH, "host-a:9101")),
        ("list_instances", ()),
    ]


def test_list_carries_every_field(admin: Admin) -> None:
    admin.backend.instances["p-9"] = InstanceInfo(
        id="p-9",
        role=WorkerRole.PREFILL,
        state=InstanceState.DEAD,
        endpoint="127.0.0.1:9",
        model="tiny",
        block_size=128,
        capacity=8,
        in_flight=2,
        load=0.25,
        launched=True,
        detail="missed 3 heartbeats",
    )
    (msg,) = admin.call("List", admin_pb2.ListRequest()).instances
    assert msg == admin_pb2.Instance(
        id="p-9",
        role=worker_pb2.ROLE_PREFILL,
        state=admin_pb2.INSTANCE_STATE_DEAD,
        endpoint="127.0.0.1:9",
        model="tiny",
        block_size=128,
        capacity=8,
        in_flight=2,
        load=0.25,
        launched=True,
        detail="missed 3 heartbeats",
    )


def test_drain(admin: Admin) -> None:
    _seed(admin)
    reply = admin.call("Drain", admin_pb2.DrainRequest(id="decode-2"))
    assert (reply.instance.id, reply.instance.state) == (
        "decode-2",
        admin_pb2.INSTANCE_STATE_DRAINING,
    )
    assert admin.backend.calls == [("drain", ("decode-2",))]


def test_remove_with_and_without_wait(admin: Admin) -> None:
    _seed(admin)
    assert admin.call("Remove", admin_pb2.RemoveRequest(id="prefill-1", wait_s=2.5)) == (
        admin_pb2.RemoveResponse()
    )
    admin.call("Remove", admin_pb2.RemoveRequest(id="decode-2"))
    assert admin.backend.calls == [("remove", ("prefill-1", 2.5)), ("remove", ("decode-2", 30.0))]
    assert admin.backend.instances == {}


def test_scale_up_and_down(admin: Admin) -> None:
    reply = admin.call("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_DECODE, replicas=2))
    assert [(i.id, i.launched) for i in reply.instances] == [("decode-1", True), ("decode-2", True)]
    reply = admin.call("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_DECODE, replicas=1))
    assert [i.id for i in reply.instances] == ["decode-1"]
    reply = admin.call("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_DECODE, replicas=0))
    assert list(reply.instances) == []
    assert admin.backend.calls == [
        ("scale", (WorkerRole.DECODE, 2)),
        ("scale", (WorkerRole.DECODE, 1)),
        ("scale", (WorkerRole.DECODE, 0)),
    ]


def test_set_role(admin: Admin) -> None:
    _seed(admin)
    reply = admin.call(
        "SetRole", admin_pb2.SetRoleRequest(id="prefill-1", role=worker_pb2.ROLE_BOTH)
    )
    assert (reply.instance.id, reply.instance.role) == ("prefill-1", worker_pb2.ROLE_BOTH)
    assert admin.backend.calls == [("set_role", ("prefill-1", WorkerRole.BOTH))]


def test_set_policy(admin: Admin) -> None:
    reply = admin.call("SetPolicy", admin_pb2.SetPolicyRequest(name="prefix_aware"))
    assert reply.policy == "prefix_aware"
    assert admin.backend.policy == "prefix_aware"
    assert admin.backend.calls[0] == ("set_policy", ("prefix_aware",))


def test_stats(admin: Admin) -> None:
    _seed(admin)
    reply = admin.call("Stats", admin_pb2.StatsRequest())
    assert reply.policy == "slo_aware"
    assert [i.id for i in reply.instances] == ["decode-2", "prefill-1"]
    assert (reply.requests_total, reply.requests_rejected, reply.requests_failed_over) == (12, 3, 1)
    assert reply.HasField("predictor_ttft_mape") and reply.predictor_ttft_mape == 0.125
    assert not reply.HasField("predictor_tpot_mape")
    assert dict(reply.extra) == {"decisions_per_s": 250.0}


# -- authentication --------------------------------------------------------------------------

EVERY_RPC = [
    ("List", admin_pb2.ListRequest()),
    ("Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_DECODE, endpoint="127.0.0.1:9")),
    ("Drain", admin_pb2.DrainRequest(id="decode-1")),
    ("Remove", admin_pb2.RemoveRequest(id="decode-1")),
    ("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_DECODE, replicas=1)),
    ("SetRole", admin_pb2.SetRoleRequest(id="decode-1", role=worker_pb2.ROLE_PREFILL)),
    ("SetPolicy", admin_pb2.SetPolicyRequest(name="round_robin")),
    ("Stats", admin_pb2.StatsRequest()),
]
BAD_METADATA = {
    "missing": (),
    "wrong token": (("authorization", "Bearer wrong-token-0123456789abcdef"),),
    "token prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
    "no scheme": (("authorization", TOKEN),),
    "basic scheme": (("authorization", f"Basic {TOKEN}"),),
    "two headers": (("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer x")),
    "other header": (("x-token", TOKEN),),
}


@pytest.mark.parametrize(("method", "request_msg"), EVERY_RPC, ids=[m for m, _ in EVERY_RPC])
@pytest.mark.parametrize("metadata", BAD_METADATA.values(), ids=list(BAD_METADATA))
def test_every_rpc_refuses_a_missing_or_wrong_token(
    admin: Admin, method: str, request_msg: Any, metadata: Any
) -> None:
    err = admin.error(method, request_msg, metadata)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "admin token" in (err.details() or "")
    assert admin.backend.calls == []  # refused before the handler ran


def test_bearer_scheme_is_case_insensitive(admin: Admin) -> None:
    reply = admin.call("List", admin_pb2.ListRequest(), (("authorization", f"bearer {TOKEN}"),))
    assert list(reply.instances) == []


def test_loopback_server_without_auth_needs_no_token(loop_thread: LoopThread) -> None:
    a = start_admin(loop_thread, AdminConfig(host="127.0.0.1", port=0, allow_unauthenticated=True))
    try:
        assert list(a.call("List", admin_pb2.ListRequest(), metadata=()).instances) == []
    finally:
        stop_admin(a)


# -- bad arguments, unknown ids, conflicts, internal errors ----------------------------------

BAD_ARGUMENTS = [
    ("Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_UNSPECIFIED, endpoint="127.0.0.1:9")),
    ("Add", admin_pb2.AddRequest(role=99, endpoint="127.0.0.1:9")),
    ("Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_DECODE, endpoint="")),
    ("Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_DECODE, endpoint="127.0.0.1")),
    ("Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_DECODE, endpoint="127.0.0.1:0")),
    ("Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_DECODE, endpoint="127.0.0.1:65536")),
    ("Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_DECODE, endpoint="::1:9000")),
    ("Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_DECODE, endpoint="bad host:9000")),
    ("Drain", admin_pb2.DrainRequest(id="")),
    ("Drain", admin_pb2.DrainRequest(id="a b")),
    ("Remove", admin_pb2.RemoveRequest(id="")),
    ("Remove", admin_pb2.RemoveRequest(id="decode-1", wait_s=-1.0)),
    ("Remove", admin_pb2.RemoveRequest(id="decode-1", wait_s=math.inf)),
    ("Remove", admin_pb2.RemoveRequest(id="decode-1", wait_s=math.nan)),
    ("Remove", admin_pb2.RemoveRequest(id="decode-1", wait_s=3601.0)),
    ("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_DECODE, replicas=-1)),
    ("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_DECODE, replicas=65)),
    ("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_BOTH, replicas=1)),
    ("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_UNSPECIFIED, replicas=1)),
    ("SetRole", admin_pb2.SetRoleRequest(id="decode-1", role=worker_pb2.ROLE_UNSPECIFIED)),
    ("SetRole", admin_pb2.SetRoleRequest(id="", role=worker_pb2.ROLE_DECODE)),
    ("SetPolicy", admin_pb2.SetPolicyRequest(name="")),
    ("SetPolicy", admin_pb2.SetPolicyRequest(name="Round-Robin")),
]


@pytest.mark.parametrize(
    ("method", "request_msg"),
    BAD_ARGUMENTS,
    ids=[f"{m}-{i}" for i, (m, _) in enumerate(BAD_ARGUMENTS)],
)
def test_bad_arguments_are_refused_before_the_backend(
    admin: Admin, method: str, request_msg: Any
) -> None:
    err = admin.error(method, request_msg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert admin.backend.calls == []


def test_unknown_policy_is_invalid_argument_from_the_backend(admin: Admin) -> None:
    err = admin.error("SetPolicy", admin_pb2.SetPolicyRequest(name="fastest"))
    assert (err.code(), err.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown policy 'fastest'",
    )
    assert admin.backend.policy == "slo_aware"


@pytest.mark.parametrize(
    ("method", "request_msg"),
    [
        ("Drain", admin_pb2.DrainRequest(id="decode-77")),
        ("Remove", admin_pb2.RemoveRequest(id="decode-77")),
        ("SetRole", admin_pb2.SetRoleRequest(id="decode-77", role=worker_pb2.ROLE_PREFILL)),
    ],
    ids=["Drain", "Remove", "SetRole"],
)
def test_unknown_ids_are_not_found(admin: Admin, method: str, request_msg: Any) -> None:
    _seed(admin)
    err = admin.error(method, request_msg)
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "no instance 'decode-77'")


def test_adding_a_known_endpoint_is_already_exists(admin: Admin) -> None:
    _seed(admin)
    err = admin.error(
        "Add", admin_pb2.AddRequest(role=worker_pb2.ROLE_DECODE, endpoint="10.0.0.2:9002")
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(admin.backend.instances) == 2


def test_conflicts_elsewhere_are_failed_precondition(admin: Admin) -> None:
    _seed(admin)  # decode-2 was added by hand: scaling decode to 0 would have to stop it
    err = admin.error("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_DECODE, replicas=0))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "decode-2" in admin.backend.instances


def test_a_dry_run_launchers_planned_writes_reach_the_reply(admin: Admin) -> None:
    _seed(admin)
    admin.backend.planned_writes = ["PUT /apis/apps/v1/namespaces/s/deployments/d/scale {}"]
    reply = admin.call("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_DECODE, replicas=1))
    assert list(reply.planned) == admin.backend.planned_writes
    reply = admin.call(
        "SetRole", admin_pb2.SetRoleRequest(id="prefill-1", role=worker_pb2.ROLE_BOTH)
    )
    assert list(reply.planned) == admin.backend.planned_writes


def test_launcher_errors_are_failed_precondition_or_unavailable(admin: Admin) -> None:
    admin.backend.fail_with = KubernetesForbidden("Kubernetes RBAC forbids x to update y")
    err = admin.error("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_DECODE, replicas=1))
    assert (err.code(), err.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "Kubernetes RBAC forbids x to update y",
    )
    admin.backend.fail_with = LauncherUnavailable("Kubernetes API: update failed: 500 boom")
    err = admin.error("Scale", admin_pb2.ScaleRequest(role=worker_pb2.ROLE_DECODE, replicas=1))
    assert (err.code(), err.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "Kubernetes API: update failed: 500 boom",
    )


def test_an_unexpected_backend_error_is_internal_and_the_service_keeps_serving(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    admin.backend.fail_with = RuntimeError("registry exploded")
    err = admin.error("List", admin_pb2.ListRequest())
    assert (err.code(), err.details()) == (
        grpc.StatusCode.INTERNAL,
        "List failed; see the gateway log",
    )
    assert "registry exploded" not in (err.details() or "")  # internals stay in the log
    assert any("admin: List failed" in r.getMessage() for r in caplog.records)
    assert list(admin.call("List", admin_pb2.ListRequest()).instances) == []


# -- health and the server's lifecycle -------------------------------------------------------


def test_health_is_not_serving_until_ready_and_needs_no_token(admin: Admin) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert admin.health("") == not_serving
    assert admin.health("strata.admin.v1.Admin") == not_serving
    admin.loop.run(admin.server.set_ready(True))
    assert admin.health("") == serving
    assert admin.health("strata.admin.v1.Admin") == serving
    admin.loop.run(admin.server.set_ready(False))
    assert admin.health("") == not_serving


def test_health_of_an_unknown_service_is_not_found(admin: Admin) -> None:
    with pytest.raises(grpc.RpcError) as info:
        admin.health("strata.v1.Nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_port_in_use_is_a_clear_error(loop_thread: LoopThread) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = AdminServer(
            AdminConfig(host="127.0.0.1", port=port, token=TOKEN), FakeAdminBackend()
        )
        with pytest.raises(
            AdminConfigError, match=f"cannot bind the admin API to 127.0.0.1:{port}"
        ):
            loop_thread.run(server.start())
