"""Cluster credentials on the store protocol (docs/design/security.md §4): a real node started
with ``--cluster-key-file`` answers every op of a connection that has not proved it holds the key
with UNAUTHENTICATED and closes it, before doing anything; a client with the key (sync, async,
shared memory) is served; a client with another key, or a node without the key, is refused by
the other side; an op the connection's role may not use is FORBIDDEN."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from kvstore.blocks.format import encode_header
from kvstore.client.aio import AsyncKVStoreClient
from kvstore.client.sync import KVStoreClient
from kvstore.errors import KVStoreAuthError
from kvstore.wire.frame import (
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    FrameHeader,
    Op,
    Status,
    pack_frame_header,
)
from kvstore.wire.hello import ClientHello
from kvstore.wire.messages import HELLO_PROOF_BYTES, RDMA_INFO, RESERVE_ITEM
from kvstore.wire.types import PutStatus
from strata_common.credentials import ClusterCredentials, Identity, load_or_create_cluster_key
from tests.integration.kvstore.node_process import NodeFactory

KEY_A = bytes(range(32))
BLOCK = 4096 - 64


def key(n: int) -> bytes:
    return (0xA117 << 112 | n).to_bytes(16, "big")


def data(n: int) -> bytes:
    return bytes((n + i) % 251 for i in range(BLOCK))


@pytest.fixture
def key_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "cluster.key"
    secret, _ = load_or_create_cluster_key(path)
    return path, secret


def worker(secret: bytes) -> ClusterCredentials:
    return ClusterCredentials(secret, Identity("worker", "w1"))


def _frame(op: Op) -> bytes:
    """A well-formed request of ``op`` (each op's count and payload length)."""
    k = key(99)
    payloads: dict[Op, tuple[int, bytes]] = {
        Op.PUT: (1, encode_header(k, data(99)) + data(99)),
        Op.GET: (1, k),
        Op.GET_SHM: (1, k),
        Op.MATCH_PREFIX: (1, k),
        Op.EXISTS: (1, k),
        Op.DELETE: (1, k),
        Op.LEASE_BATCH: (1, k),
        Op.STATS: (0, b""),
        Op.SHM_INFO: (0, b""),
        Op.RELEASE: (1, bytes(8)),
        Op.RELEASE_BATCH: (1, bytes(8)),
        Op.RESERVE_BATCH: (1, RESERVE_ITEM.pack(k, 4096)),
        Op.COMMIT_BATCH: (1, bytes(8)),
        Op.RDMA_CONNECT: (0, bytes(RDMA_INFO.size)),
        Op.HELLO_PROOF: (0, bytes(HELLO_PROOF_BYTES)),
    }
    count, payload = payloads[op]
    return pack_frame_header(op, 7, count, len(payload)) + payload


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize("op", [op for op in Op if op is not Op.HELLO], ids=lambda op: op.name)
def test_every_op_without_credentials_is_refused_before_anything(
    start_node: NodeFactory, key_file: tuple[Path, bytes], op: Op
) -> None:
    path, secret = key_file
    node = start_node("--cluster-key-file", str(path))
    host, port = node.endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(_frame(op) + _frame(Op.STATS))  # a second request is never answered
        reply = _read_all(sock)  # the node closes the connection
    assert len(reply) == FRAME_HEADER_BYTES, reply
    _magic, _v, got_op, status, _f, request_id, _count, length = FRAME_HEADER.unpack(reply)
    assert (got_op, status, request_id, length) == (op, Status.UNAUTHENTICATED, 7, 0)
    with KVStoreClient(node.endpoint, use_shm=False, credentials=worker(secret)) as client:
        assert client.exists([key(99)]) == [False]  # nothing was stored
        stats = client.stats()
        assert (stats["num_blocks"], stats["num_leases"], stats["num_writing"]) == (0, 0, 0)


def test_clients_with_the_key_are_served_and_others_refused(
    start_node: NodeFactory, key_file: tuple[Path, bytes]
) -> None:
    path, secret = key_file
    node = start_node("--cluster-key-file", str(path))
    blocks = [(key(n), data(n)) for n in range(8)]
    for use_shm in (False, True):
        with KVStoreClient(node.endpoint, use_shm=use_shm, credentials=worker(secret)) as client:
            assert client.put_many(blocks) == [PutStatus.EXISTS if use_shm else PutStatus.OK] * 8
            assert client.get(key(3)) == data(3)
            outs = [bytearray(BLOCK) for _ in blocks]
            assert client.get_many_into([k for k, _ in blocks], outs) == [BLOCK] * 8
            assert client.match_prefix([k for k, _ in blocks]) == 8

    async def aio() -> bytes | None:
        client = AsyncKVStoreClient(node.endpoint, credentials=worker(secret))
        try:
            return await client.get(key(5))
        finally:
            await client.close()

    assert asyncio.run(aio()) == data(5)
    # Without credentials, or with another key: refused, on both clients.
    for credentials in (None, worker(KEY_A)):
        with (
            KVStoreClient(node.endpoint, use_shm=False, credentials=credentials) as client,
            pytest.raises(KVStoreAuthError),
        ):
            client.get(key(3))

        async def refused(credentials: ClusterCredentials | None = credentials) -> None:
            client = AsyncKVStoreClient(node.endpoint, credentials=credentials)
            try:
                with pytest.raises(KVStoreAuthError):
                    await client.get(key(3))
            finally:
                await client.close()

        asyncio.run(refused())


def test_a_wrong_proof_is_refused_and_the_node_proves_itself(
    start_node: NodeFactory, key_file: tuple[Path, bytes]
) -> None:
    path, secret = key_file
    node = start_node("--cluster-key-file", str(path))
    host, port = node.endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        hello = ClientHello(worker(KEY_A))  # the wrong key
        sock.sendall(hello.request(1))
        head = sock.recv(FRAME_HEADER_BYTES, socket.MSG_WAITALL)
        _m, _v, op, status, _f, _rid, _count, length = FRAME_HEADER.unpack(head)
        assert (op, status, length) == (Op.HELLO, Status.OK, 48)
        body = sock.recv(length, socket.MSG_WAITALL)
        with pytest.raises(KVStoreAuthError, match="another cluster key"):
            hello.answer(FrameHeader.decode(head), body, 2)  # the node's proof fails here
        # Sending a made-up proof anyway, and another HELLO behind it in the same write:
        # UNAUTHENTICATED, closed, and nothing after the refusal is answered (no new challenge).
        another = ClientHello(worker(KEY_A)).request(3)
        sock.sendall(pack_frame_header(Op.HELLO_PROOF, 2, 0, 32) + os.urandom(32) + another)
        reply = _read_all(sock)
        assert len(reply) == FRAME_HEADER_BYTES, reply
        assert FRAME_HEADER.unpack(reply)[3] == Status.UNAUTHENTICATED
    # A keyed client refuses a node that holds no key (it could be anyone).
    keyless = start_node()
    with (
        KVStoreClient(keyless.endpoint, use_shm=False, credentials=worker(secret)) as client,
        pytest.raises(KVStoreAuthError, match="does not hold a cluster key"),
    ):
        client.stats()


def test_a_role_may_use_only_its_ops(start_node: NodeFactory, key_file: tuple[Path, bytes]) -> None:
    path, secret = key_file
    node = start_node("--cluster-key-file", str(path))
    gateway = ClusterCredentials(secret, Identity("gateway", "g1"))
    with KVStoreClient(node.endpoint, use_shm=False, credentials=gateway) as client:
        with pytest.raises(KVStoreAuthError, match="may not use PUT"):
            client.put(key(1), data(1))
        assert client.exists([key(1)]) == [False]  # the connection stays usable
        with pytest.raises(KVStoreAuthError, match="may not use GET"):
            client.get(key(1))
        assert client.stats()["num_blocks"] == 0


def test_a_node_with_an_unusable_key_file_does_not_start(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    loose = tmp_path / "loose.key"
    loose.write_text(KEY_A.hex())
    loose.chmod(0o644)
    with pytest.raises(RuntimeError, match="chmod 600"):
        start_node("--cluster-key-file", str(loose))
