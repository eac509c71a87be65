"""The one-sided transport ops against a real store node process: batched leases, shared-memory
PUT (reserve, copy, commit), and the fallbacks to TCP."""

from __future__ import annotations

import mmap
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from kvstore.blocks.format import BLOCK_HEADER_BYTES, encode_header
from kvstore.client.sync import KVStoreClient
from kvstore.errors import KVStoreCorruptError
from kvstore.transport.base import SkippedTransport, TransportKind
from kvstore.transport.rdma import probe_rdma
from kvstore.transport.tcp import recv_bytes
from kvstore.wire import requests
from kvstore.wire.frame import FRAME_HEADER, Op, Status, pack_frame_header
from kvstore.wire.messages import (
    BATCH_ID,
    RESERVE_ITEM,
    LeaseBatchReply,
    RdmaEndpointInfo,
    ReserveBatchReply,
)
from kvstore.wire.types import PutStatus
from tests.integration.kvstore.conftest import NodeFactory, NodeProcess

KIB, MIB = 1024, 1024 * 1024
MIB_BLOCK = MIB - BLOCK_HEADER_BYTES  # header + payload fill exactly 1 MiB of arena


def key(n: int) -> bytes:
    return n.to_bytes(16, "big")


def pattern(n: int, nbytes: int) -> bytes:
    return (n.to_bytes(4, "little") * (nbytes // 4 + 1))[:nbytes]


def request(sock: socket.socket, op: Op, count: int, payload: bytes) -> tuple[int, int, bytes]:
    """Send one frame, return (status, count, payload) of its reply."""
    sock.sendall(pack_frame_header(op, 7, count, len(payload)) + payload)
    _magic, _v, opcode, status, _f, rid, count, length = FRAME_HEADER.unpack(
        recv_bytes(sock, FRAME_HEADER.size)
    )
    assert (opcode, rid) == (op, 7)
    return status, count, recv_bytes(sock, length)


def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@contextmanager
def arena_mapping(node: NodeProcess) -> Iterator[mmap.mmap]:
    (name,) = node.arena_files()
    with open(f"/dev/shm/{name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as mapping:
        yield mapping


def test_batched_lease_keeps_blocks_from_eviction_until_released(start_node: NodeFactory) -> None:
    node = start_node("--arena-size", "8MiB")
    keys = [key(i) for i in range(12)]
    with (
        KVStoreClient(node.endpoint, use_shm=False) as tcp,
        socket.create_connection(("127.0.0.1", node.port)) as raw,
    ):
        assert (
            tcp.put_many([(k, pattern(i, MIB_BLOCK)) for i, k in enumerate(keys[:8])])
            == [PutStatus.OK] * 8
        )
        # One round trip leases k0, k1 (and reports a miss for k11).
        status, count, body = request(raw, Op.LEASE_BATCH, 3, keys[0] + keys[1] + keys[11])
        assert (status, count) == (Status.OK, 3)
        reply = LeaseBatchReply.decode(body, 3)
        assert reply.tiers == bytes([1, 1, 0])
        assert [nbytes for _, nbytes in reply.spans] == [MIB, MIB, 0]
        with arena_mapping(node) as arena:  # the spans are where the blocks really are
            for i, (offset, nbytes) in enumerate(reply.spans[:2]):
                assert arena[offset + 8 : offset + 24] == keys[i]
                assert arena[offset + BLOCK_HEADER_BYTES : offset + nbytes] == pattern(i, MIB_BLOCK)
        for i in range(2, 8):  # k0, k1 are now the coldest blocks, but leased
            assert tcp.get(keys[i]) == pattern(i, MIB_BLOCK)
        assert tcp.stats()["num_leases"] == 2
        more = [(keys[8], pattern(8, MIB_BLOCK)), (keys[9], pattern(9, MIB_BLOCK))]
        assert tcp.put_many(more) == [PutStatus.OK, PutStatus.OK]
        assert tcp.exists(keys[:4]) == [True, True, False, False]  # k2, k3 evicted instead
        raw.sendall(pack_frame_header(Op.RELEASE_BATCH, 8, 1, 8) + BATCH_ID.pack(reply.batch_id))
        wait_for(lambda: tcp.stats()["num_leases"] == 0)  # RELEASE_BATCH has no reply
        assert tcp.put(keys[10], pattern(10, MIB_BLOCK)) is PutStatus.OK
        assert tcp.exists(keys[:2]) == [False, True]  # released: k0 is evicted first
        stats = tcp.stats()
        assert (stats["evictions"], stats["transfers"]["lease_batches"]) == (3, 1)
        assert stats["transfers"]["batch_leased_blocks"] == 2


def test_a_dead_client_leaves_no_batch_lease_or_reservation(start_node: NodeFactory) -> None:
    node = start_node()
    with KVStoreClient(node.endpoint, use_shm=False) as tcp:
        assert tcp.put(key(1), b"leased") is PutStatus.OK
        raw = socket.create_connection(("127.0.0.1", node.port))
        status, _, _ = request(raw, Op.LEASE_BATCH, 1, key(1))
        item = RESERVE_ITEM.pack(key(2), BLOCK_HEADER_BYTES + 8)
        status_reserve, _, body = request(raw, Op.RESERVE_BATCH, 1, item)
        assert (status, status_reserve) == (Status.OK, Status.OK)
        assert ReserveBatchReply.decode(body, 1).statuses == bytes([Status.OK])
        stats = tcp.stats()
        assert (stats["num_leases"], stats["num_writing"]) == (1, 1)
        raw.close()  # never released, never committed
        wait_for(lambda: tcp.stats()["num_leases"] == 0)
        stats = tcp.stats()
        assert (stats["num_writing"], stats["puts_revoked"]) == (0, 1)
        assert tcp.exists([key(1), key(2)]) == [True, False]


def test_shm_put_is_byte_exact(start_node: NodeFactory) -> None:
    node = start_node("--arena-size", "64MiB")
    sizes = [1, 4096 - BLOCK_HEADER_BYTES, 4096, 256 * KIB, MIB + 13]
    blocks = {key(i): os.urandom(n) for i, n in enumerate(sizes)}
    with (
        KVStoreClient(node.endpoint) as shm,
        KVStoreClient(node.endpoint, use_shm=False) as tcp,
    ):
        assert shm.put_many(list(blocks.items())) == [PutStatus.OK] * len(sizes)
        assert shm.transport == "shm"
        assert shm.put(key(0), b"other bytes") is PutStatus.EXISTS
        for k, data in blocks.items():
            assert tcp.get(k) == data
            assert shm.get(k) == data
        outs = [bytearray(n + 7) for n in sizes]
        assert shm.get_many_into(list(blocks), outs) == sizes
        assert [bytes(o[:n]) for o, n in zip(outs, sizes, strict=True)] == list(blocks.values())
        stats = tcp.stats()
        transfers = stats["transfers"]
        assert (transfers["reserve_batches"], transfers["reserved_blocks"]) == (2, 5)
        assert (transfers["committed_blocks"], transfers["corrupt_blocks"]) == (5, 0)
        assert (stats["puts"], stats["puts_exists"], stats["num_writing"]) == (5, 1, 0)
        assert stats["num_leases"] == 0


def test_shm_put_with_a_wrong_header_is_refused_and_wrong_payload_caught_on_read(
    start_node: NodeFactory,
) -> None:
    """COMMIT_BATCH checks the header a client wrote (valid, of the reserved key and size); a
    wrong payload is caught by every reader (a shared-memory client could change the bytes after
    any commit check anyway)."""
    node = start_node()
    payloads = {n: pattern(n, 10_000) for n in (3, 4, 5)}
    headers = {n: encode_header(key(n), payloads[n]) for n in (3, 4, 5)}
    with socket.create_connection(("127.0.0.1", node.port)) as raw:
        items = [RESERVE_ITEM.pack(key(n), BLOCK_HEADER_BYTES + 10_000) for n in (3, 4, 5)]
        status, _, body = request(raw, Op.RESERVE_BATCH, 3, b"".join(items))
        assert status == Status.OK
        reply = ReserveBatchReply.decode(body, 3)
        assert reply.statuses == bytes([Status.OK] * 3)
        with arena_mapping(node) as arena:
            first, *others = reply.offsets
            arena[first : first + BLOCK_HEADER_BYTES] = headers[4]  # another block's header
            for n, offset in zip((4, 5), others, strict=True):
                arena[offset : offset + BLOCK_HEADER_BYTES] = headers[n]
                end = offset + BLOCK_HEADER_BYTES + 10_000
                arena[offset + BLOCK_HEADER_BYTES : end] = bytes(10_000)  # the wrong payload
        status, count, statuses = request(raw, Op.COMMIT_BATCH, 1, BATCH_ID.pack(reply.batch_id))
        assert (status, count, statuses) == (
            Status.OK,
            3,
            bytes([Status.CORRUPT, Status.OK, Status.OK]),
        )
        # An unknown batch is refused; the connection keeps serving.
        status, count, _ = request(raw, Op.COMMIT_BATCH, 1, BATCH_ID.pack(reply.batch_id))
        assert (status, count) == (Status.BAD_REQUEST, 0)
    for n, use_shm in ((4, False), (5, True)):
        with KVStoreClient(node.endpoint, use_shm=use_shm) as client:
            assert client.exists([key(3), key(n)]) == [False, True]
            with pytest.raises(KVStoreCorruptError):
                client.get(key(n))
            assert client.transport == ("shm" if use_shm else "tcp")
            # The reader fetched it twice, then deleted the damaged block: a miss from now on.
            assert client.exists([key(n)]) == [False]
            assert client.put(key(n), payloads[n]) is PutStatus.OK
            assert client.get(key(n)) == payloads[n]
    with KVStoreClient(node.endpoint, use_shm=False) as tcp:
        stats = tcp.stats()
        assert (stats["num_writing"], stats["num_leases"], stats["puts_revoked"]) == (0, 0, 1)
        assert stats["transfers"]["corrupt_blocks"] == 1


def test_put_falls_back_to_tcp_when_the_node_will_not_reserve(start_node: NodeFactory) -> None:
    """An 8 MiB arena lets one connection reserve 2 MiB at once: a 4 MiB batch goes over TCP."""
    node = start_node("--arena-size", "8MiB")
    with KVStoreClient(node.endpoint) as client:
        items = [(key(i), pattern(i, MIB_BLOCK)) for i in range(4)]
        assert client.put_many(items) == [PutStatus.OK] * 4
        assert client.transport == "shm"
        assert client.put(key(4), pattern(4, MIB_BLOCK)) is PutStatus.OK  # 1 MiB: reserved
        stats = client.stats()
        transfers = stats["transfers"]
        assert (transfers["reserve_batches"], transfers["reserve_batches_refused"]) == (2, 1)
        assert (transfers["committed_blocks"], stats["puts"]) == (1, 5)
        for i in range(5):
            assert client.get(key(i)) == pattern(i, MIB_BLOCK)


def test_client_falls_back_to_tcp_when_the_arena_cannot_be_mapped(start_node: NodeFactory) -> None:
    node = start_node()
    (name,) = node.arena_files()
    hidden = f"/dev/shm/moved-{name}"
    os.rename(f"/dev/shm/{name}", hidden)  # the node keeps its mapping; nobody can open it
    try:
        with KVStoreClient(node.endpoint) as client:
            assert client.put(key(1), b"over tcp") is PutStatus.OK
            assert client.transport == "tcp"
            assert [s.kind for s in client.skipped_transports] == [
                TransportKind.SHM,
                TransportKind.RDMA,
            ]
            assert client.skipped_transports[0].reason.startswith("cannot open the arena file")
            assert client.skipped_transports[1] == SkippedTransport(
                TransportKind.RDMA, probe_rdma().reason
            )
            assert client.get(key(1)) == b"over tcp"
            assert client.get_many_into([key(1), key(2)], [bytearray(8), bytearray(8)]) == [
                8,
                None,
            ]
            transfers = client.stats()["transfers"]
            assert (transfers["lease_batches"], transfers["reserve_batches"]) == (0, 0)
    finally:
        os.rename(hidden, f"/dev/shm/{name}")


def test_rdma_connect_is_answered_with_the_reason(start_node: NodeFactory) -> None:
    """No RDMA device can exist here: the node says why, and the connection keeps serving."""
    probe = probe_rdma()
    assert not probe.available
    node = start_node()
    info = RdmaEndpointInfo(1, 2, 3, bytes(16), 5, 4096, 8192, 9)
    with socket.create_connection(("127.0.0.1", node.port)) as raw:
        status, _, reason = request(raw, Op.RDMA_CONNECT, 0, info.encode())
        assert (status, reason.decode()) == (Status.UNSUPPORTED, probe.reason)
        status, count, _ = request(raw, Op.DELETE, 1, key(1))
        assert (status, count) == (Status.OK, 0)


@pytest.mark.parametrize("op", [Op.LEASE_BATCH, Op.GET_SHM])
def test_a_lease_held_past_the_lease_timeout_closes_its_connection(
    start_node: NodeFactory, op: Op
) -> None:
    """A reader that hangs with a lease (never releases it, connection open) pins the block's
    space only until ``--lease-timeout``: then its connection is closed and the lease freed."""
    node = start_node("--lease-timeout", "500ms", "--put-timeout", "20s")
    with (
        KVStoreClient(node.endpoint, use_shm=False) as tcp,
        socket.create_connection(("127.0.0.1", node.port)) as raw,
        socket.create_connection(("127.0.0.1", node.port)) as released,
    ):
        assert tcp.put(key(1), pattern(1, 10_000)) is PutStatus.OK
        status, count, _ = request(raw, op, 1, key(1))
        assert (status, count) == (Status.OK, 1)
        # A reader that releases in time is not affected.
        status, _, body = request(released, Op.LEASE_BATCH, 1, key(1))
        assert status == Status.OK
        released.sendall(requests.release_batch(LeaseBatchReply.decode(body, 1).batch_id))
        assert tcp.delete([key(1)]) == 1  # out of the index; the hung lease pins its space
        assert tcp.stats()["num_leases"] == 1
        wait_for(lambda: tcp.stats()["num_leases"] == 0, 10.0)
        stats = tcp.stats()
        assert (stats["arena"]["used_bytes"], stats["transfers"]["lease_timeouts"]) == (0, 1)
        raw.settimeout(5)
        assert raw.recv(1) == b""  # the hung reader's connection was closed
        assert request(released, Op.EXISTS, 1, key(1))[1] == 1  # the other one still serves
