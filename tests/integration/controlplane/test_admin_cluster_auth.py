"""The admin service accepts its token or a caller of role ``admin`` (docs/design/security.md
§5.1): by TLS certificate in TLS mode (mutual TLS: outsiders fail the handshake, other roles get
PERMISSION_DENIED), or by the cluster key's proof in secret mode; refusals come before any
handler."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from controlplane.admin.config import AdminConfig, AdminConfigError
from controlplane.admin.server import AdminServer
from strata_common.credentials import Identity, load_or_create_cluster_key, rpc_authorization
from strata_proto import admin_pb2, admin_pb2_grpc
from tests.integration.controlplane.admin_harness import AUTH, TOKEN
from tests.integration.controlplane.conftest import LoopThread
from tests.integration.controlplane.fake_admin_backend import FakeAdminBackend
from tests.integration.controlplane.test_admin_cli import strata_admin
from tests.tls_certs import Cluster, outsiders

pytestmark = pytest.mark.timeout(120)

LIST = "/strata.admin.v1.Admin/List"


def _serve(loop: LoopThread, config: AdminConfig) -> tuple[AdminServer, FakeAdminBackend, int]:
    backend = FakeAdminBackend()
    server = AdminServer(config, backend)
    return server, backend, loop.run(server.start())


def _list(channel: grpc.Channel, metadata: object = ()) -> object:
    stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
    return stub.List(admin_pb2.ListRequest(), metadata=metadata, timeout=10)


def _code(channel: grpc.Channel, metadata: object = ()) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        _list(channel, metadata)
    return caught.value.code(), caught.value.details() or ""  # type: ignore[attr-defined]


def test_tls_mode_lets_role_admin_or_the_token_in(loop_thread: LoopThread, tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "ca")
    config = AdminConfig(host="127.0.0.1", port=0, token=TOKEN, tls=cluster.tls("gateway/g1"))
    server, backend, port = _serve(loop_thread, config)
    address = f"127.0.0.1:{port}"
    try:
        for files in outsiders(cluster, tmp_path, "admin/alice").values():
            with grpc.secure_channel(address, cluster.grpc_outsider(files)) as channel:
                assert _code(channel, AUTH)[0] is grpc.StatusCode.UNAVAILABLE  # even with token
        with grpc.secure_channel(
            address, cluster.tls("admin/alice").grpc_channel_credentials()
        ) as c:
            _list(c)  # role admin: no token needed
        with grpc.secure_channel(address, cluster.tls("worker/w1").grpc_channel_credentials()) as c:
            code, details = _code(c)
            assert code is grpc.StatusCode.PERMISSION_DENIED
            assert details == f"worker/w1 may not call {LIST}: only role admin may call it"
            assert _code(c, (("authorization", "Bearer wrong-token-0123456789"),))[0] is (
                grpc.StatusCode.UNAUTHENTICATED
            )
            _list(c, AUTH)  # a cluster member with the token
        assert backend.calls == [("list_instances", ()), ("list_instances", ())]
    finally:
        loop_thread.run(server.stop(grace_s=1.0))


def test_secret_mode_lets_an_admin_proof_or_the_token_in(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    key, _ = load_or_create_cluster_key(tmp_path / "cluster.key")
    config = AdminConfig(host="127.0.0.1", port=0, cluster_key=key)  # no token at all
    server, backend, port = _serve(loop_thread, config)

    def proof(identity: Identity, k: bytes = key) -> object:
        return (("authorization", rpc_authorization(k, identity, LIST, time.time())),)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _list(channel, proof(Identity("admin", "alice")))
            code, details = _code(channel, proof(Identity("gateway", "g1")))
            assert (code, details) == (
                grpc.StatusCode.PERMISSION_DENIED,
                f"gateway/g1 may not call {LIST}: only role admin may call it",
            )
            code, details = _code(channel, proof(Identity("admin", "alice"), bytes(32)))
            assert (code, details) == (
                grpc.StatusCode.UNAUTHENTICATED,
                f"{LIST} needs cluster credentials: wrong credentials",
            )
            assert _code(channel)[0] is grpc.StatusCode.UNAUTHENTICATED
            assert _code(channel, AUTH)[0] is grpc.StatusCode.UNAUTHENTICATED  # no token set
        assert backend.calls == [("list_instances", ())]
    finally:
        loop_thread.run(server.stop(grace_s=1.0))


def test_without_a_token_cluster_credentials_stand_in_only_on_their_own(tmp_path: Path) -> None:
    key, _ = load_or_create_cluster_key(tmp_path / "cluster.key")
    with pytest.raises(AdminConfigError, match="choose one"):
        AdminConfig(host="127.0.0.1", cluster_key=key, allow_unauthenticated=True)
    with pytest.raises(AdminConfigError, match="or give cluster credentials"):
        AdminConfig(host="10.0.0.1")
    assert AdminConfig(host="10.0.0.1", cluster_key=key).has_cluster_auth


@pytest.mark.timeout(300)  # four `strata admin` processes: slow to start on a loaded machine
def test_strata_admin_calls_with_a_certificate_or_the_cluster_key(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    cluster = Cluster(tmp_path / "ca")
    tls = AdminConfig(host="127.0.0.1", port=0, tls=cluster.tls("gateway/g1"))
    server, _, port = _serve(loop_thread, tls)
    try:
        alice = cluster.tls("admin/alice")
        files = ["--tls-cert", str(alice.cert), "--tls-key", str(alice.key)]
        r = strata_admin(
            f"localhost:{port}", *files, "--tls-ca", str(cluster.ca), "list", token=None
        )
        assert (r.code, r.err) == (0, "")
        r = strata_admin(f"localhost:{port}", "--timeout", "20", "list", token=None)
        assert r.code == 6  # plaintext: the handshake fails
    finally:
        loop_thread.run(server.stop(grace_s=1.0))
    key_file = tmp_path / "cluster.key"
    key, _ = load_or_create_cluster_key(key_file)
    server, _, port = _serve(loop_thread, AdminConfig(host="127.0.0.1", port=0, cluster_key=key))
    try:
        args = ("--cluster-key-file", str(key_file), "--name", "bob", "list")
        assert strata_admin(f"127.0.0.1:{port}", *args, token=None).code == 0
        r = strata_admin(f"127.0.0.1:{port}", *args, token="not-the-token-0123456789")
        assert r.code == 3  # an explicit token alone decides
    finally:
        loop_thread.run(server.stop(grace_s=1.0))
