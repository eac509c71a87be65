"""Secret mode on a real store node's metadata service (docs/design/security.md §5.1): every RPC,
called without credentials, with a wrong key and by a role or member it does not allow, is refused
(UNAUTHENTICATED / PERMISSION_DENIED) and changes nothing; with the right credentials the node's
members, the gateway's view and a worker's membership work as before."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.blocks.tier import Tier
from kvstore.cluster.events import (
    SOURCE_GONE_SEQ,
    BlocksStored,
    SourceCleared,
    SourceSnapshot,
    encode_event,
    encode_snapshot,
)
from kvstore.cluster.membership import Membership
from kvstore.cluster.view import ClusterView
from kvstore.metadata import START, MemberKind, MetadataServiceError
from kvstore.metadata.messages import info_to_proto
from kvstore.metadata.remote import RemoteMetadataStore
from strata_common.credentials import Identity, load_or_create_cluster_key, rpc_authorization
from strata_common.grpc_auth import ClientAuth
from strata_proto import metadata_pb2
from tests.integration.kvstore.node_process import start_node_process

pytestmark = pytest.mark.timeout(120)

NodeFactory = Callable[..., Any]
SERVICE = "/strata.metadata.v1.Metadata/"
KEY_ID = (1 << 120).to_bytes(16, "big")
NODE, OTHER_NODE, WORKER = (
    Identity("store", "N"),
    Identity("store", "M"),
    Identity("worker", "W"),
)
GATEWAY = Identity("gateway", "127.0.0.1:8000")


def _event(source: str, seq: int = 1) -> bytes:
    return encode_event(BlocksStored(source, seq, Tier.HBM, (KEY_ID,)))


def _requests(node_info: dict[str, Any]) -> dict[str, Any]:
    """One request per RPC, each acting on member N (what a forger would aim at)."""
    m = metadata_pb2
    return {
        "Register": m.RegisterRequest(node_id="N", info=info_to_proto({"kind": "store"})),
        "Deregister": m.DeregisterRequest(node_id="N"),
        "Heartbeat": m.HeartbeatRequest(node_id="N", ttl_s=0.001),
        "Members": m.MembersRequest(),
        "Alive": m.AliveRequest(node_ids=["N"]),
        "RequestResync": m.RequestResyncRequest(node_id="N"),
        "TakeResync": m.TakeResyncRequest(node_id="N"),
        "Reap": m.ReapRequest(node_id="N", info=info_to_proto(node_info), messages=[_event("N")]),
        "Publish": m.PublishRequest(messages=[_event("N")]),
        "Read": m.ReadRequest(cursor=START, block_s=0.0, count=10),
    }


# The identity each RPC refuses (PERMISSION_DENIED) in the table of kvstore/cluster/access.py:
# member RPCs on N by the worker W (not itself) and by a gateway (not a member); follower RPCs
# by the worker; the reap's forged message also by the gateway and another node.
REFUSED: dict[str, list[tuple[Identity, str]]] = {
    **{
        rpc: [
            (WORKER, "node_id 'N' (a member acts as itself only)"),
            (GATEWAY, "only a member (role store or worker) may call it"),
            (OTHER_NODE, "node_id 'N' (a member acts as itself only)"),
        ]
        for rpc in ("Register", "Deregister", "Heartbeat", "TakeResync")
    },
    "Publish": [
        (WORKER, "a message of source 'N' (a member publishes as itself only)"),
        (GATEWAY, "only a member (role store or worker) may call it"),
        (OTHER_NODE, "a message of source 'N' (a member publishes as itself only)"),
    ],
    **{
        rpc: [(WORKER, "only roles gateway and store follow the cluster")]
        for rpc in ("Members", "Alive", "RequestResync", "Read")
    },
    "Reap": [
        (WORKER, "only roles gateway and store follow the cluster"),
        (GATEWAY, "a reap appends nothing but the reaped member's SourceCleared(GONE)"),
        (OTHER_NODE, "a reap appends nothing but the reaped member's SourceCleared(GONE)"),
    ],
}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    load_or_create_cluster_key(path)
    return path


def _node(start_node: NodeFactory, key_file: Path) -> Any:
    return start_node(
        "--metadata",
        "embedded",
        "--node-id",
        "N",
        "--heartbeat-interval",
        "0.2s",
        "--heartbeat-timeout",
        "30s",  # N stays alive through the test: a reap must fail for the policy's reason only
        "--reconcile-interval",
        "1h",
        "--prefault",
        "false",
        "--cluster-key-file",
        str(key_file),
    )


def _call(channel: grpc.Channel, rpc: str, request: Any, metadata: Any) -> Any:
    method = channel.unary_unary(
        SERVICE + rpc,
        request_serializer=type(request).SerializeToString,
        response_deserializer=lambda data: data,
    )
    return method(request, metadata=metadata, timeout=10)


def _another(rpc: str) -> str:
    """An RPC other than ``rpc``: its proof is no proof for ``rpc``."""
    return "Alive" if rpc == "Members" else "Members"


def _auth(key: bytes, identity: Identity, rpc: str) -> list[tuple[str, str]]:
    return [("authorization", rpc_authorization(key, identity, SERVICE + rpc, time.time()))]


def test_every_rpc_refuses_missing_wrong_and_unauthorised_credentials(
    start_node: NodeFactory, key_file: Path
) -> None:
    node = _node(start_node, key_file)
    key = bytes.fromhex(key_file.read_text())
    wrong_key = os.urandom(32)
    gateway = RemoteMetadataStore(
        node.metadata.removeprefix("strata://"), auth=ClientAuth(key, GATEWAY)
    )
    try:
        members_before = gateway.members()
        assert set(members_before) == {"N"}
        cursor, _ = gateway.read(START, 0.0, count=65536)
        gateway.request_resync("N")  # pending: a refused TakeResync must not consume it
        requests = _requests(members_before["N"])
        assert set(requests) == set(REFUSED)  # every RPC of the service
        with grpc.insecure_channel(node.metadata.removeprefix("strata://")) as channel:
            for rpc, request in requests.items():
                for metadata, reason in (
                    (None, "no credentials (metadata `authorization: Strata-HMAC ...`)"),
                    (_auth(wrong_key, NODE, rpc), "wrong credentials"),
                    (_auth(key, NODE, _another(rpc)), "wrong credentials"),
                ):
                    with pytest.raises(grpc.RpcError) as caught:
                        _call(channel, rpc, request, metadata)
                    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, rpc
                    assert caught.value.details() == (
                        f"{SERVICE}{rpc} needs cluster credentials: {reason}"
                    )
                for identity, reason in REFUSED[rpc]:
                    with pytest.raises(grpc.RpcError) as caught:
                        _call(channel, rpc, request, _auth(key, identity, rpc))
                    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED, rpc
                    assert (
                        caught.value.details()
                        == f"{identity} may not call {SERVICE}{rpc}: {reason}"
                    )
            # Health needs nothing.
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Nothing changed: N is registered as before and alive, the stream has nothing new, and
        # the resync request is still there for N itself.
        assert gateway.members() == members_before
        assert gateway.alive(["N"]) == {"N"}
        assert gateway.read(cursor, 0.0) == (cursor, [])
        node_store = RemoteMetadataStore(
            node.metadata.removeprefix("strata://"), auth=ClientAuth(key, NODE)
        )
        try:
            assert node_store.take_resync_request("N") is True
        finally:
            node_store.close()
    finally:
        gateway.close()
    assert "refused a call (PERMISSION_DENIED)" in node.log()


def test_right_credentials_work_and_a_worker_speaks_only_for_itself(
    start_node: NodeFactory, key_file: Path
) -> None:
    node = _node(start_node, key_file)
    key = bytes.fromhex(key_file.read_text())
    endpoint = node.metadata.removeprefix("strata://")
    worker = RemoteMetadataStore(endpoint, auth=ClientAuth(key, WORKER))
    view = ClusterView(
        RemoteMetadataStore(endpoint, auth=ClientAuth(key, GATEWAY)), poll_interval_s=0.05
    )
    try:
        membership = Membership(worker, "W", MemberKind.ENGINE, {"endpoint": "127.0.0.1:7001"})
        membership.register()  # heartbeat, register, take a stale resync request: all as W
        assert membership.beat(rejoin=True) is False
        worker.publish(
            [
                encode_event(SourceCleared("W", 0)),
                _event("W", 1),
                encode_snapshot(SourceSnapshot.of("W", 1, {Tier.HBM: [KEY_ID]})),
            ]
        )
        view.start()
        assert view.wait_for(
            lambda v: (
                v.live_engines() == {"W": "127.0.0.1:7001"}
                and v.live_nodes() == {"N": node.endpoint}
                and v.holders(KEY_ID) == [("W", Tier.HBM)]
            ),
            10.0,
        )
        # HBM events under another source id (the node's, here) are refused, as is a batch that
        # hides one among its own.
        for batch in ([_event("N")], [_event("W", 2), _event("N", 2)]):
            with pytest.raises(MetadataServiceError) as refused:
                worker.publish(batch)
            assert str(refused.value) == (
                f"metadata at {endpoint}: Publish: worker/W may not call {SERVICE}Publish: "
                "a message of source 'N' (a member publishes as itself only) (PERMISSION_DENIED)"
            )
        with pytest.raises(MetadataServiceError, match="kind 'store'"):
            worker.register("W", {"kind": "store", "endpoint": "127.0.0.1:7001"})
        with pytest.raises(MetadataServiceError, match="only roles gateway and store follow"):
            worker.read(START, 0.0)
        assert view.holders(KEY_ID) == [("W", Tier.HBM)]
        membership.deregister()
        # A reap by a follower with just the goodbye is allowed (W is registered no more, so it
        # reaps nothing).
        gone = encode_event(SourceCleared("W", SOURCE_GONE_SEQ))
        assert view._store.reap("W", {"kind": "engine"}, [gone]) is False
    finally:
        view.stop()
        view._store.close()
        worker.close()


def test_a_node_refuses_to_start_with_a_key_file_others_can_read(
    tmp_path: Path, key_file: Path
) -> None:
    key_file.chmod(0o644)
    with pytest.raises(RuntimeError, match=r"exited with 2[\s\S]*chmod 600"):
        start_node_process(
            tmp_path / "node.log",
            "--port",
            "0",
            "--arena-size",
            "8MiB",
            "--prefault",
            "false",
            "--cluster-key-file",
            str(key_file),
        )
