"""TLS mode on a real store node (docs/design/security.md §3.1, §5.1): its metadata service
refuses outsiders (no certificate, another CA's) at the handshake, so before any RPC, and every
certificate of the cluster is judged by the same policy as in secret mode
(``kvstore.cluster.access``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from kvstore.cluster.membership import Membership
from kvstore.cluster.view import ClusterView
from kvstore.metadata import START, MemberKind, MetadataServiceError
from kvstore.metadata.remote import RemoteMetadataStore
from strata_common.grpc_auth import ClientAuth
from strata_common.tls import TlsConfig
from tests.integration.kvstore.node_process import NodeProcess
from tests.integration.kvstore.test_kvstore_metadata_auth import REFUSED, SERVICE, _call, _requests
from tests.tls_certs import Cluster, outsiders

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
