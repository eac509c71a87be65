"""AsyncKVStoreClient against a real store node process, on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from kvstore.blocks.tier import Tier
from kvstore.client.aio import AsyncKVStoreClient
from kvstore.client.sync import KVStoreClient
from kvstore.errors import (
    KVStoreConnectionLost,
    KVStoreCorruptError,
    KVStoreError,
    KVStoreTimeout,
    KVStoreUnavailable,
)
from kvstore.wire.types import NodeMatch, PutStatus
from tests.integration.kvstore.conftest import NodeFactory
from tests.integration.kvstore.node_args import ssd_args

KIB, MIB = 1024, 1024 * 1024

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    if request.param == "uvloop":
        return uvloop.run
    return asyncio.run


def key(n: int) -> bytes:
    return n.to_bytes(16, "big")


def pattern(n: int, nbytes: int) -> bytes:
    return (n.to_bytes(4, "little") * (nbytes // 4 + 1))[:nbytes]


def test_results_of_every_operation(start_node: NodeFactory, run: Runner) -> None:
    node = start_node()

    async def scenario() -> None:
        async with AsyncKVStoreClient(node.endpoint) as client:
            puts = await client.put_many([(key(i), pattern(i, 100 * (i + 1))) for i in range(4)])
            assert puts == [PutStatus.OK] * 4
            again = await client.put_many([(key(0), b"other"), (key(9), b"new")])
            assert again == [PutStatus.EXISTS, PutStatus.OK]
            got = [await client.get(k) for k in (key(1), key(5), key(3))]
            assert got == [pattern(1, 200), None, pattern(3, 400)]
            outs = [bytearray(500), bytearray(8)]
            into = await client.get_many_into([key(2), key(7)], outs)
            assert into == [300, None]
            assert outs[0][:300] == pattern(2, 300)
            assert await client.get_into(key(3), bytearray(400)) == 400
            chains = [[key(0), key(1), key(6), key(2)], [key(6)], [], [key(3), key(2)]]
            assert [await client.match_prefix_tiers(c) for c in chains] == [
                NodeMatch(2, (Tier.DRAM, Tier.DRAM)),
                NodeMatch(0, ()),
                NodeMatch(0, ()),
                NodeMatch(2, (Tier.DRAM, Tier.DRAM)),
            ]
            assert [await client.match_prefix(c) for c in chains] == [2, 0, 0, 2]
            assert await client.exists([key(0), key(6), key(9)]) == [True, False, True]
            assert await client.delete([key(0), key(6), key(9)]) == 2
            assert await client.exists([key(0), key(9)]) == [False, False]
            stats = await client.stats()
            assert (stats["num_blocks"], stats["num_leases"], stats["puts"]) == (3, 0, 5)

    run(scenario())


def test_concurrent_calls_pipeline_on_one_connection(start_node: NodeFactory, run: Runner) -> None:
    node = start_node("--arena-size", "64MiB")
    blocks = {key(i): pattern(i, 256 * KIB + i) for i in range(48)}

    async def scenario() -> None:
        async with AsyncKVStoreClient(node.endpoint) as client:
            halves = [list(blocks.items())[:24], list(blocks.items())[24:]]
            results = await asyncio.gather(*(client.put_many(h) for h in halves))
            assert [status for half in results for status in half] == [PutStatus.OK] * 48
            outs = {k: bytearray(len(v)) for k, v in blocks.items()}
            keys = list(blocks)

            async def read(part: list[bytes]) -> list[int | None]:
                return await client.get_many_into(part, [outs[k] for k in part])

            parts = [keys[i::4] for i in range(4)]
            got = await asyncio.gather(*(read(p) for p in parts), client.exists(keys))
            assert got[4] == [True] * 48
            for part, results in zip(parts, got[:4], strict=True):
                assert results == [len(blocks[k]) for k in part]
            assert all(outs[k] == v for k, v in blocks.items())
            assert (await client.stats())["num_connections"] == 1

    run(scenario())


def test_ssd_tiers_in_match_and_get(start_node: NodeFactory, run: Runner, tmp_path: Any) -> None:
    node = start_node(*ssd_args(tmp_path / "ssd", "--no-promote"))
    keys = [key(i) for i in range(24)]
    with KVStoreClient(node.endpoint, use_shm=False) as sync:
        for i, k in enumerate(keys):  # 24 x 256 KiB into 8 MiB that spills above half full
            assert sync.put(k, pattern(i, 256 * KIB)) is PutStatus.OK
        deadline = time.monotonic() + 10
        while sync.stats()["tiers"]["arena_usage"] > 0.5:
            assert time.monotonic() < deadline, "the spiller did not run"
            time.sleep(0.01)
        tiers = sync.match_prefix_tiers(keys).tiers
    assert len(tiers) == 24 and Tier.SSD in tiers
    in_dram = next(i for i, t in enumerate(tiers) if t is not Tier.DRAM)
    on_ssd = tiers.index(Tier.SSD)

    async def scenario() -> None:
        async with AsyncKVStoreClient(node.endpoint) as client:

            def depths(match: NodeMatch) -> tuple[int, int]:
                dram = next((i for i, t in enumerate(match.tiers) if t is not Tier.DRAM), 24)
                return match.depth, dram

            assert depths(await client.match_prefix_tiers(keys)) == (24, in_dram)
            got = await client.get(keys[on_ssd])  # --no-promote: served from SSD, stays there
            assert got == pattern(on_ssd, 256 * KIB)
            after = await client.match_prefix_tiers(keys)
            assert depths(after) == (24, in_dram) and after.tiers[on_ssd] is Tier.SSD

    run(scenario())


def test_errors_are_typed_and_the_connection_survives_caller_errors(
    start_node: NodeFactory, run: Runner
) -> None:
    node = start_node("--prefault", "false")

    async def scenario() -> None:
        async with AsyncKVStoreClient(node.endpoint) as client:
            await client.put_many([(key(1), pattern(1, 8 * KIB)), (key(2), pattern(2, 8 * KIB))])
            with pytest.raises(KVStoreError, match="does not fit"):
                await client.get_many_into([key(1), key(2)], [bytearray(8 * KIB), bytearray(KIB)])
            (name,) = node.arena_files()
            with open(f"/dev/shm/{name}", "r+b") as f:  # flip a payload byte of the first block
                f.seek(64 + 10)
                byte = f.read(1)
                f.seek(64 + 10)
                f.write(bytes([byte[0] ^ 0xFF]))
            with pytest.raises(KVStoreCorruptError):
                await client.get(key(1))
            got = await client.get(key(2))  # same connection, still in step
            assert got == pattern(2, 8 * KIB)
            with pytest.raises(ValueError):
                await client.get(b"short")
            assert (await client.stats())["num_connections"] == 1

    run(scenario())


def test_timeout_then_connection_loss(start_node: NodeFactory, run: Runner) -> None:
    node = start_node()

    async def scenario() -> None:
        client = AsyncKVStoreClient(node.endpoint, timeout_s=0.5)
        await client.put(key(1), b"x")
        node.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(KVStoreTimeout, match=r"no reply within 0\.5s"):
                await client.get(key(1))
        finally:
            node.process.send_signal(signal.SIGCONT)
        assert await client.get(key(1)) == b"x"  # a new connection
        node.process.send_signal(signal.SIGSTOP)  # the request is written, never answered
        pending = asyncio.ensure_future(client.exists([key(1)] * 3))
        await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, node.stop, signal.SIGKILL)
        # Lost on a reused connection: retried once on a new one (the sync client's rule too),
        # which cannot connect -- or is reset while the dying node's listener still accepts.
        with pytest.raises(KVStoreUnavailable):
            await pending
        with pytest.raises(KVStoreUnavailable, match="cannot connect") as refused:
            await client.get(key(1))
        assert type(refused.value) is KVStoreUnavailable
        await client.close()

    run(scenario())
    assert issubclass(KVStoreConnectionLost, KVStoreUnavailable)
    assert issubclass(KVStoreTimeout, KVStoreUnavailable)
