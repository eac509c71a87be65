"""A worker whose engine stops stepping while its gRPC server answers: the gateway marks it dead
(stalled) from Health's progress report, cuts its calls in flight, and the request completes on
the other worker, token-identical; the worker returns to ready once it steps (here: once its
stalled calls were cancelled). Scripted workers on loopback (scripted_worker.py); a small stall
floor and a short health interval keep it quick. No wall-clock assertion beyond the HTTP
client's generous timeout."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.instances.types import InstanceState
from controlplane.text.tokenizer import ModelTokenizer
from tests.integration.controlplane.conftest import (
    Cluster,
    LoopThread,
)
from tests.integration.controlplane.scripted_worker import EOS_TOKEN_ID, ScriptedWorker
from tests.integration.controlplane.test_failover import (
    STORY,
    _body,
    _completion,
    _failovers,
    _get,
    _post,
    _state,
    _streamed,
    story_cluster,
)


@pytest.fixture
def cluster(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> Iterator[Cluster]:
    yield from story_cluster(
        loop_thread,
        tiny_model_dir,
        model_tokenizer,
        {"health_check_interval_s": 0.1, "stall_floor_s": 0.5},
        http={"health_details": True},  # /health names the stall
    )


def _wait_for(cluster: Cluster, worker: ScriptedWorker, state: InstanceState) -> None:
    deadline = time.monotonic() + 20
    while _state(cluster, worker) is not state:
        assert time.monotonic() < deadline, f"{worker.endpoint} never became {state.value}"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_stalled_decode_fails_over_and_the_worker_comes_back(
    cluster: Cluster, stream: bool
) -> None:
    cluster.script.stall_after_decode_chunks = 4
    status, raw = _post(cluster, _body(stream))
    assert status == 200, raw
    ids, text, finish = _streamed(raw) if stream else _completion(raw)
    assert (ids, text, finish) == ([*cluster.script.token_ids, EOS_TOKEN_ID], STORY, "stop")
    stalled = next(w for w in cluster.decodes if w.num_stalls_cancelled)
    survivor = next(w for w in cluster.decodes if w is not stalled)
    assert stalled.num_stalls_cancelled == 1  # the gateway cancelled the stalled call
    assert _failovers(cluster, "decode") == 1
    (first,) = stalled.decode_requests
    (resumed,) = survivor.decode_requests
    assert resumed.request_id == first.request_id
    # The stalled worker was marked dead with the reason, visible in /health, then came back
    # (its stalled call is gone, so its engine has no work).
    _wait_for(cluster, stalled, InstanceState.READY)
    assert stalled.num_stalled == 0


def test_stalled_prefill_is_retried_on_the_other_prefill_worker(cluster: Cluster) -> None:
    cluster.script.stall_prefill = True
    expected = cluster.tokenizer.decode(cluster.script.token_ids[:5])
    status, raw = _post(cluster, _body(stream=False, max_tokens=5))
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["text"] == expected
    stalled = next(w for w in cluster.prefills if w.num_stalls_cancelled)
    assert _failovers(cluster, "prefill") == 1
    assert len(stalled.prefill_requests) == 1
    _wait_for(cluster, stalled, InstanceState.READY)


def test_stall_detail_is_shown_while_dead(cluster: Cluster) -> None:
    """/health names the stall while it lasts (the only decode worker left: the gateway is not
    ready meanwhile), and the worker is ready again once it steps."""
    other = cluster.decodes[1]
    cluster.loop.run(other.stop())
    cluster.loop.run(cluster.server.registry.check_all())
    stalled = cluster.decodes[0]
    # Hold the stall: Health keeps reporting work with no step after the call is cut.
    stalled.num_stalled = 1
    stalled.stalled_since = cluster.loop.run(_loop_time())
    _wait_for(cluster, stalled, InstanceState.DEAD)
    status, raw = _get(cluster, "/health")
    assert status == 503  # no decode worker serves
    (worker,) = [w for w in json.loads(raw)["workers"] if w["endpoint"] == stalled.endpoint]
    assert worker["state"] == "dead"
    assert worker["detail"].startswith("stalled: engine made no step for ")
    assert worker["detail"].endswith(" with 1 request (bound 0.5 s)")
    stalled.num_stalled = 0
    _wait_for(cluster, stalled, InstanceState.READY)


async def _loop_time() -> float:
    return asyncio.get_running_loop().time()
