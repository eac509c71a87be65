"""The store node as a real process on loopback, driven through KVStoreClient and raw frames."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvstore.blocks.format import BlockDType, encode_header
from kvstore.client.sync import KVStoreClient
from kvstore.errors import KVStoreCorruptError, KVStoreError, KVStoreUnavailable
from kvstore.transport.tcp import recv_bytes
from kvstore.wire.frame import FRAME_HEADER, Op, Status, pack_frame_header
from kvstore.wire.messages import SHM_LEASE
from kvstore.wire.types import PutStatus

pytestmark = pytest.mark.timeout(60)

KIB, MIB = 1024, 1024 * 1024
NodeFactory = Callable[..., Any]  # the start_node fixture (conftest.py)


def key(n: int) -> bytes:
    return n.to_bytes(16, "big")


def _pattern(n: int, nbytes: int) -> bytes:
    """Deterministic bytes with a prime period (a shifted or mixed-up copy cannot compare equal)."""
    seed = n.to_bytes(8, "little")
    unit = bytes((i * 131 + seed[i % 8]) % 256 for i in range(4093))  # prime period
    return (unit * (nbytes // len(unit) + 1))[:nbytes]


def raw_connection(endpoint: str) -> socket.socket:
    host, port = endpoint.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def read_frame(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """Return (opcode, status, count, payload) of the next frame."""
    _magic, _ver, opcode, status, _flags, _rid, count, length = FRAME_HEADER.unpack(
        recv_bytes(sock, FRAME_HEADER.size)
    )
    return opcode, status, count, recv_bytes(sock, length)


def assert_closed_by_peer(sock: socket.socket) -> None:
    with contextlib.suppress(ConnectionResetError):  # a reset is a close too
        assert sock.recv(1) == b""


@pytest.mark.parametrize("use_shm", [False, True], ids=["tcp", "shm"])
def test_all_operations_roundtrip(start_node: NodeFactory, use_shm: bool) -> None:
    node = start_node()
    with KVStoreClient(node.endpoint, use_shm=use_shm) as client:
        keys = [key(i) for i in range(5)]
        assert client.put(keys[0], b"block-0") is PutStatus.OK
        assert client.transport == ("shm" if use_shm else "tcp")
        assert client.put(keys[0], b"different") is PutStatus.EXISTS
        assert client.put_many([(keys[1], b"block-1"), (keys[2], b"block-2")]) == [
            PutStatus.OK,
            PutStatus.OK,
        ]
        assert client.get(keys[0]) == b"block-0"
        assert client.get(keys[4]) is None
        out = bytearray(16)
        assert client.get_into(keys[1], out) == 7 and out[:7] == b"block-1"
        assert client.get_into(keys[4], out) is None
        assert client.match_prefix(keys) == 3
        assert client.match_prefix([keys[3], *keys[:3]]) == 0
        assert client.match_prefix([]) == 0
        assert client.exists([keys[2], keys[3], keys[0]]) == [True, False, True]
        assert client.delete([keys[1], keys[3]]) == 1
        assert client.exists(keys[:3]) == [True, False, True]
        stats = client.stats()
        assert stats["num_blocks"] == 2
        assert stats["num_leases"] == 0  # every GET released its lease
        assert stats["num_writing"] == 0
        assert stats["puts"] == 3 and stats["puts_exists"] == 1 and stats["deletes"] == 1
        assert stats["num_connections"] == 1


@pytest.mark.parametrize("use_shm", [False, True], ids=["tcp", "shm"])
@pytest.mark.parametrize("nbytes", [256 * KIB, 2 * MIB], ids=["256KiB", "2MiB"])
def test_large_blocks_roundtrip_byte_exact(
    start_node: NodeFactory, nbytes: int, use_shm: bool
) -> None:
    node = start_node("--arena-size", "64MiB", "--prefault", "true")
    with KVStoreClient(node.endpoint, use_shm=use_shm) as client:
        blocks = {key(i): _pattern(i, nbytes) for i in range(8)}
        assert client.put(key(0), blocks[key(0)]) is PutStatus.OK
        rest = [(k, memoryview(v)) for k, v in blocks.items() if k != key(0)]
        assert set(client.put_many(rest)) == {PutStatus.OK}
        assert client.get(key(0)) == blocks[key(0)]
        outs = [bytearray(nbytes) for _ in blocks]
        assert client.get_many_into(list(blocks), outs) == [nbytes] * len(blocks)
        for out, expected in zip(outs, blocks.values(), strict=True):
            assert out == expected
        # A larger buffer is fine; a smaller one is refused and the connection stays usable.
        big = bytearray(nbytes + 100)
        assert client.get_into(key(3), big) == nbytes and big[:nbytes] == blocks[key(3)]
        with pytest.raises(KVStoreError):
            client.get_into(key(3), bytearray(nbytes - 1))
        assert client.get(key(5)) == blocks[key(5)]
        assert client.stats()["num_leases"] == 0


def test_key_lists_larger_than_one_frame_and_the_receive_buffer(start_node: NodeFactory) -> None:
    """70000 keys: 18 frames (17 of MAX_KEYS_PER_FRAME keys, each filling the node's receive
    buffer whole, and 368), answered as one list."""
    node = start_node()
    with KVStoreClient(node.endpoint) as client:
        present = {0, 1, 2, 40_000, 69_999}
        for i in present:
            assert client.put(key(i), b"x") is PutStatus.OK
        keys = [key(i) for i in range(70_000)]
        assert client.exists(keys) == [i in present for i in range(70_000)]
        assert client.match_prefix(keys) == 3
        assert client.delete(keys) == len(present)
        assert client.stats()["num_blocks"] == 0


def test_put_with_dtype_and_shape(start_node: NodeFactory) -> None:
    node = start_node()
    with KVStoreClient(node.endpoint) as client:
        tensor = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4)
        status = client.put(key(1), tensor.data, dtype=BlockDType.FLOAT16, shape=tensor.shape)
        assert status is PutStatus.OK
        out = np.zeros_like(tensor)
        assert client.get_into(key(1), out.data) == tensor.nbytes
        np.testing.assert_array_equal(out, tensor)
        with pytest.raises(ValueError):
            client.put(key(2), tensor.data, dtype=BlockDType.FLOAT16, shape=(5,))


@pytest.mark.parametrize("use_shm", [False, True], ids=["tcp", "shm"])
def test_error_mid_batch_keeps_stream_in_step_and_leaks_no_lease(
    start_node: NodeFactory, use_shm: bool
) -> None:
    node = start_node()
    with KVStoreClient(node.endpoint, use_shm=use_shm) as client:
        keys = [key(i) for i in range(10)]
        assert set(client.put_many([(k, _pattern(i, 8 * KIB)) for i, k in enumerate(keys)])) == {
            PutStatus.OK
        }
        outs = [bytearray(8 * KIB) for _ in keys]
        outs[3] = bytearray(KIB)  # too small: the batch fails at its fourth block
        with pytest.raises(KVStoreError, match="does not fit"):
            client.get_many_into(keys, outs)
        assert client.transport == ("shm" if use_shm else "tcp")
        _wait_for(lambda: client.stats()["num_leases"] == 0)  # RELEASE has no reply
        outs[3] = bytearray(8 * KIB)
        assert client.get_many_into(keys, outs) == [8 * KIB] * 10
        assert all(out == _pattern(i, 8 * KIB) for i, out in enumerate(outs))


def test_many_threads_share_one_client(start_node: NodeFactory) -> None:
    node = start_node()
    client = KVStoreClient(node.endpoint, use_shm=False)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(20):
                k, data = key(t * 1000 + i), _pattern(t * 1000 + i, 16 * KIB)
                assert client.put(k, data) is PutStatus.OK
                assert client.get(k) == data
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    assert errors == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE!" * 8,  # bad magic
        pack_frame_header(Op.GET, 1, 1, 1 << 40),  # absurd length
        pack_frame_header(Op.GET, 1, 2, 32) + bytes(32),  # GET with two keys
        FRAME_HEADER.pack(b"SKVP", 1, 99, 0, 0, 1, 0, 0),  # unknown opcode
        FRAME_HEADER.pack(b"SKVP", 7, Op.STATS, 0, 0, 1, 0, 0),  # unknown version
    ],
    ids=["magic", "length", "count", "opcode", "version"],
)
def test_malformed_frame_closes_only_that_connection(
    start_node: NodeFactory, garbage: bytes
) -> None:
    node = start_node()
    with KVStoreClient(node.endpoint) as good:
        assert good.put(key(1), b"keep") is PutStatus.OK
        bad = raw_connection(node.endpoint)
        bad.sendall(garbage)
        assert_closed_by_peer(bad)
        bad.close()
        assert good.get(key(1)) == b"keep"  # the other connection is untouched
        assert good.stats()["num_connections"] == 1
    assert "malformed frame" in node.log()


def test_bad_put_content_is_answered_and_connection_survives(start_node: NodeFactory) -> None:
    node = start_node("--max-block-size", "1MiB")
    sock = raw_connection(node.endpoint)
    payload = b"x" * 1000
    header = bytearray(encode_header(key(1), payload))
    header[32] ^= 0xFF  # wrong checksum
    sock.sendall(pack_frame_header(Op.PUT, 1, 1, 64 + 1000) + header + payload)
    assert read_frame(sock)[:2] == (Op.PUT, Status.CORRUPT)
    bad_magic = b"NOPE" + bytes(encode_header(key(2), payload))[4:]
    sock.sendall(pack_frame_header(Op.PUT, 2, 1, 64 + 1000) + bad_magic + payload)
    assert read_frame(sock)[:2] == (Op.PUT, Status.BAD_REQUEST)
    big = bytes(2 * MIB)
    sock.sendall(pack_frame_header(Op.PUT, 3, 1, 64 + len(big)) + encode_header(key(3), big) + big)
    assert read_frame(sock)[:2] == (Op.PUT, Status.TOO_LARGE)
    sock.sendall(pack_frame_header(Op.PUT, 4, 1, 64 + 1000) + encode_header(key(4), payload))
    sock.sendall(payload)
    assert read_frame(sock)[:2] == (Op.PUT, Status.OK)
    sock.close()
    with KVStoreClient(node.endpoint) as client:
        assert client.exists([key(1), key(2), key(3), key(4)]) == [False, False, False, True]
        stats = client.stats()
        assert stats["num_writing"] == 0 and stats["arena"]["used_bytes"] == 4096
        with pytest.raises(KVStoreError, match="max_block_bytes"):
            client.put(key(5), big)
        assert client.get(key(4)) == payload


def test_abandoned_put_is_revoked(start_node: NodeFactory) -> None:
    node = start_node("--put-timeout", "500ms")
    payload = bytes(100 * KIB)
    frame = pack_frame_header(Op.PUT, 1, 1, 64 + len(payload)) + encode_header(key(1), payload)
    with KVStoreClient(node.endpoint) as client:
        # Writer disconnects mid-payload.
        sock = raw_connection(node.endpoint)
        sock.sendall(frame + payload[: 50 * KIB])
        _wait_for(lambda: client.stats()["num_writing"] == 1)
        sock.close()
        _wait_for(lambda: client.stats()["num_writing"] == 0)
        assert client.stats()["puts_revoked"] == 1
        # Writer stalls mid-payload: the node aborts it after the put timeout.
        sock = raw_connection(node.endpoint)
        sock.sendall(frame + payload[: 50 * KIB])
        assert_closed_by_peer(sock)
        sock.close()
        stats = client.stats()
        assert (stats["num_writing"], stats["puts_revoked"], stats["arena"]["used_bytes"]) == (
            0,
            2,
            0,
        )
        assert client.get(key(1)) is None
        assert client.put(key(1), payload) is PutStatus.OK
    assert "abandoning it" in node.log()


def test_full_arena_evicts_lru_and_refuses_when_all_leased(start_node: NodeFactory) -> None:
    # 1 MiB arena of 4 KiB pages; a block of 256 KiB - 64 B payload + 64 B header is 64 pages,
    # so exactly four fit. One connection may pin the whole arena here (by default only a
    # quarter: test_kvstore_limits_process.py).
    node = start_node(
        "--arena-size", "1MiB", "--max-pinned-fraction", "1", "--max-pinned-per-connection", "1"
    )
    size = 256 * KIB - 64
    with KVStoreClient(node.endpoint, use_shm=False) as client:
        for i in range(4):
            assert client.put(key(i), _pattern(i, size)) is PutStatus.OK
        assert client.get(key(0)) is not None  # LRU order now 1, 2, 3, 0
        assert client.put(key(4), _pattern(4, size)) is PutStatus.OK
        assert client.exists([key(i) for i in range(5)]) == [True, False, True, True, True]
        assert client.match_prefix([key(2), key(3)]) == 2  # a lookup, not an access
        assert client.put(key(5), _pattern(5, size)) is PutStatus.OK  # evicts 2
        assert client.exists([key(i) for i in range(6)]) == [True, False, False, True, True, True]
        assert client.stats()["evictions"] == 2

        # Pin every block with shared-memory leases held open on a raw connection.
        holder = raw_connection(node.endpoint)
        lease_ids = []
        for i in (0, 3, 4, 5):
            holder.sendall(pack_frame_header(Op.GET_SHM, i, 1, 16) + key(i))
            opcode, status, _count, body = read_frame(holder)
            assert (opcode, status) == (Op.GET_SHM, Status.OK)
            lease_ids.append(SHM_LEASE.unpack(body)[0])
        assert client.put(key(6), _pattern(6, size)) is PutStatus.FULL
        assert client.exists([key(0), key(3), key(4), key(5), key(6)]) == [True] * 4 + [False]
        stats = client.stats()
        assert (stats["num_leases"], stats["puts_full"]) == (4, 1)

        # Releasing one lease (RELEASE has no reply) makes its block evictable again.
        holder.sendall(pack_frame_header(Op.RELEASE, 99, 1, 8) + struct.pack("<Q", lease_ids[1]))
        _wait_for(lambda: client.stats()["num_leases"] == 3)
        assert client.put(key(6), _pattern(6, size)) is PutStatus.OK
        assert client.exists([key(0), key(3), key(6)]) == [True, False, True]
        # Dropping the connection releases the rest.
        holder.close()
        _wait_for(lambda: client.stats()["num_leases"] == 0)
        # A block larger than the whole arena is refused, never an error.
        assert client.put(key(7), bytes(2 * MIB)) is PutStatus.FULL


def test_lease_protects_block_while_response_is_unsent(start_node: NodeFactory) -> None:
    """A GET response stuck in the socket keeps its block pinned: delete and eviction wait."""
    node = start_node("--arena-size", "32MiB", "--max-block-size", "16MiB")
    size = 8 * MIB - 64  # with its 64-byte header a block is exactly 2048 pages: four fit
    with KVStoreClient(node.endpoint, use_shm=False) as client:
        for i in range(4):
            assert client.put(key(i), _pattern(i, size)) is PutStatus.OK
        # A reader with a tiny receive window: 8 MiB cannot be handed to the kernel at once.
        slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
        host, port = node.endpoint.rsplit(":", 1)
        slow.connect((host, int(port)))
        slow.settimeout(10)
        slow.sendall(pack_frame_header(Op.GET, 7, 1, 16) + key(0))
        _wait_for(lambda: client.stats()["num_leases"] == 1)
        assert client.delete([key(0)]) == 1
        # Six more blocks cycle through the other three slots (six evictions); block 0's pages,
        # unlinked but pinned, are never reused.
        for i in range(4, 10):
            assert client.put(key(i), _pattern(i, size)) is PutStatus.OK
        assert client.exists([key(i) for i in range(10)]) == [False] * 7 + [True] * 3
        stats = client.stats()
        assert (stats["evictions"], stats["arena"]["free_bytes"]) == (6, 0)
        opcode, status, _count, body = read_frame(slow)
        slow.close()
        assert (opcode, status, len(body)) == (Op.GET, Status.OK, 64 + size)
        assert body[64:] == _pattern(0, size)
        _wait_for(lambda: client.stats()["num_leases"] == 0)
        assert client.stats()["arena"]["free_bytes"] == 8 * MIB


def test_killed_node_raises_unavailable(start_node: NodeFactory) -> None:
    node = start_node()
    client = KVStoreClient(node.endpoint, timeout_s=2.0)
    assert client.put(key(1), b"x") is PutStatus.OK
    node.stop(signal.SIGKILL)
    for call in (
        lambda: client.get(key(1)),
        lambda: client.get_into(key(1), bytearray(8)),
        lambda: client.put(key(2), b"y"),
        lambda: client.match_prefix([key(1)]),
        lambda: client.stats(),
    ):
        with pytest.raises(KVStoreUnavailable):
            call()
    client.close()
    with pytest.raises(KVStoreUnavailable):
        KVStoreClient(node.endpoint).exists([key(1)])


def test_client_reconnects_once_after_node_restart(start_node: NodeFactory) -> None:
    first = start_node("--prefault", "false")
    client = KVStoreClient(first.endpoint, use_shm=True)
    assert client.put(key(1), b"before") is PutStatus.OK
    assert client.transport == "shm"
    assert first.stop() == 0
    assert first.arena_files() == []
    second = start_node("--prefault", "false", port=first.port)
    # The old connection (and mapping) is stale; the client reconnects and remaps transparently.
    assert client.get(key(1)) is None
    assert client.put(key(2), b"after") is PutStatus.OK
    assert client.get_into(key(2), bytearray(8)) == 5
    assert client.transport == "shm"
    client.close()
    assert second.process.poll() is None


def test_sigint_stops_gracefully(start_node: NodeFactory) -> None:
    node = start_node()
    with KVStoreClient(node.endpoint) as client:
        client.put(key(1), b"x")
        assert len(node.arena_files()) == 1
        assert node.stop(signal.SIGINT) == 0
    assert node.arena_files() == []


def test_timeout_when_node_stops_answering(start_node: NodeFactory) -> None:
    node = start_node()
    client = KVStoreClient(node.endpoint, timeout_s=0.5, use_shm=False)
    assert client.put(key(1), b"x") is PutStatus.OK
    node.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(KVStoreUnavailable, match="no reply"):
            client.get(key(1))
        assert time.monotonic() - started < 3
    finally:
        node.process.send_signal(signal.SIGCONT)
    assert client.get(key(1)) == b"x"  # a new connection after the timeout
    client.close()


@pytest.mark.parametrize("use_shm", [False, True], ids=["tcp", "shm"])
def test_corrupt_block_detected_on_read(start_node: NodeFactory, use_shm: bool) -> None:
    """Flip a byte inside the node's arena (through its /dev/shm file): the client must notice,
    and the damaged copy is dropped (a refetch fails too, so the client deletes it)."""
    node = start_node("--prefault", "false")
    with KVStoreClient(node.endpoint, use_shm=use_shm) as client:
        payload = _pattern(1, 8 * KIB)
        assert client.put(key(1), payload) is PutStatus.OK
        (arena_file,) = node.arena_files()
        with open(f"/dev/shm/{arena_file}", "r+b") as f:
            f.seek(64 + 100)  # first block sits at offset 0: skip its 64-byte header
            original = f.read(1)
            f.seek(64 + 100)
            f.write(bytes([original[0] ^ 0xFF]))
        with pytest.raises(KVStoreCorruptError):
            client.get_into(key(1), bytearray(8 * KIB))
        assert client.corrupt_reads == 2  # fetched again, failed again ...
        assert client.get(key(1)) is None  # ... so the damaged copy was deleted: a miss now
        assert client.transport == ("shm" if use_shm else "tcp")
        stats = client.stats()  # the connection is still usable and no lease leaked
        assert (stats["num_blocks"], stats["num_leases"]) == (0, 0)
        assert client.put(key(1), payload) is PutStatus.OK  # and the block can be stored again
        assert client.get(key(1)) == payload


def _wait_for(condition: object, timeout_s: float = 5.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_a_tcp_reader_that_stops_reading_is_cut_off_after_the_lease_timeout(
    start_node: NodeFactory,
) -> None:
    """A GET reply waiting in the socket pins its block (the node writes a view of the arena); a
    reader that stops reading holds it only until ``--lease-timeout``."""
    node = start_node("--arena-size", "64MiB", "--lease-timeout", "500ms")
    nbytes = 32 * 1024 * 1024 - 64  # more than both sockets' buffers
    with KVStoreClient(node.endpoint, use_shm=False) as client:
        assert client.put(key(1), _pattern(1, 4096) * (nbytes // 4096) + bytes(nbytes % 4096)) is (
            PutStatus.OK
        )
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            stalled.connect(("127.0.0.1", node.port))
            stalled.sendall(pack_frame_header(Op.GET, 1, 1, 16) + key(1))
            _wait_for(lambda: client.stats()["num_leases"] == 1)
            assert client.delete([key(1)]) == 1  # out of the index, its space pinned
            _wait_for(lambda: client.stats()["num_leases"] == 0, 10.0)
            stats = client.stats()
            assert (stats["arena"]["used_bytes"], stats["transfers"]["lease_timeouts"]) == (0, 1)
