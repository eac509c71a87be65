"""Row "prefill worker killed during KV transfer": no decode dies; failures <= the requests in
flight at the kill (0: the gateway retries the prefill elsewhere); the blocks the dead worker held
in the store are freed within the store's put timeout (its lease on a write) + 10 s.

A disaggregated cluster (tests/chaos/cluster.py): one store node (``--put-timeout`` PUT_TIMEOUT_S),
two prefill workers, one decode worker, the gateway. Each prefill worker reaches the store through
its own proxy (tests/integration/kvstore/frame_proxy.py). Under load, the proxy of prefill worker 0
is armed: at the next frame that completes a save (PUT or COMMIT_BATCH: its blocks are reserved in
the store, being written) it SIGKILLs the worker, engine included, and HOLDs the node's side of the
connection open, half-sent -- a worker dead on a host that did not close its sockets, so only the
store's own put timeout can free what it held.

Load: open loop at 0.7x the knee of a 1-prefill/1-decode cluster of the same workers (measured
once per session; this cluster has one more prefill worker, so the load is below its own 0.7x).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.wire.frame import FRAME_HEADER_BYTES, FrameHeader, Op
from strata_proto import worker_pb2
from tests.chaos.cluster import (
    Cluster,
    ProxyHook,
    engine_blocks_in_use,
    kill_tree,
    start_cluster,
    store_stats,
)
from tests.chaos.conftest import ChaosSize, KneeCache
from tests.chaos.load import BackgroundLoad, Workload, summarize
from tests.e2e.dataplane_processes import Process, stub
from tests.integration.kvstore.frame_proxy import FORWARD, Hold, Verdict

PUT_TIMEOUT_S = 10.0
COMPLETING_OPS = frozenset({int(Op.PUT), int(Op.COMMIT_BATCH)})
"""Frames that complete a save: a PUT's payload, or the commit of blocks reserved (and written
over shared memory) before it."""


class KillOnSave:
    """Proxy hook of one prefill worker: once armed, kill the worker at its next save frame."""

    def __init__(self) -> None:
        self.worker: Process | None = None
        self.armed = threading.Event()
        self.killed = threading.Event()
        self.on_kill: Callable[[], None] = lambda: None
        self.killed_on: int | None = None

    def __call__(self, conn: int, header: FrameHeader, payload: bytearray) -> Verdict:
        op = header.opcode
        if op not in COMPLETING_OPS or not self.armed.is_set() or self.killed.is_set():
            return FORWARD
        assert self.worker is not None
        self.killed_on = op
        kill_tree(self.worker)
        self.on_kill()
        self.killed.set()
        # Half the frame reaches the node, whose side of the connection stays open and silent.
        return Hold(FRAME_HEADER_BYTES + header.payload_len // 2, then="abandon")


@pytest.fixture(scope="module")
def killer() -> KillOnSave:
    return KillOnSave()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, killer: KillOnSave) -> Iterator[Cluster]:
    def proxy(role: str, index: int) -> ProxyHook | None:
        if role != "prefill":
            return None
        return killer if index == 0 else (lambda conn, header, payload: FORWARD)

    for cluster in start_cluster(
        tiny_model_dir,
        prefill=2,
        store_args=("--put-timeout", f"{PUT_TIMEOUT_S:g}s"),
        proxy=proxy,
        profiling={"enabled": False},
        scheduling={"conditional_disaggregation": False},
    ):
        killer.worker = cluster.prefills[0]
        yield cluster


def _held(stats: dict[str, Any]) -> int:
    return int(stats["num_writing"]) + int(stats["num_leases"])


@pytest.mark.timeout(1200)
def test_prefill_killed_during_kv_save(
    cluster: Cluster,
    killer: KillOnSave,
    chaos_size: ChaosSize,
    chaos_knee: KneeCache,
    chaos_report: Callable[..., None],
) -> None:
    knee = chaos_knee.get("tiny-1p1d", cluster.url, cluster.model)
    rate = 0.7 * knee.rate
    duration_s = chaos_size.pick(30.0, 180.0)
    # Long prompts (~5 engine blocks): a save takes a while, and the kill lands in one.
    workload = Workload(seed=77, prompt_words=120, max_tokens=12)
    at_kill: dict[str, Any] = {}
    with BackgroundLoad(cluster.url, cluster.model, workload, rate, duration_s) as load:

        def on_kill() -> None:
            at_kill["t"] = load.now()
            at_kill["in_flight"] = len(load.in_flight())

        killer.on_kill = on_kill
        time.sleep(duration_s / 3)
        killer.armed.set()
        assert killer.killed.wait(duration_s), "no save went through the armed proxy"
        at_kill["store"] = store_stats(cluster.store.endpoint)
        at_kill["engines"] = engine_blocks_in_use([*cluster.prefills, *cluster.decodes])
        # The blocks the dead worker held: reserved (being written) until the store's timeout.
        t_kill = time.monotonic()
        freed_after_s: float | None = None
        while time.monotonic() - t_kill < PUT_TIMEOUT_S + 30:
            stats = store_stats(cluster.store.endpoint)
            if stats["num_writing"] == 0:
                freed_after_s = time.monotonic() - t_kill
                break
            time.sleep(0.25)
    results = load.results()
    idle = store_stats(cluster.store.endpoint)
    engines = engine_blocks_in_use([*cluster.prefills, *cluster.decodes])
    summary = summarize(results)
    failed = [r for r in results if not r.ok]
    decode_alive = cluster.decodes[0].proc.poll() is None
    decode_ready = stub(cluster.decodes[0].endpoint).Health(worker_pb2.HealthRequest(), timeout=30)
    figures: dict[str, Any] = {
        **knee.figures(),
        "rate_rps": round(rate, 3),
        **summary.figures(),
        "killed_on_op": killer.killed_on,
        "in_flight_at_kill": at_kill["in_flight"],
        "store_writing_at_kill": at_kill["store"]["num_writing"],
        "failures": len(failed),
        "blocks_freed_after_s": None if freed_after_s is None else round(freed_after_s, 2),
        "put_timeout_s": PUT_TIMEOUT_S,
        "store_leases_idle": idle["num_leases"],
        "store_writing_idle": idle["num_writing"],
        "engine_blocks_in_use_at_kill": {e: h for e, (h, _) in at_kill["engines"].items()},
        "engine_blocks_in_use_idle": {e: held for e, (held, _) in engines.items()},
    }
    chaos_report(**figures)
    assert decode_alive and decode_ready.ready, figures  # no decode died
    assert at_kill["store"]["num_writing"] > 0, figures  # killed mid-save: blocks reserved
    assert len(failed) <= at_kill["in_flight"], [(r.index, r.status, r.error) for r in failed]
    assert freed_after_s is not None and freed_after_s <= PUT_TIMEOUT_S + 10, figures
    assert _held(idle) == 0, figures
    # The live engines gave back every KV block (the failed-over requests' too).
    assert len(engines) == 2 and not any(held for held, _ in engines.values()), figures
    assert all(total > 0 for _, total in engines.values()), engines
    # Served on after the kill: every request sent after it succeeded.
    after = [r for r in results if r.start > at_kill["t"]]
    assert after and all(r.ok for r in after), figures
