"""Row "5 % of KV loads fail": the decode worker recomputes, every request succeeds with exactly
the greedy output of an undisturbed engine.

A disaggregated cluster (tests/chaos/cluster.py): one store node, one prefill and one decode
worker, the gateway. Every request's prompt is unique and about 2.5 engine blocks long, so the
prefill worker computes it and saves its blocks, and the decode worker loads them from the store.
The decode worker reaches the store through a fault-injecting proxy
(tests/integration/kvstore/frame_proxy.py) that, once armed, drops 5 % of its requests for block
data (GET, GET_SHM, LEASE_BATCH; seeded): the worker's transfer breaks mid-call, as when the node
or the network drops it.

Load: open loop at 0.7x the knee of this kind of cluster (measured once per session, before the
proxy is armed). Pass: 100 % of the requests succeed, each with exactly the token ids of one
plain vLLM engine (``run_reference``), and the decode worker counted the failed loads.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.wire.frame import FrameHeader
from strata_proto import worker_pb2
from tests.chaos.cluster import Cluster, ProxyHook, start_cluster
from tests.chaos.conftest import ChaosSize, KneeCache
from tests.chaos.load import Workload, run_load, summarize
from tests.e2e.conftest import run_reference
from tests.e2e.dataplane_processes import stub
from tests.integration.kvstore.frame_proxy import CUT, DATA_OPS, FORWARD, Verdict

FAIL_FRACTION = 0.05


class LoadFaults:
    """The decode worker's proxy hook: drops FAIL_FRACTION of the data requests once armed."""

    def __init__(self, seed: int) -> None:
        self.armed = threading.Event()
        self._rng = random.Random(seed)
        self.data_requests = 0
        self.dropped = 0

    def __call__(self, conn: int, header: FrameHeader, payload: bytearray) -> Verdict:
        if header.opcode not in DATA_OPS or not self.armed.is_set():
            return FORWARD
        self.data_requests += 1
        if self._rng.random() < FAIL_FRACTION:
            self.dropped += 1
            return CUT
        return FORWARD


@pytest.fixture(scope="module")
def faults() -> LoadFaults:
    return LoadFaults(seed=10)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, faults: LoadFaults) -> Iterator[Cluster]:
    def proxy(role: str, index: int) -> ProxyHook | None:
        return faults if role == "decode" else None

    # No conditional disaggregation: the decode worker never prefills a prompt itself, so every
    # request's KV goes through the store.
    yield from start_cluster(
        tiny_model_dir,
        proxy=proxy,
        profiling={"enabled": False},
        scheduling={"conditional_disaggregation": False},
    )


@pytest.mark.timeout(1200)
def test_failed_kv_loads_are_recomputed_with_identical_output(
    tiny_model_dir: Path,
    cluster: Cluster,
    faults: LoadFaults,
    chaos_size: ChaosSize,
    chaos_knee: KneeCache,
    chaos_report: Callable[..., None],
) -> None:
    knee = chaos_knee.get("tiny-1p1d", cluster.url, cluster.model)
    rate = 0.7 * knee.rate
    workload = Workload(seed=55, prompt_words=60, max_tokens=12)
    decode = stub(cluster.decodes[0].endpoint)
    before = decode.Stats(worker_pb2.StatsRequest(), timeout=30)

    faults.armed.set()
    results = run_load(
        cluster.url, cluster.model, workload, rate, chaos_size.pick(20.0, 300.0), timeout_s=120
    )
    faults.armed.clear()
    after = decode.Stats(worker_pb2.StatsRequest(), timeout=30)
    summary = summarize(results)
    loaded = after.kv_tokens_loaded - before.kv_tokens_loaded
    load_failures = after.kv_load_failures - before.kv_load_failures
    figures: dict[str, Any] = {
        **knee.figures(),
        "rate_rps": round(rate, 3),
        **summary.figures(),
        "data_requests": faults.data_requests,
        "data_requests_dropped": faults.dropped,
        "decode_kv_load_failures": load_failures,
        "decode_kv_tokens_loaded": loaded,
    }
    chaos_report(**figures)
    failed = [(r.index, r.status, r.error) for r in results if not r.ok]
    assert not failed, failed[:10]
    assert faults.dropped > 0 and load_failures > 0, figures  # the fault happened ...
    assert loaded > 0, figures  # ... and the other loads went through

    reference = run_reference(
        tiny_model_dir, [workload.request(r.index).reference() for r in results]
    )
    mismatched = [
        r.index
        for r, ref in zip(results, reference, strict=True)
        if r.token_ids != ref["token_ids"]
    ]
    chaos_report(mismatched=len(mismatched))
    assert not mismatched, mismatched[:20]
