"""A real store node process held to its limits (kvstore.server.limits): connections, header and
idle timeouts, frame sizes, pinned arena space, the rate-limited log.

Every time bound is derived from the node's configuration (the timeout, plus the reaper's period,
plus a slack for a loaded machine); no pass criterion depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.blocks.format import BLOCK_HEADER_BYTES, encode_header
from kvstore.client.aio import AsyncKVStoreClient
from kvstore.client.sync import KVStoreClient
from kvstore.server.limits import MAX_OPEN_PUT_BATCHES
from kvstore.transport.base import TransportKind
from kvstore.transport.tcp import recv_bytes
from kvstore.wire.frame import (
    FRAME_HEADER,
    MAX_BATCH_ITEMS,
    MAX_KEYS_PER_FRAME,
    Op,
    Status,
    pack_frame_header,
)
from kvstore.wire.messages import LEASE_DEFERRED, LEASE_REFUSED, RESERVE_ITEM, LeaseBatchReply
from kvstore.wire.types import PutStatus
from strata_common.credentials import ClusterCredentials, Identity, load_or_create_cluster_key
from tests.integration.kvstore.conftest import NodeFactory, NodeProcess

pytestmark = pytest.mark.timeout(120)

KIB, MIB = 1024, 1024 * 1024
SLACK_S = 5.0
"""Added to every bound: the machine is shared with other test runs."""


def key(n: int) -> bytes:
    return n.to_bytes(16, "big")


def reaper_period_s(*timeouts_s: float) -> float:
    return min(1.0, min(timeouts_s) / 4)  # kvstore.server.limits.Deadlines.reaper_period_s


def rss_bytes(node: NodeProcess) -> int:
    with open(f"/proc/{node.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connect(node: NodeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=30)


def closed_within(sock: socket.socket, bound_s: float) -> float:
    """The (monotonic) time the node closed ``sock``, waiting for it at most ``bound_s``."""
    sock.settimeout(bound_s)
    with contextlib.suppress(ConnectionResetError):  # a reset is a close too
        while sock.recv(65536):
            pass
    return time.monotonic()


def wait_for(condition: Callable[[], Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def stats(node: NodeProcess) -> dict[str, Any]:
    with KVStoreClient(node.endpoint, transports=(TransportKind.TCP,)) as client:
        return client.stats()


@contextlib.contextmanager
def sockets(node: NodeProcess, n: int) -> Iterator[list[socket.socket]]:
    socks = [connect(node) for _ in range(n)]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


ATTACKS = {
    # The issue's: a 24-byte header claiming a 64 MiB payload of the retired METADATA op (10).
    "metadata-64MiB": FRAME_HEADER.pack(b"SKVP", 1, 10, 0, 0, 1, 0, 64 * MIB),
    "get-64MiB": pack_frame_header(Op.GET, 1, 1, 64 * MIB),
    "release-512KiB": pack_frame_header(Op.RELEASE, 1, 65536, 512 * KIB),
    # Well-formed headers whose payload never comes: the largest non-PUT frame, and a PUT.
    "exists-64KiB": pack_frame_header(Op.EXISTS, 1, MAX_KEYS_PER_FRAME, 64 * KIB),
    "put-64MiB": pack_frame_header(Op.PUT, 1, 1, 64 * MIB),
    "half-a-header": pack_frame_header(Op.STATS, 1, 0, 0)[:12],
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_six_connections_claiming_huge_payloads_cost_no_memory_and_are_closed(
    start_node: NodeFactory, attack: str
) -> None:
    """Issue 11: six connections each sending a header that claims a 64 MiB METADATA payload took
    a node from 44 to 429 MB and were never closed. Now: RSS grows by at most 16 MiB, and every
    such connection is closed -- a malformed header at once, a frame that never completes within
    the header timeout."""
    header_timeout_s = 1.0
    node = start_node("--header-timeout", f"{header_timeout_s}s")
    stats(node)  # warm: the node has served a connection
    before = rss_bytes(node)
    with sockets(node, 6) as socks:
        sent = []
        for sock in socks:
            sock.sendall(ATTACKS[attack])
            sent.append(time.monotonic())
        grown = rss_bytes(node) - before
        bound_s = header_timeout_s + reaper_period_s(header_timeout_s, 20.0) + SLACK_S
        waited = [closed_within(sock, bound_s) - t for sock, t in zip(socks, sent, strict=True)]
        grown = max(grown, rss_bytes(node) - before)
    assert grown <= 16 * MIB, f"RSS grew by {grown / MIB:.1f} MiB"
    assert max(waited) < bound_s
    counters = stats(node)["limits"]
    assert counters["malformed_frames"] + counters["header_timeouts"] == 6, counters
    if attack in ("exists-64KiB", "put-64MiB", "half-a-header"):
        assert counters["header_timeouts"] == 6  # not before the timeout ...
        assert min(waited) >= header_timeout_s * 0.9  # ... (a bound from the config, not speed)
    log = node.log()
    assert log.count("closing connection") == 1, log  # one line per kind per 10 s


def test_a_frame_dripped_byte_by_byte_is_closed_at_the_header_timeout(
    start_node: NodeFactory,
) -> None:
    """Traffic does not extend the header timeout: a frame must be complete within it."""
    header_timeout_s = 1.0
    node = start_node("--header-timeout", f"{header_timeout_s}s")
    frame = pack_frame_header(Op.EXISTS, 1, 64, 64 * 16) + bytes(64 * 16)
    with connect(node) as sock:
        start = time.monotonic()
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < len(frame) and time.monotonic() - start < header_timeout_s + SLACK_S:
                sock.sendall(frame[sent : sent + 1])
                sent += 1
                time.sleep(0.1)
        assert sent < len(frame)
        closed_within(sock, SLACK_S)
    assert stats(node)["limits"]["header_timeouts"] == 1


def test_connections_beyond_the_maximum_are_closed_and_idle_ones_reaped(
    start_node: NodeFactory,
) -> None:
    """400 idle connections were accepted and kept. Now at most --max-connections are open; one
    more is closed at once; idle ones are closed after --idle-timeout, and a client whose
    pooled connection was closed that way just reconnects."""
    idle_timeout_s = 2.0
    node = start_node("--max-connections", "8", "--idle-timeout", f"{idle_timeout_s}s")
    with KVStoreClient(node.endpoint, transports=(TransportKind.TCP,)) as client:
        assert client.put(key(1), b"kept") is PutStatus.OK
        with sockets(node, 7) as idle:
            with connect(node) as extra:
                closed_within(extra, SLACK_S)  # the ninth: closed on accept
            bound_s = idle_timeout_s + reaper_period_s(idle_timeout_s) + SLACK_S
            opened = time.monotonic()
            waited = [closed_within(sock, bound_s) - opened for sock in idle]
        assert max(waited) < bound_s
        assert client.get(key(1)) == b"kept"  # its connection was idle too: reconnected
        counters = client.stats()["limits"]
    assert (counters["connections_refused"], counters["idle_closed"]) == (1, 8)
    assert node.log().count("refusing connection") == 1


@pytest.mark.parametrize("kind", ["sync-tcp", "sync-shm", "async"])
def test_clients_reconnect_transparently_after_the_idle_timeout(
    start_node: NodeFactory, kind: str
) -> None:
    idle_timeout_s = 0.5
    node = start_node("--idle-timeout", f"{idle_timeout_s}s")
    rounds = 3

    def idle_closed() -> int:
        return int(stats(node)["limits"]["idle_closed"])

    if kind == "async":

        async def run() -> list[bytes | None]:
            got: list[bytes | None] = []
            async with AsyncKVStoreClient(node.endpoint) as client:
                for i in range(rounds):
                    assert await client.put(key(i), b"v%d" % i) is PutStatus.OK
                    closed = idle_closed()
                    while idle_closed() == closed:  # this client's connection, at least
                        await asyncio.sleep(0.05)
                    got.append(await client.get(key(i)))
            return got

        assert asyncio.run(asyncio.wait_for(run(), 60)) == [b"v%d" % i for i in range(rounds)]
        return
    transports = (TransportKind.SHM,) if kind == "sync-shm" else (TransportKind.TCP,)
    with KVStoreClient(node.endpoint, transports=transports) as sync:
        for i in range(rounds):
            assert sync.put(key(i), b"v%d" % i) is PutStatus.OK
            closed = idle_closed()
            wait_for(lambda c=closed: idle_closed() > c, 30)  # type: ignore[misc]
            assert sync.get(key(i)) == b"v%d" % i
            assert sync.transport == ("shm" if kind == "sync-shm" else "tcp")


def lease_batch(sock: socket.socket, keys: list[bytes]) -> LeaseBatchReply:
    sock.sendall(pack_frame_header(Op.LEASE_BATCH, 1, len(keys), 16 * len(keys)) + b"".join(keys))
    _magic, _v, opcode, status, _f, _rid, count, length = FRAME_HEADER.unpack(
        recv_bytes(sock, FRAME_HEADER.size)
    )
    assert (opcode, status, count) == (Op.LEASE_BATCH, Status.OK, len(keys))
    return LeaseBatchReply.decode(recv_bytes(sock, length), count)


def test_a_hung_client_pins_its_share_at_most_and_loses_its_leases_at_the_lease_timeout(
    start_node: NodeFactory,
) -> None:
    """Issue 11: one idle client pinned 60 of 64 arena blocks. Now a connection pins at most a
    quarter of the arena (16 blocks; the rest of its batch is deferred), all connections
    together at most half (a third client is refused and reads over TCP), writers keep storing
    new blocks meanwhile, and a client that never releases is cut off at --lease-timeout."""
    lease_timeout_s = 3.0
    block = 256 * KIB - BLOCK_HEADER_BYTES  # 64 blocks fill the 16 MiB arena
    node = start_node("--arena-size", "16MiB", "--lease-timeout", f"{lease_timeout_s}s")
    keys = [key(i) for i in range(64)]
    with KVStoreClient(node.endpoint, transports=(TransportKind.TCP,)) as writer:
        assert writer.put_many([(k, bytes([i]) * block) for i, k in enumerate(keys)]) == (
            [PutStatus.OK] * 64
        )
        with sockets(node, 3) as (hung1, hung2, hung3):
            started = time.monotonic()
            first = lease_batch(hung1, keys)
            assert first.tiers == bytes([1] * 16 + [LEASE_DEFERRED] * 48)
            second = lease_batch(hung2, keys[16:])
            # The node-wide half is pinned now: refused (read it over TCP), not deferred.
            assert second.tiers == bytes([1] * 16 + [LEASE_REFUSED] * 32)
            third = lease_batch(hung3, keys[32:])
            assert third.tiers == bytes([LEASE_REFUSED] * 32)
            counters = writer.stats()
            assert counters["num_leases"] == 32
            assert counters["limits"]["pinned_bytes"] == 32 * 256 * KIB
            # A shared-memory reader of blocks it cannot lease now reads them over TCP.
            with KVStoreClient(node.endpoint, transports=(TransportKind.SHM,)) as reader:
                outs = [bytearray(block) for _ in range(4)]
                assert reader.get_many_into(keys[:4], outs) == [block] * 4
                assert reader.transport == "shm"
                assert [bytes(o) for o in outs] == [bytes([i]) * block for i in range(4)]
            refused = writer.stats()["limits"]["pins_refused"]
            assert refused - counters["limits"]["pins_refused"] == 4  # the reader's four
            # Writers still store new blocks: the unpinned half of the arena is evictable.
            fresh = [(key(100 + i), bytes([i]) * block) for i in range(32)]
            assert writer.put_many(fresh) == [PutStatus.OK] * 32
            bound_s = lease_timeout_s + reaper_period_s(lease_timeout_s) + SLACK_S
            for sock in (hung1, hung2):
                closed_within(sock, bound_s)
            assert time.monotonic() - started < bound_s
        after = writer.stats()
    assert (after["num_leases"], after["transfers"]["lease_timeouts"]) == (0, 2)
    assert after["limits"]["pins_refused"] >= 64 and after["limits"]["pins_deferred"] >= 48


def test_one_log_line_per_bad_frame_kind(start_node: NodeFactory) -> None:
    """Issue 11: one 512 KiB RELEASE frame wrote 65,536 warning lines. Now a frame of unknown
    lease ids is one line, and more of the same kind within 10 s are none."""
    node = start_node()
    with connect(node) as sock:
        ids = b"".join(n.to_bytes(8, "little") for n in range(1, MAX_BATCH_ITEMS + 1))
        for _ in range(20):
            sock.sendall(pack_frame_header(Op.RELEASE, 0, MAX_BATCH_ITEMS, len(ids)) + ids)
            sock.sendall(pack_frame_header(Op.RELEASE_BATCH, 0, MAX_BATCH_ITEMS, len(ids)) + ids)
        sock.sendall(pack_frame_header(Op.STATS, 9, 0, 0))
        _magic, _v, opcode, status, _f, rid, _count, length = FRAME_HEADER.unpack(
            recv_bytes(sock, FRAME_HEADER.size)
        )
        assert (opcode, status, rid) == (Op.STATS, Status.OK, 9)
        recv_bytes(sock, length)
        payload = bytes(1000)
        header = bytearray(encode_header(key(1), payload))
        header[32] ^= 0xFF  # a wrong checksum: answered CORRUPT, logged once
        for _ in range(10):
            sock.sendall(pack_frame_header(Op.PUT, 2, 1, 64 + len(payload)) + header + payload)
            assert FRAME_HEADER.unpack(recv_bytes(sock, FRAME_HEADER.size))[3] == Status.CORRUPT
    log = node.log()
    assert log.count("RELEASE from") == 1, log
    assert f"{MAX_BATCH_ITEMS} unknown lease(s)" in log
    assert log.count("RELEASE_BATCH from") == 1
    assert log.count("failed its checksum") == 1
    assert stats(node)["limits"]["log_lines_suppressed"] == 19 + 19 + 9


def test_an_unauthenticated_connection_must_say_hello_within_the_header_timeout(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    """On a node with a cluster key, a connection that never completes the HELLO handshake (it
    sends nothing, or only HELLO) holds its slot only for the header timeout; an authenticated
    one that goes quiet is only idle."""
    header_timeout_s = 1.0
    secret, _ = load_or_create_cluster_key(tmp_path / "cluster.key")
    node = start_node("--cluster-key-file", str(tmp_path / "cluster.key"), "--header-timeout", "1s")
    credentials = ClusterCredentials(secret, Identity("worker", "w1"))
    bound_s = header_timeout_s + reaper_period_s(header_timeout_s) + SLACK_S
    with (
        connect(node) as silent,
        KVStoreClient(
            node.endpoint, transports=(TransportKind.TCP,), credentials=credentials
        ) as client,
    ):
        accepted = time.monotonic()
        assert client.put(key(1), b"v") is PutStatus.OK
        assert header_timeout_s * 0.9 <= closed_within(silent, bound_s) - accepted < bound_s
        assert client.get(key(1)) == b"v"  # authenticated, quiet for as long: still served
        assert client.stats()["limits"]["header_timeouts"] == 1


def read_reply(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """One reply frame: (opcode, status, count, payload)."""
    _magic, _v, opcode, status, _f, _rid, count, length = FRAME_HEADER.unpack(
        recv_bytes(sock, FRAME_HEADER.size)
    )
    return opcode, status, count, recv_bytes(sock, length)


def test_batches_that_hold_nothing_cost_no_state(start_node: NodeFactory) -> None:
    """A lease batch of missing blocks is not kept (its RELEASE_BATCH is a no-op, not an
    "unknown batch"), and a client that never commits its reservations has at most
    MAX_OPEN_PUT_BATCHES open: the next one is refused."""
    node = start_node()
    with connect(node) as sock:
        batch_ids = [lease_batch(sock, [key(i)]).batch_id for i in range(1000)]
        assert batch_ids == list(range(1, 1001))
        released = b"".join(n.to_bytes(8, "little") for n in batch_ids)
        sock.sendall(pack_frame_header(Op.RELEASE_BATCH, 0, len(batch_ids), len(released)))
        sock.sendall(released)
        too_small = RESERVE_ITEM.pack(key(1), 8)  # below a block header: refused, batch kept
        for i in range(MAX_OPEN_PUT_BATCHES):
            sock.sendall(pack_frame_header(Op.RESERVE_BATCH, i, 1, len(too_small)) + too_small)
            opcode, status, count, _body = read_reply(sock)
            assert (opcode, status, count) == (Op.RESERVE_BATCH, Status.OK, 1)
        sock.sendall(pack_frame_header(Op.RESERVE_BATCH, 7, 1, len(too_small)) + too_small)
        assert read_reply(sock)[:3] == (Op.RESERVE_BATCH, Status.BAD_REQUEST, 0)
        never_issued = (5000).to_bytes(8, "little")
        sock.sendall(pack_frame_header(Op.RELEASE_BATCH, 0, 1, 8) + never_issued)
        sock.sendall(pack_frame_header(Op.STATS, 9, 0, 0))
        assert read_reply(sock)[:2] == (Op.STATS, Status.OK)  # the connection still serves
    log = node.log()
    assert log.count("RELEASE_BATCH from") == 1, log  # the never-issued id only
    assert "of 1 unknown batch(es), e.g. 5000" in log
    assert f"has {MAX_OPEN_PUT_BATCHES} RESERVE_BATCHes open" in log
