"""A store node killed during a transfer: the request falls back to recomputation (issue 3).

One worker (role both, engine prefix cache off, so every request asks the store for its prefix)
talks to its store node through a fault-injecting TCP proxy (``FrameProxy``,
tests/integration/kvstore/frame_proxy.py). The proxy forwards the store's wire
protocol frame by frame and, once armed, kills the store node with SIGKILL at the moment the
worker asks it for block data (GET, GET_SHM or LEASE_BATCH) -- after the lookup said the blocks
are there, before a byte of them arrived. The decode still returns exactly the greedy tokens of
an undisturbed run, and the worker keeps serving.
"""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore.wire.frame import FrameHeader
from strata_proto import worker_pb2
from tests.e2e.dataplane_processes import Process, decode, start_store, start_worker, stub
from tests.integration.kvstore.frame_proxy import CUT, DATA_OPS, FORWARD, FrameProxy, Verdict

pytestmark = pytest.mark.slow

BLOCK_SIZE = 128  # vLLM's CPU block size
PROMPT = [random.Random(5).randrange(10, 2000) for _ in range(3 * BLOCK_SIZE + 20)]
OTHER = [random.Random(6).randrange(10, 2000) for _ in range(2 * BLOCK_SIZE + 7)]
MAX_TOKENS = 16


class KillingProxy(FrameProxy):
    """Forwards TCP connections to a store node frame by frame (``FrameProxy``); once armed,
    SIGKILLs the node when a client asks it for block data, and drops the connection instead of
    forwarding the request."""

    def __init__(self, store: Process) -> None:
        self.store = store
        self.armed = threading.Event()
        self.killed_on: int | None = None  # the opcode that triggered the kill
        super().__init__(store.endpoint, on_request=self._request)

    def _request(self, conn: int, header: FrameHeader, payload: bytearray) -> Verdict:
        if header.opcode in DATA_OPS and self.armed.is_set():
            self.killed_on = int(header.opcode)
            self.armed.clear()
            self.store.proc.send_signal(signal.SIGKILL)
            self.store.proc.wait(30)
            return CUT
        return FORWARD


@pytest.fixture
def store() -> Iterator[Process]:
    node = start_store()
    yield node
    node.stop()


def test_store_killed_while_a_decode_loads_its_prefix_falls_back_to_recompute(
    tiny_model_dir: Path, store: Process
) -> None:
    proxy = KillingProxy(store)
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

        proxy.armed.set()
        tokens, last = decode(rpc, PROMPT, MAX_TOKENS)
        assert proxy.killed_on in DATA_OPS  # the node died with the transfer in flight
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
