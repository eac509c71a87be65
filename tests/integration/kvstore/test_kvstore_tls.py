"""TLS mode on a real store node (docs/design/security.md §3.1, §4.1, §5.1): its metadata service
and its store protocol refuse outsiders (no certificate, another CA's) at the handshake, so before
any RPC or op; every certificate of the cluster is judged by the same rules as in secret mode
(``kvstore.cluster.access``, ``kvstore.server.auth``); a store connection must still say HELLO,
naming its certificate's identity, before anything else; clients refuse a node that is not a store
node of their cluster."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvstore.client.aio import AsyncKVStoreClient
from kvstore.client.sync import KVStoreClient
from kvstore.cluster.membership import Membership
from kvstore.cluster.view import ClusterView
from kvstore.errors import KVStoreAuthError, KVStoreConnectionLost
from kvstore.metadata import START, MemberKind, MetadataServiceError
from kvstore.metadata.remote import RemoteMetadataStore
from kvstore.wire.frame import FRAME_HEADER, FRAME_HEADER_BYTES, Op, Status
from kvstore.wire.hello import ClientHello
from kvstore.wire.types import PutStatus
from strata_common.credentials import ClusterCredentials, Identity, load_or_create_cluster_key
from strata_common.grpc_auth import ClientAuth
from strata_common.tls import TlsConfig
from tests.integration.kvstore.node_args import cluster_args
from tests.integration.kvstore.node_process import NodeProcess
from tests.integration.kvstore.test_kvstore_auth import BLOCK, _frame, _read_all, data, key
from tests.integration.kvstore.test_kvstore_metadata_auth import REFUSED, SERVICE, _call, _requests
from tests.integration.kvstore.valkey_fixture import valkey_url
from tests.tls_certs import Cluster, outsiders

__all__ = ["valkey_url"]

pytestmark = pytest.mark.timeout(120)
NodeFactory = Any


def tls_args(tls: TlsConfig) -> list[str]:
    return ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    return Cluster(tmp_path / "ca")


def _node(start_node: NodeFactory, cluster: Cluster, *extra: str) -> NodeProcess:
    return start_node(  # type: ignore[no-any-return]
        "--metadata",
        "embedded",
        "--heartbeat-timeout",
        "30s",
        "--reconcile-interval",
        "1h",
        "--prefault",
        "false",
        *tls_args(cluster.tls("store/N")),  # its node id: N, its certificate's
        *extra,
    )


def test_the_metadata_service_refuses_outsiders_and_judges_members_by_certificate(
    start_node: NodeFactory, cluster: Cluster, tmp_path: Path
) -> None:
    node = _node(start_node, cluster)
    assert node.metadata is not None
    endpoint = node.metadata.removeprefix("strata://")
    gateway = RemoteMetadataStore(
        endpoint, auth=ClientAuth.from_tls(cluster.tls("gateway/g1"), "gateway")
    )
    try:
        members = gateway.members()
        assert set(members) == {"N"}
        requests = _requests(members["N"])
        for files in outsiders(cluster, tmp_path, "store/N").values():
            with grpc.secure_channel(endpoint, cluster.grpc_outsider(files)) as channel:
                for rpc, request in requests.items():
                    with pytest.raises(grpc.RpcError) as caught:
                        _call(channel, rpc, request, None)
                    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, rpc
        for rpc, request in requests.items():
            for identity, reason in REFUSED[rpc]:
                credentials = cluster.tls(str(identity)).grpc_channel_credentials()
                with (
                    grpc.secure_channel(endpoint, credentials) as channel,
                    pytest.raises(grpc.RpcError) as caught,
                ):
                    _call(channel, rpc, request, None)
                assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED, rpc
                assert caught.value.details() == f"{identity} may not call {SERVICE}{rpc}: {reason}"
        assert gateway.members() == members  # nothing changed
        # A worker of the cluster registers as itself, and may not read the stream.
        worker = RemoteMetadataStore(
            endpoint, auth=ClientAuth.from_tls(cluster.tls("worker/W"), "worker")
        )
        try:
            Membership(worker, "W", MemberKind.ENGINE, {"endpoint": "127.0.0.1:7001"}).register()
            with pytest.raises(MetadataServiceError, match="only roles gateway and store follow"):
                worker.read(START, 0.0)
        finally:
            worker.close()
        view = ClusterView(gateway, poll_interval_s=0.05)
        view.start()
        try:
            assert view.wait_for(lambda v: v.live_engines() == {"W": "127.0.0.1:7001"}, 10.0)
        finally:
            view.stop()
    finally:
        gateway.close()


# -- the store protocol (§4.1 in TLS mode) -----------------------------------------------------


def _tls_socket(node: NodeProcess, context: ssl.SSLContext) -> ssl.SSLSocket:
    host, port = node.endpoint.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10)
    return context.wrap_socket(raw, server_hostname=host)


def _refused_at_handshake(node: NodeProcess, context: ssl.SSLContext) -> None:
    """An outsider's TLS connection: the node refuses its certificate (TLS 1.3 tells the client
    at its first read) and answers no frame: its alert, or the connection closed."""
    reply = b"not refused"
    try:
        with _tls_socket(node, context) as sock:
            sock.sendall(_frame(Op.STATS))
            reply = _read_all(sock)  # b"": closed without an answer
    except (ssl.SSLError, ConnectionResetError):  # the alert
        reply = b""
    assert reply == b""


def test_every_op_is_refused_to_outsiders_and_before_hello(
    start_node: NodeFactory, cluster: Cluster, tmp_path: Path
) -> None:
    node = start_node(*tls_args(cluster.tls("store/n1")), "--prefault", "false")
    for files in outsiders(cluster, tmp_path, "worker/w1").values():
        _refused_at_handshake(node, cluster.ssl_outsider(files))
    member = cluster.ssl_outsider(cluster.files("worker/w1"))
    for op in [op for op in Op if op is not Op.HELLO]:
        with _tls_socket(node, member) as sock:  # a member of the cluster, but no HELLO yet
            sock.sendall(_frame(op) + _frame(Op.STATS))
            reply = _read_all(sock)
        assert len(reply) == FRAME_HEADER_BYTES, (op, reply)
        _magic, _v, got_op, status, _f, request_id, _count, length = FRAME_HEADER.unpack(reply)
        assert (got_op, status, request_id, length) == (op, Status.UNAUTHENTICATED, 7, 0)
    # HELLO must name the certificate's identity.
    with _tls_socket(node, member) as sock:
        credentials = ClusterCredentials(
            b"", Identity("worker", "w2"), tls=cluster.tls("worker/w2")
        )
        sock.sendall(ClientHello(credentials).request(1) + _frame(Op.STATS))
        reply = _read_all(sock)
    assert FRAME_HEADER.unpack(reply)[2:4] == (Op.HELLO, Status.UNAUTHENTICATED)
    worker = cluster.tls("worker/w1").credentials("worker")
    with KVStoreClient(node.endpoint, use_shm=False, credentials=worker) as client:
        stats = client.stats()
        assert (stats["num_blocks"], stats["num_leases"], stats["num_writing"]) == (0, 0, 0)


def test_members_are_served_by_role_and_outsiders_refused(
    start_node: NodeFactory, cluster: Cluster, tmp_path: Path
) -> None:
    node = start_node(*tls_args(cluster.tls("store/n1")), "--prefault", "false")
    worker = cluster.tls("worker/w1").credentials("worker")
    blocks = [(key(n), data(n)) for n in range(8)]
    for use_shm in (False, True):
        with KVStoreClient(node.endpoint, use_shm=use_shm, credentials=worker) as client:
            assert client.put_many(blocks) == [PutStatus.EXISTS if use_shm else PutStatus.OK] * 8
            assert client.get(key(3)) == data(3)
            outs = [bytearray(BLOCK) for _ in blocks]
            assert client.get_many_into([k for k, _ in blocks], outs) == [BLOCK] * 8
            assert client.match_prefix([k for k, _ in blocks]) == 8
            assert client.transport.value == ("shm" if use_shm else "tcp")

    async def aio(credentials: ClusterCredentials | None) -> bytes | None:
        client = AsyncKVStoreClient(node.endpoint, credentials=credentials)
        try:
            return await client.get(key(5))
        finally:
            await client.close()

    assert asyncio.run(aio(worker)) == data(5)
    gateway = cluster.tls("gateway/g1").credentials("gateway")
    with KVStoreClient(node.endpoint, use_shm=False, credentials=gateway) as client:
        with pytest.raises(KVStoreAuthError, match="may not use PUT"):
            client.put(key(1), data(1))
        assert client.exists([key(1)]) == [True]  # the connection stays usable
    # Another CA's worker certificate; a plaintext client; a secret-mode client: refused.
    stranger = Cluster(tmp_path / "other").tls("worker/w1").credentials("worker")
    for credentials in (stranger, None, ClusterCredentials(bytes(32), Identity("worker", "w1"))):
        with (
            KVStoreClient(node.endpoint, use_shm=False, credentials=credentials) as client,
            pytest.raises((KVStoreAuthError, KVStoreConnectionLost)),
        ):
            client.get(key(3))
        with pytest.raises((KVStoreAuthError, KVStoreConnectionLost)):
            asyncio.run(aio(credentials))


def test_a_client_refuses_a_node_that_is_not_a_store_of_its_cluster(
    start_node: NodeFactory, cluster: Cluster, tmp_path: Path
) -> None:
    worker = cluster.tls("worker/w1").credentials("worker")
    plaintext = start_node("--prefault", "false")
    with (
        KVStoreClient(plaintext.endpoint, use_shm=False, credentials=worker) as client,
        pytest.raises(KVStoreAuthError, match="TLS"),
    ):
        client.stats()
    other = Cluster(tmp_path / "other")
    fake = start_node(*tls_args(other.tls("store/n1")), "--prefault", "false")
    with (
        KVStoreClient(fake.endpoint, use_shm=False, credentials=worker) as client,
        pytest.raises(KVStoreAuthError, match="certificate verify failed"),
    ):
        client.stats()
    # A server whose certificate (of this CA) names a worker, not a store node.
    impostor = cluster.tls("worker/w9").server_context()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), impostor.wrap_socket(conn, server_side=True) as s:
                s.recv(1)

        thread = threading.Thread(target=accept)
        thread.start()
        with (
            KVStoreClient(f"127.0.0.1:{port}", use_shm=False, credentials=worker) as client,
            pytest.raises(KVStoreAuthError, match="worker/w9, not a store"),
        ):
            client.stats()
        thread.join(10)


def test_two_nodes_read_through_each_other_over_tls(
    start_node: NodeFactory, cluster: Cluster, valkey_url: str, tmp_path: Path
) -> None:
    """Peer reads (PeerFetcher) speak TLS to a TLS peer: a block put at node A is read through
    node B by GET and by a shared-memory LEASE_BATCH (found by review: the fetcher once sent a
    plaintext HELLO to a TLS listener, and read-through silently missed)."""
    key_file = tmp_path / "cluster.key"
    load_or_create_cluster_key(key_file)
    common = ["--cluster-key-file", str(key_file), "--prefault", "false"]
    node_a = start_node(*cluster_args(valkey_url, "A"), *common, *tls_args(cluster.tls("store/A")))
    node_b = start_node(*cluster_args(valkey_url, "B"), *common, *tls_args(cluster.tls("store/B")))
    worker = cluster.tls("worker/w1").credentials("worker")
    keys = [key(700 + i) for i in range(4)]
    with KVStoreClient(node_a.endpoint, use_shm=False, credentials=worker) as a:
        assert a.put_many([(k, data(i)) for i, k in enumerate(keys)]) == [PutStatus.OK] * 4
    with KVStoreClient(node_b.endpoint, use_shm=False, credentials=worker) as b:
        deadline = time.monotonic() + 10  # until B's index has A's blocks
        while b.match_prefix(keys) < len(keys):
            assert time.monotonic() < deadline, "B never learnt A's blocks"
            time.sleep(0.05)
        assert b.get(keys[0]) == data(0)
    with KVStoreClient(node_b.endpoint, credentials=worker) as shm:
        outs = [bytearray(len(data(i))) for i in range(1, 4)]
        assert shm.get_many_into(keys[1:], outs) == [len(o) for o in outs]
        assert [bytes(o) for o in outs] == [data(i) for i in range(1, 4)]
        assert shm.transport == "shm"
        assert shm.stats()["transfers"]["read_through_blocks"] == 4
