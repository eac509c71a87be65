"""A store node killed during a transfer: the request falls back to recomputation (issue 3).

One worker (role both, engine prefix cache off, so every request asks the store for its prefix)
talks to its store node through a fault-injecting TCP proxy (tests/e2e/store_proxy.py): once
armed, it kills the store node with SIGKILL at the moment the worker asks it for block data (GET,
GET_SHM or LEASE_BATCH) -- after the lookup said the blocks are there, before a byte of them
arrived. The decode still returns exactly the greedy tokens of an undisturbed run, and the
worker keeps serving.
"""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from strata_proto import worker_pb2
from tests.e2e.dataplane_processes import Process, decode, start_store, start_worker, stub
from tests.e2e.store_proxy import DATA_OPS, StoreProxy, Verdict

pytestmark = pytest.mark.slow

BLOCK_SIZE = 128  # vLLM's CPU block size
PROMPT = [random.Random(5).randrange(10, 2000) for _ in range(3 * BLOCK_SIZE + 20)]
OTHER = [random.Random(6).randrange(10, 2000) for _ in range(2 * BLOCK_SIZE + 7)]
MAX_TOKENS = 16


def killing_proxy(store: Process) -> tuple[StoreProxy, threading.Event, list[int]]:
    """A proxy to ``store`` that, once armed, SIGKILLs the node when a client asks it for block
    data and drops that request; returns it, the arming event and the opcodes that killed."""
    armed = threading.Event()
    killed_on: list[int] = []

    def on_request(op: int) -> Verdict:
        if op in DATA_OPS and armed.is_set():
            armed.clear()
            killed_on.append(op)
            store.proc.send_signal(signal.SIGKILL)
            store.proc.wait(30)
            return Verdict.DROP
        return Verdict.FORWARD

    return StoreProxy(store.endpoint, on_request), armed, killed_on


@pytest.fixture
def store() -> Iterator[Process]:
    node = start_store()
    yield node
    node.stop()


def test_store_killed_while_a_decode_loads_its_prefix_falls_back_to_recompute(
    tiny_model_dir: Path, store: Process
) -> None:
    proxy, armed, killed_on = killing_proxy(store)
    worker = start_worker(tiny_model_dir, "both", proxy.endpoint, "--no-prefix-caching")
    try:
        rpc = stub(worker.endpoint)
        # Undisturbed: nothing cached anywhere, every token computed; the prompt's blocks are saved.
        reference, first = decode(rpc, PROMPT, MAX_TOKENS)
        assert len(reference) == MAX_TOKENS and first.num_external_tokens == 0
        # The same prompt loads its 3 full blocks from the store (the engine keeps no cache).
        tokens, loaded = decode(rpc, PROMPT, MAX_TOKENS)
        assert tokens == reference
        assert loaded.num_external_tokens == 3 * BLOCK_SIZE

        armed.set()
        tokens, last = decode(rpc, PROMPT, MAX_TOKENS)
        assert len(killed_on) == 1  # the node died with the transfer in flight
        assert store.proc.returncode == -signal.SIGKILL
        assert tokens == reference  # recomputed, token for token
        assert (last.num_external_tokens, last.num_cached_tokens) == (0, 0)
        stats = rpc.Stats(worker_pb2.StatsRequest(), timeout=30)
        assert stats.kv_load_failures == 3

        # The worker stays healthy: with the store gone, requests are computed.
        assert rpc.Health(worker_pb2.HealthRequest(), timeout=30).ready
        tokens, last = decode(rpc, PROMPT, MAX_TOKENS)
        assert tokens == reference
        assert (last.num_external_tokens, last.num_cached_tokens) == (0, 0)
        other, _ = decode(rpc, OTHER, MAX_TOKENS)
        assert len(other) == MAX_TOKENS
    except grpc.RpcError as exc:
        pytest.fail(f"worker failed: {exc}\n{worker.tail()}")
    finally:
        status = worker.stop()
        proxy.close()
    assert status == 0, worker.tail()
