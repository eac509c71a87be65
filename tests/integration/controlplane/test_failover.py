"""Failover through the real gateway: 2 prefill + 2 decode scripted workers on loopback.

A worker "dies" by stopping its gRPC server: every call to it then fails UNAVAILABLE, as after a
kill -9 (tests/e2e/test_failover.py does that to real vLLM workers). Background health checks
are off (interval 1 h) so that only requests and explicit `check_all()` calls change state.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.instances.instance import InstanceView
from controlplane.instances.types import InstanceState
from controlplane.scheduling import InstanceLoad
from controlplane.text.tokenizer import ModelTokenizer
from controlplane.workers.roles import WorkerRole
from tests.integration.controlplane.conftest import (
    SERVED_MODEL_NAME,
    Cluster,
    LoopThread,
    start_cluster,
    stop_cluster,
)
from tests.integration.controlplane.scripted_worker import EOS_TOKEN_ID, ScriptedWorker

PROMPT = "Tell me a story"
# Multi-byte characters: byte-fallback tokens split them, so a resume boundary can fall inside one.
STORY = "Once upon a time, 日本 ✓ a fox — naïve — jumped over the lazy dog. The end."


def story_cluster(
    loop_thread: LoopThread,
    tiny_model_dir: Path,
    model_tokenizer: ModelTokenizer,
    registry: dict[str, Any],
    http: dict[str, Any] | None = None,
) -> Iterator[Cluster]:
    """2 prefill + 2 scripted decode workers that answer STORY (the failover tests' cluster)."""
    cluster = start_cluster(
        loop_thread,
        tiny_model_dir,
        model_tokenizer,
        num_prefill=2,
        num_decode=2,
        registry=registry,
        http=http or {},
    )
    cluster.script.token_ids = cluster.tokenizer.encode(STORY, add_special_tokens=False).ids
    yield cluster
    stop_cluster(cluster)


@pytest.fixture
def cluster(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> Iterator[Cluster]:
    yield from story_cluster(
        loop_thread, tiny_model_dir, model_tokenizer, {"health_check_interval_s": 3600.0}
    )


def _post(cluster: Cluster, body: dict[str, Any]) -> tuple[int, bytes]:
    url = urllib.parse.urlsplit(cluster.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=20)
    try:
        headers = {"Content-Type": "application/json"}
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _get(cluster: Cluster, path: str) -> tuple[int, bytes]:
    url = urllib.parse.urlsplit(cluster.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=20)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _body(stream: bool, max_tokens: int = 100) -> dict[str, Any]:
    return {
        "model": SERVED_MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "stream": stream,
        "return_token_ids": True,
    }


def _stream_events(raw: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]


def _streamed(raw: bytes) -> tuple[list[int], str, str | None]:
    """(token ids, text, finish reason) of a completed SSE stream."""
    events = _stream_events(raw)
    assert events[-1] == "[DONE]", events[-3:]
    ids: list[int] = []
    text = ""
    finish = None
    for event in events[:-1]:
        choice = json.loads(event)["choices"][0]
        ids += choice.get("token_ids") or []
        text += choice["text"]
        finish = choice["finish_reason"] or finish
    return ids, text, finish


def _state(cluster: Cluster, worker: ScriptedWorker) -> InstanceState:
    infos = {i.endpoint: i for i in cluster.server.registry.list_instances()}
    return infos[worker.endpoint].state


def _failovers(cluster: Cluster, role: str) -> float:
    for line in cluster.server.metrics.render().decode().splitlines():
        if line.startswith(f'strata_gateway_failovers_total{{role="{role}"}}'):
            return float(line.rpartition(" ")[2])
    return 0.0


def test_prefill_is_retried_on_another_prefill_worker(cluster: Cluster) -> None:
    dead = cluster.prefills[0]
    cluster.loop.run(dead.stop())
    expected = cluster.tokenizer.decode(cluster.script.token_ids[:5])
    # Round-robin over two ready prefill instances: one of two requests picks the dead one.
    for _ in range(2):
        status, raw = _post(cluster, _body(stream=False, max_tokens=5))
        assert status == 200, raw
        assert json.loads(raw)["choices"][0]["text"] == expected
    assert _state(cluster, dead) is InstanceState.DEAD
    assert _state(cluster, cluster.prefills[1]) is InstanceState.READY
    assert _failovers(cluster, "prefill") == 1
    assert cluster.server.registry.stats().requests_failed_over == 1
    # Now known dead: no more retries needed.
    assert _post(cluster, _body(stream=False, max_tokens=5))[0] == 200
    assert _failovers(cluster, "prefill") == 1


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_decode_resumes_on_another_worker_with_no_token_lost(
    cluster: Cluster, stream: bool
) -> None:
    status, raw = _post(cluster, _body(stream))
    assert status == 200, raw
    expected = _streamed(raw) if stream else _completion(raw)
    assert expected[0] == [*cluster.script.token_ids, EOS_TOKEN_ID]
    assert expected[1] == STORY
    for worker in cluster.decodes:
        worker.decode_requests.clear()

    cluster.script.die_after_decode_chunks = 5
    status, raw = _post(cluster, _body(stream))
    assert status == 200, raw
    assert (_streamed(raw) if stream else _completion(raw)) == expected

    dead = next(w for w in cluster.decodes if _state(cluster, w) is InstanceState.DEAD)
    survivor = next(w for w in cluster.decodes if w is not dead)
    assert _state(cluster, survivor) is InstanceState.READY
    assert _failovers(cluster, "decode") == 1
    (first,) = dead.decode_requests
    (resumed,) = survivor.decode_requests
    num_prompt = len(first.prompt_token_ids) - 1  # the first decode got prompt + first token
    num_done = len(resumed.prompt_token_ids) - num_prompt
    assert num_done > 1  # it resumed after tokens the dead worker had sent
    assert list(resumed.prompt_token_ids) == [
        *first.prompt_token_ids[:num_prompt],
        *cluster.script.token_ids[:num_done],
    ]
    assert resumed.sampling.max_tokens == 100 - num_done
    assert resumed.request_id == first.request_id
    # Both decodes get the prefill's hint of where the blocks are (multihost.md §2).
    assert first.kv_node == resumed.kv_node == cluster.script.kv_node == "store-a"


def _completion(raw: bytes) -> tuple[list[int], str, str | None]:
    choice = json.loads(raw)["choices"][0]
    return choice["token_ids"], choice["text"], choice["finish_reason"]


def test_no_decode_worker_left_gives_a_clean_error(cluster: Cluster) -> None:
    other = cluster.decodes[1]
    cluster.loop.run(other.stop())
    cluster.loop.run(cluster.server.registry.check_all())
    assert _state(cluster, other) is InstanceState.DEAD

    cluster.script.die_after_decode_chunks = 3
    status, raw = _post(cluster, _body(stream=True))
    assert status == 200
    events = _stream_events(raw)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "worker_unavailable"
    assert cluster.decodes[0].endpoint not in error["message"]  # internal: logged only
    assert _failovers(cluster, "decode") == 0

    # Non-streaming: an OpenAI error body; /health keeps answering (no decode worker ready).
    status, raw = _post(cluster, _body(stream=False))
    assert status == 503
    assert json.loads(raw)["error"]["code"] == "worker_unavailable"
    status, raw = _get(cluster, "/health")
    assert status == 503
    health = json.loads(raw)
    assert {w["role"]: w["state"] for w in health["workers"] if w["role"] == "decode"} == {
        "decode": "dead"
    }


def test_dead_instance_comes_back_when_its_heartbeat_does(cluster: Cluster) -> None:
    worker = cluster.decodes[0]
    port = worker.port
    cluster.loop.run(worker.stop())
    registry = cluster.server.registry
    cluster.loop.run(registry.check_all())
    assert _state(cluster, worker) is InstanceState.DEAD
    cluster.loop.run(worker.start(port))
    deadline = time.monotonic() + 10  # gRPC reconnects after a backoff (0.5 s at first)
    while _state(cluster, worker) is InstanceState.DEAD:
        assert time.monotonic() < deadline, "the instance never came back"
        time.sleep(0.1)
        cluster.loop.run(registry.check_all())
    assert _state(cluster, worker) is InstanceState.READY


def test_load_counters_follow_requests(cluster: Cluster) -> None:
    registry = cluster.server.registry

    async def snapshot() -> tuple[InstanceView, ...]:  # read on the gateway's own loop
        return registry.snapshot(WorkerRole.PREFILL) + registry.snapshot(WorkerRole.DECODE)

    cluster.script.decode_delay_s = 0.05
    url = urllib.parse.urlsplit(cluster.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=20)
    body = json.dumps(_body(stream=True))
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.readline()  # the first event: the request is in decode now
    (prefill_request,) = [r for w in cluster.prefills for r in w.prefill_requests]
    num_prompt = len(prefill_request.prompt_token_ids)
    (busy,) = [v for v in cluster.loop.run(snapshot()) if v.info.in_flight]
    assert busy.info.role is WorkerRole.DECODE
    assert busy.info.in_flight == busy.load.running_decodes == 1
    assert busy.load.queued_prefill_requests == 0
    assert busy.load.decode_context_tokens > num_prompt
    assert busy.load.decode_context_tokens + busy.load.remaining_decode_tokens == num_prompt + 100
    response.read()
    conn.close()
    for view in cluster.loop.run(snapshot()):
        assert view.info.in_flight == 0
        assert view.load == InstanceLoad()


def test_a_structured_answer_is_not_resumed_mid_way(cluster: Cluster) -> None:
    """A resumed decode's grammar would start over after the tokens already sent: the request
    fails instead of breaking its constraint (docs/design/openai-surface.md §2)."""
    cluster.script.die_after_decode_chunks = 5
    body = {**_body(False), "structured_outputs": {"regex": "[a-z ]+"}}
    status, raw = _post(cluster, body)
    assert status >= 500, raw
    assert _failovers(cluster, "decode") == 0
    assert sum(len(w.decode_requests) for w in cluster.decodes) == 1
