"""Corruption injected in transfers and in every tier: 100 % detected, 0 corrupt completions,
0 false aborts.

**Setup.** A real node (``python -m kvstore.server``) with a 16 MiB DRAM arena spilling to an
lmdb SSD tier (``--no-promote``, so a block read from SSD stays there), 160 blocks of 64 KiB
stored: about a third in DRAM, the rest on SSD. Three real clients: TCP, shared memory, and TCP
through ``FrameProxy`` (tests/integration/kvstore/frame_proxy.py), a frame-level proxy that can
flip a bit in the next frame it forwards.

**Requests** (300 in the shortened form, 2,000 in the full one; seeded), each one of:

- ``clean`` (60 %): GET of a stored block over a random client; must be byte-identical. A
  ``KVStoreCorruptError`` or a miss here is a *false abort*; other bytes a *corrupt completion*.
- ``wire-put``: PUT of a new block through the proxy, one random bit of the block (64-byte
  header or payload) flipped on the way to the node. Detected = the PUT is refused
  (``KVStoreCorruptError`` / ``KVStoreError``) and nothing is stored under the key or under any
  other key; then the clean PUT of the same block must succeed.
- ``wire-get``: GET through the proxy with one random bit of the reply's block flipped on the way
  back. Detected = the client counted a block that failed verification (``corrupt_reads``) and,
  refetching it, returned the right bytes: a transfer error costs one more read, not the load.
  (A bit flipped in a frame *header* breaks framing: the connection is dropped and the call
  retried -- ``KVStoreConnectionLost`` at worst; those flips are the malformed-frame tests'.)
- ``dram``: a random bit of a DRAM-resident block flipped in the node's arena (the /dev/shm file,
  mapped read-write by the test as a shared-memory client would, at the offset a ``GET_SHM``
  lease names), then a GET over TCP or shared
  memory. Detected = ``KVStoreCorruptError`` (the refetch fails too); afterwards the key must be
  healed: the client deleted the damaged copy, so the next GET is a miss, not the corrupt block
  forever, and a PUT of it stores it again.

Flips land in the block's 64-byte header half of the time (key, dtype, shape, length, checksum
fields), in its payload otherwise.
- ``ssd``: a random bit of an SSD-resident block flipped in its lmdb value on disk (a second
  read-write lmdb transaction), then a GET. Detected = a miss with ``ssd.corrupt_dropped`` + 1.

Criteria: every injected fault detected, no corrupt bytes returned or stored, no false abort.
"""

from __future__ import annotations

import mmap
import os
import random
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from kvstore.blocks.format import BLOCK_HEADER_BYTES
from kvstore.blocks.tier import Tier
from kvstore.client.sync import KVStoreClient
from kvstore.errors import KVStoreCorruptError, KVStoreError
from kvstore.transport.tcp import recv_bytes
from kvstore.wire import requests
from kvstore.wire.frame import FRAME_HEADER_BYTES, FrameHeader, Op, Status, pack_frame_header
from kvstore.wire.messages import SHM_LEASE
from kvstore.wire.types import PutStatus
from tests.chaos.conftest import ChaosSize
from tests.chaos.kv_load import KIB, MIB, key, payload, wait_for
from tests.integration.kvstore.frame_proxy import FORWARD, FrameProxy, Verdict
from tests.integration.kvstore.node_process import NodeFactory, start_node

__all__ = ["start_node"]  # the fixture

BLOCK = 64 * KIB - 64
NUM_BLOCKS = 160
SSD_SIZE = 256 * MIB
TAG = 0xC0AA
KINDS = ("clean", "wire-put", "wire-get", "dram", "ssd")
WEIGHTS = (60, 10, 10, 10, 10)


def flip_position(rng: random.Random) -> int:
    """Where in a block a bit flips: half of the flips in its 64-byte header (key, dtype, shape,
    length, checksum -- a uniform choice would almost never hit it), half in the payload."""
    if rng.random() < 0.5:
        return rng.randrange(BLOCK_HEADER_BYTES)
    return BLOCK_HEADER_BYTES + rng.randrange(BLOCK)


class Flipper:
    """Proxy hooks: flip one bit of the next PUT's block / the next GET reply's block."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.put_armed = self.get_armed = False
        self.flipped_at: int | None = None  # offset in the block of the last flip

    def _flip(self, body: bytearray) -> None:
        at = flip_position(self.rng)
        body[at] ^= 1 << self.rng.randrange(8)
        self.flipped_at = at

    def on_request(self, conn: int, header: FrameHeader, body: bytearray) -> Verdict:
        if self.put_armed and header.opcode is Op.PUT:
            self.put_armed = False
            self._flip(body)
        return FORWARD

    def on_reply(self, conn: int, header: FrameHeader, body: bytearray) -> Verdict:
        if self.get_armed and header.opcode is Op.GET and header.status == Status.OK:
            self.get_armed = False
            self._flip(body)
        return FORWARD


@pytest.fixture
def flipper() -> Iterator[Flipper]:
    yield Flipper(random.Random(7))


def _flip_in_arena(endpoint: str, arena_path: str, block_key: bytes, rng: random.Random) -> None:
    """Flip a bit of the block where the node keeps it: GET_SHM leases it and says where."""
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(pack_frame_header(Op.GET_SHM, 1, 1, len(block_key)) + block_key)
        header = FrameHeader.decode(recv_bytes(sock, FRAME_HEADER_BYTES))
        body = recv_bytes(sock, header.payload_len)
        assert header.opcode is Op.GET_SHM and header.status == Status.OK
        lease_id, offset, length = SHM_LEASE.unpack(body)
        assert length == BLOCK_HEADER_BYTES + BLOCK
        with open(arena_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as arena:
            assert arena[offset + 8 : offset + 24] == block_key
            arena[offset + flip_position(rng)] ^= 1 << rng.randrange(8)
        sock.sendall(requests.release(lease_id))


def _flip_on_ssd(ssd_dir: Path, block_key: bytes, rng: random.Random) -> None:
    env = lmdb.open(str(ssd_dir), map_size=SSD_SIZE, max_dbs=3)
    with env, env.begin(write=True) as txn:
        blocks = env.open_db(b"blocks", txn=txn)
        value = bytearray(txn.get(block_key, db=blocks))
        value[flip_position(rng)] ^= 1 << rng.randrange(8)
        txn.put(block_key, bytes(value), db=blocks)


@pytest.mark.timeout(900)
def test_corruption_in_transfers_and_every_tier_is_detected(
    start_node: NodeFactory,
    tmp_path: Path,
    chaos_size: ChaosSize,
    chaos_report: Callable[..., None],
    flipper: Flipper,
) -> None:
    requests = chaos_size.pick(300, 2000)
    rng = random.Random(20261206)
    ssd_dir = tmp_path / "ssd"
    node = start_node(
        *("--arena-size", "16MiB", "--prefault", "false", "--no-promote"),
        *("--ssd-dir", str(ssd_dir), "--ssd-size", "256MiB"),
        *("--high-watermark", "0.5", "--low-watermark", "0.25"),
    )
    (arena_name,) = node.arena_files()
    arena_path = os.path.join("/dev/shm", arena_name)
    proxy = FrameProxy(node.endpoint, on_request=flipper.on_request, on_reply=flipper.on_reply)
    tcp = KVStoreClient(node.endpoint, use_shm=False)
    shm = KVStoreClient(node.endpoint)
    proxied = KVStoreClient(proxy.endpoint, use_shm=False)
    clients = {"tcp": tcp, "shm": shm, "proxied": proxied}
    counts: dict[str, dict[str, int]] = {
        k: {"requests": 0, "detected": 0, "undetected": 0, "corrupt_completions": 0} for k in KINDS
    }
    counts["clean"]["false_aborts"] = 0
    unhealed = 0
    try:
        stored = [key(TAG, n) for n in range(NUM_BLOCKS)]
        assert tcp.put_many([(k, payload(k, BLOCK)) for k in stored]) == [PutStatus.OK] * len(
            stored
        )
        wait_for(lambda: tcp.stats()["tiers"]["arena_usage"] <= 0.5, 30)
        fresh = NUM_BLOCKS

        def tier_of(block_key: bytes) -> Tier | None:
            match = tcp.match_prefix_tiers([block_key])
            return match.tiers[0] if match.depth else None

        for _ in range(requests):
            kind = rng.choices(KINDS, WEIGHTS)[0]
            row = counts[kind]
            row["requests"] += 1
            if kind == "clean":
                block_key = rng.choice(stored)
                try:
                    got = clients[rng.choice(list(clients))].get(block_key)
                except KVStoreCorruptError:
                    row["false_aborts"] += 1
                    continue
                if got is None:
                    row["false_aborts"] += 1
                elif got != payload(block_key, BLOCK):
                    row["corrupt_completions"] += 1
            elif kind == "wire-put":
                block_key = key(TAG, fresh)
                fresh += 1
                flipper.put_armed = True
                before = tcp.stats()["puts"]  # commits (no promotions: --no-promote)
                try:
                    status = proxied.put(block_key, payload(block_key, BLOCK))
                except KVStoreError:
                    status = None
                assert not flipper.put_armed
                stored_any = tcp.stats()["puts"] != before
                if status is None and not stored_any:
                    row["detected"] += 1
                elif stored_any and tcp.exists([block_key]) == [True]:
                    row["corrupt_completions"] += 1  # the damaged block was stored as this key
                else:
                    row["undetected"] += 1  # refused nothing, or stored it under another key
                    if stored_any:
                        row["corrupt_completions"] += 1
                assert tcp.put(block_key, payload(block_key, BLOCK)) is PutStatus.OK
                assert tcp.get(block_key) == payload(block_key, BLOCK)
                assert tcp.delete([block_key]) == 1  # keep DRAM below its watermark
            elif kind == "wire-get":
                block_key = rng.choice(stored)
                flipper.get_armed = True
                seen = proxied.corrupt_reads
                try:
                    got = proxied.get(block_key)  # the flipped copy fails; the refetch is clean
                except KVStoreCorruptError:
                    got = None
                    row["false_aborts"] = row.get("false_aborts", 0) + 1
                assert not flipper.get_armed
                if got is not None and got != payload(block_key, BLOCK):
                    row["corrupt_completions"] += 1
                elif proxied.corrupt_reads == seen + 1:
                    row["detected"] += 1
                else:
                    row["undetected"] += 1
            else:
                want = Tier.DRAM if kind == "dram" else Tier.SSD
                candidates = [k for k in stored if tier_of(k) is want]
                if not candidates:
                    row["requests"] -= 1
                    continue
                block_key = rng.choice(candidates)
                if kind == "dram":
                    _flip_in_arena(node.endpoint, arena_path, block_key, rng)
                else:
                    _flip_on_ssd(ssd_dir, block_key, rng)
                reader = rng.choice([tcp, shm])
                try:
                    got = reader.get(block_key)
                except KVStoreCorruptError:
                    row["detected"] += 1
                else:
                    if got is None:
                        row["detected"] += 1
                    elif got != payload(block_key, BLOCK):
                        row["corrupt_completions"] += 1
                    else:
                        row["undetected"] += 1
                # Healed: the damaged copy is gone (a miss) and the block can be stored again.
                try:
                    again = tcp.get(block_key)
                except KVStoreCorruptError:
                    again = b"still corrupt"
                if again is not None:
                    unhealed += 1
                    stored.remove(block_key)  # poisoned: keep it out of the clean requests
                    continue
                if kind == "ssd":
                    stored.remove(block_key)  # re-storing it would grow DRAM past the mark
                else:
                    assert tcp.put(block_key, payload(block_key, BLOCK)) is PutStatus.OK
        stats = tcp.stats()
    finally:
        for client in clients.values():
            client.close()
        proxy.close()

    injected = sum(counts[k]["requests"] for k in KINDS if k != "clean")
    detected = sum(counts[k]["detected"] for k in KINDS if k != "clean")
    figures: dict[str, Any] = {
        "requests": requests,
        "injected": injected,
        "detected": detected,
        "detection_rate": round(detected / max(injected, 1), 4),
        "corrupt_completions": sum(row["corrupt_completions"] for row in counts.values()),
        "false_aborts": counts["clean"]["false_aborts"] + counts["wire-get"].get("false_aborts", 0),
        "unhealed_keys": unhealed,
        "ssd_corrupt_dropped": stats["ssd"]["corrupt_dropped"],
    }
    for kind in KINDS:
        figures.update({f"{kind}.{name}": value for name, value in counts[kind].items()})
    chaos_report(**figures)
    assert requests >= chaos_size.pick(300, 2000)
    assert min(counts[k]["requests"] for k in KINDS) > 0, figures
    assert figures["corrupt_completions"] == 0, figures
    assert detected == injected, figures
    assert figures["false_aborts"] == 0, figures
    assert unhealed == 0, figures
    assert stats["ssd"]["corrupt_dropped"] == counts["ssd"]["detected"]
