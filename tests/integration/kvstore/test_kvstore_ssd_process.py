"""The SSD tier in a real node process: spill, reads over TCP and shm, corruption, kill -9."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import pytest

from kvstore.blocks.tier import Tier
from kvstore.client.sync import KVStoreClient
from kvstore.wire.frame import FRAME_HEADER, Op, Status, pack_frame_header
from kvstore.wire.types import PutStatus
from tests.integration.kvstore.node_args import ssd_args

pytestmark = pytest.mark.timeout(60)

KIB, MIB = 1024, 1024 * 1024
BLOCK_BYTES = 256 * KIB  # payload; with its header a block takes 65 arena pages
NUM_BLOCKS = 24  # 6.1 MiB: above the high watermark of an 8 MiB arena, below its size
SSD_SIZE = 64 * MIB
NodeFactory = Callable[..., Any]  # the start_node fixture (conftest.py)


def key(n: int) -> bytes:
    return (0x55AA << 112 | n).to_bytes(16, "big")


def payload(n: int) -> bytes:
    """Deterministic bytes with a prime period, different per block."""
    unit = bytes((i * 131 + n * 17) % 256 for i in range(4093))
    return (unit * (BLOCK_BYTES // len(unit) + 1))[:BLOCK_BYTES]


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def fill_and_spill(client: KVStoreClient) -> list[int]:
    """Put every block, wait for the spiller; return the blocks now only on SSD."""
    statuses = client.put_many([(key(n), payload(n)) for n in range(NUM_BLOCKS)])
    assert statuses == [PutStatus.OK] * NUM_BLOCKS
    wait_for(lambda: client.stats()["tiers"]["arena_usage"] <= 0.5)
    match = client.match_prefix_tiers([key(n) for n in range(NUM_BLOCKS)])
    assert match.depth == NUM_BLOCKS
    on_ssd = [n for n, tier in enumerate(match.tiers) if tier is Tier.SSD]
    stats = client.stats()
    assert stats["tiers"]["spills"] == len(on_ssd) == stats["ssd"]["num_blocks"]
    assert stats["num_blocks"] == NUM_BLOCKS - len(on_ssd)
    assert stats["evictions"] == 0  # the spiller kept ahead: nothing was dropped
    # The coldest blocks went first: the SSD holds a prefix of the put order.
    assert on_ssd == list(range(len(on_ssd))) and len(on_ssd) >= 8
    return on_ssd


def raw_get(endpoint: str, block_key: bytes) -> tuple[int, int, bytes]:
    """GET with a raw frame: (status, count = serving tier, block)."""
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(pack_frame_header(Op.GET, 7, 1, len(block_key)) + block_key)
        head = b""
        while len(head) < FRAME_HEADER.size:
            head += sock.recv(FRAME_HEADER.size - len(head))
        _magic, _v, _op, status, _f, _rid, count, length = FRAME_HEADER.unpack(head)
        body = b""
        while len(body) < length:
            body += sock.recv(length - len(body))
    return status, count, body


def test_spilled_blocks_read_back_byte_exact_over_tcp_and_shm(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    node = start_node(*ssd_args(tmp_path / "ssd"))
    with KVStoreClient(node.endpoint, use_shm=False) as tcp, KVStoreClient(node.endpoint) as shm:
        on_ssd = fill_and_spill(tcp)
        # A raw GET names the tier that served it.
        status, tier, body = raw_get(node.endpoint, key(0))
        assert (status, tier, body[64:] == payload(0)) == (Status.OK, Tier.SSD, True)
        status, tier, _ = raw_get(node.endpoint, key(NUM_BLOCKS - 1))
        assert (status, tier) == (Status.OK, Tier.DRAM)
        # Half of the SSD blocks over TCP, half over shared memory; all promoted on the way.
        half = len(on_ssd) // 2
        out = bytearray(BLOCK_BYTES)
        for n in on_ssd[1:half]:
            assert tcp.get_into(key(n), out) == BLOCK_BYTES and out == payload(n)
        assert shm.transport == "tcp"  # not connected yet
        outs = [bytearray(BLOCK_BYTES) for _ in on_ssd[half:]]
        got = shm.get_many_into([key(n) for n in on_ssd[half:]], outs)
        assert shm.transport == "shm"
        assert got == [BLOCK_BYTES] * len(outs)
        assert [o == payload(n) for o, n in zip(outs, on_ssd[half:], strict=True)] == [True] * len(
            outs
        )
        stats = tcp.stats()
        # Every SSD block was read from SSD and promoted; under load one promoted early may be
        # evicted (spilled clean) before the shared-memory batch reads it: read and promoted twice.
        assert stats["tiers"]["ssd_hits"] == stats["tiers"]["promotions"] >= len(on_ssd)
        assert stats["ssd"]["corrupt_dropped"] == 0
        # Every block, wherever it is now, is still byte-exact (TCP and shm).
        for client in (tcp, shm):
            for n in range(NUM_BLOCKS):
                assert client.get(key(n)) == payload(n)
        assert tcp.exists([key(n) for n in range(NUM_BLOCKS)]) == [True] * NUM_BLOCKS
        assert tcp.delete([key(0), key(NUM_BLOCKS - 1)]) == 2
        assert tcp.exists([key(0), key(NUM_BLOCKS - 1)]) == [False, False]
        assert tcp.stats()["num_leases"] == 0


def test_corrupt_block_is_dropped_and_a_killed_node_serves_its_ssd_again(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    ssd_dir = tmp_path / "ssd"
    node = start_node(*ssd_args(ssd_dir, "--no-promote"))
    with KVStoreClient(node.endpoint) as client:
        on_ssd = fill_and_spill(client)
        victim = on_ssd[3]
        # Flip payload bytes on disk through a second read-write lmdb transaction (lmdb allows
        # several processes); the node notices only when it reads the block.
        env = lmdb.open(str(ssd_dir), map_size=SSD_SIZE, max_dbs=3)
        with env, env.begin(write=True) as txn:
            blocks = env.open_db(b"blocks", txn=txn)
            value = bytearray(txn.get(key(victim), db=blocks))
            value[64 + 1000] ^= 0xFF
            txn.put(key(victim), bytes(value), db=blocks)
        assert client.get(key(victim)) is None  # a miss, not an error
        stats = client.stats()
        assert (stats["ssd"]["corrupt_dropped"], stats["tiers"]["misses"]) == (1, 1)
        assert client.exists([key(victim)]) == [False]
        for n in range(NUM_BLOCKS):
            if n != victim:
                assert client.get(key(n)) == payload(n)
        assert client.stats()["tiers"]["promotions"] == 0  # --no-promote
        ssd_blocks = client.stats()["ssd"]["num_blocks"]
        assert ssd_blocks == len(on_ssd) - 1

    # A second node cannot take the same directory while the first one runs.
    with pytest.raises(RuntimeError, match="in use by another store node"):
        start_node(*ssd_args(ssd_dir))

    assert node.stop(signal.SIGKILL) == -signal.SIGKILL
    restarted = start_node(*ssd_args(ssd_dir))
    with KVStoreClient(restarted.endpoint) as client:
        stats = client.stats()
        assert stats["ssd"]["recovered_blocks"] == stats["ssd"]["num_blocks"] == ssd_blocks
        assert stats["num_blocks"] == 0  # DRAM starts empty
        match = client.match_prefix_tiers([key(n) for n in on_ssd if n != victim])
        assert match.tiers == (Tier.SSD,) * (len(on_ssd) - 1)
        for n in on_ssd:
            assert client.get(key(n)) == (None if n == victim else payload(n))
        for n in range(len(on_ssd), NUM_BLOCKS):  # only in DRAM when the node was killed
            assert client.get(key(n)) is None
        assert client.stats()["ssd"]["corrupt_dropped"] == 0


def test_pipelined_requests_are_answered_in_order_around_ssd_reads(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    node = start_node(*ssd_args(tmp_path / "ssd", "--no-promote"))
    with KVStoreClient(node.endpoint, use_shm=False) as client:
        on_ssd = fill_and_spill(client)
        dram = NUM_BLOCKS - 1
        missing = key(999)
        gets = [on_ssd[0], dram, -1, on_ssd[1], on_ssd[2], dram, on_ssd[3]]
        host, port = node.endpoint.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            frames = []
            for rid, n in enumerate(gets):
                k = missing if n < 0 else key(n)
                frames.append(pack_frame_header(Op.GET, rid, 1, 16) + k)
            probe = key(on_ssd[0]) + key(dram) + missing
            frames.append(pack_frame_header(Op.EXISTS, 100, 3, len(probe)) + probe)
            sock.sendall(b"".join(frames))  # all at once: SSD reads overlap, replies keep order
            stream = sock.makefile("rb")
            for rid, n in enumerate(gets):
                _m, _v, op, status, _f, got_rid, count, length = FRAME_HEADER.unpack(
                    stream.read(FRAME_HEADER.size)
                )
                body = stream.read(length)
                assert (op, got_rid) == (Op.GET, rid)
                if n < 0:
                    assert status == Status.MISS
                else:
                    tier = Tier.SSD if n in on_ssd else Tier.DRAM
                    assert (status, count, body[64:] == payload(n)) == (Status.OK, tier, True)
            _m, _v, op, status, _f, got_rid, count, length = FRAME_HEADER.unpack(
                stream.read(FRAME_HEADER.size)
            )
            assert (op, got_rid, count, stream.read(length)) == (Op.EXISTS, 100, 3, b"\x03")
        # The client's pipelined batch over TCP (window 32) reads SSD blocks byte-exact too.
        outs = [bytearray(BLOCK_BYTES) for _ in on_ssd]
        assert client.get_many_into([key(n) for n in on_ssd], outs) == [BLOCK_BYTES] * len(on_ssd)
        assert all(out == payload(n) for out, n in zip(outs, on_ssd, strict=True))
        stats = client.stats()
        assert (stats["tiers"]["promotions"], stats["num_leases"], stats["num_writing"]) == (
            0,
            0,
            0,
        )
        assert stats["arena"]["used_bytes"] == stats["num_blocks"] * 65 * 4096  # transients freed


@pytest.mark.parametrize("use_shm", [False, True], ids=["tcp", "shm"])
def test_write_through_acknowledges_only_what_is_on_ssd(
    start_node: NodeFactory, tmp_path: Path, use_shm: bool
) -> None:
    """With ``--write-through``, every PUT (TCP) or COMMIT_BATCH (shared memory) the node has
    answered OK is on SSD: a SIGKILL right after the answers loses none of them."""
    ssd_dir = tmp_path / "ssd"
    node = start_node(*ssd_args(ssd_dir, "--write-through", "true", "--high-watermark", "0.9"))
    blocks = [(key(n), payload(n)) for n in range(12)]
    with KVStoreClient(node.endpoint, use_shm=use_shm) as client:
        assert client.put_many(blocks) == [PutStatus.OK] * len(blocks)
        # Answered in order around the parked replies: a GET behind them sees the last block.
        assert client.get(key(11)) == payload(11)
        assert client.stats()["tiers"]["persisted"] == len(blocks)
    assert node.stop(signal.SIGKILL) == -signal.SIGKILL
    restarted = start_node(*ssd_args(ssd_dir))
    with KVStoreClient(restarted.endpoint, use_shm=False) as client:
        assert client.stats()["ssd"]["recovered_blocks"] == len(blocks)
        for block_key, data in blocks:
            assert client.get(block_key) == data


def test_write_through_needs_an_ssd_tier(start_node: NodeFactory) -> None:
    with pytest.raises(RuntimeError, match="write_through needs an SSD tier"):
        start_node("--write-through", "true")
