"""Failover with real vLLM workers: `kill -9` of the decode worker serving a greedy stream.

One store node, one prefill and two decode workers (the tiny seeded model, each engine on its
own cores as `strata serve` does) and a gateway, all separate processes on loopback.

1. A greedy streaming request (ignore_eos, 600 tokens) is answered once undisturbed; the same
   request again, with the decode workers frozen (SIGSTOP) so that none can finish early: the one
   the gateway's /health shows with the request in flight is killed with SIGKILL, engine
   processes included, and the others thawed.
   The stream completes with exactly the undisturbed run's tokens and text: the gateway resumed
   it on the other decode worker from the prompt plus the tokens already sent.
2. Then the only decode worker left is killed the same way: the client gets an error event and
   `[DONE]`; the gateway keeps answering (/health 503 with its instance list, a new request an
   OpenAI error).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from strata.supervisor import Service
from tests.e2e.service_cluster import service_cluster
from tests.proc_tree import descendants

pytestmark = pytest.mark.slow

MAX_TOKENS = 600
PROMPT = "the river tower keeps seven cache blocks of memory for the decode engine"


@dataclass
class FailoverCluster:
    gateway_url: str
    prefill: Service
    decodes: dict[str, Service]
    """Decode workers by endpoint."""
    services: list[Service]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[FailoverCluster]:
    for services in service_cluster(
        tiny_model_dir,
        ("prefill", "decode", "decode"),
        store_args=("--arena-size", "512MiB"),
        gateway_args=("--health-check-interval", "1s"),
    ):
        (prefill,) = services.of_role("prefill").values()
        yield FailoverCluster(
            gateway_url=services.gateway_url,
            prefill=prefill,
            decodes=services.of_role("decode"),
            services=services.services,
        )


def _open_stream(cluster: FailoverCluster) -> Any:
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    request = urllib.request.Request(
        cluster.gateway_url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(request, timeout=300)


def _events(response: Any) -> Iterator[dict[str, Any] | None]:
    """The stream's events as JSON; None for [DONE]."""
    for raw in response:
        line = raw.decode().strip()
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line.removeprefix("data: ")
        yield None if data == "[DONE]" else json.loads(data)


def _get(cluster: FailoverCluster, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(cluster.gateway_url + path, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _kill_9(service: Service) -> None:
    assert service.proc is not None
    engine = descendants(service.proc.pid)  # engine core + executor, in or out of its group
    os.killpg(service.proc.pid, signal.SIGKILL)
    for pid in engine:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    service.proc.wait(30)


def _failovers(cluster: FailoverCluster) -> float:
    with urllib.request.urlopen(cluster.gateway_url + "/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('strata_gateway_failovers_total{role="decode"}'):
                return float(line.rpartition(" ")[2])
    return 0.0


class _Killer:
    """Kills the decode worker a stream lands on, deterministically (test code only): freezes
    every live decode worker (SIGSTOP to each of its processes) before the request, waits until
    the gateway has the request in flight on one of them, kill -9s that one and lets the others
    run again. A frozen worker cannot finish early, so the kill always lands mid-request."""

    def __init__(self, cluster: FailoverCluster) -> None:
        self._cluster = cluster
        # Every process of each worker, by pid: vLLM's engine core and its executor are not
        # always in the worker's process group.
        self._pids = {
            endpoint: sorted({s.proc.pid} | descendants(s.proc.pid))
            for endpoint, s in cluster.decodes.items()
            if s.proc is not None and s.alive()
        }
        self.killed: str | None = None
        self._signal(signal.SIGSTOP)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _signal(self, sig: int, endpoints: set[str] | None = None) -> None:
        for endpoint, pids in self._pids.items():
            if endpoints is None or endpoint in endpoints:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _, health = _get(self._cluster, "/health")
            busy = [
                w["endpoint"]
                for w in health["workers"]
                if w["role"] == "decode" and w["in_flight"] and w["endpoint"] in self._pids
            ]
            if busy:
                (endpoint,) = busy
                _kill_9(self._cluster.decodes[endpoint])
                self.killed = endpoint
                self._signal(signal.SIGCONT, set(self._pids) - {endpoint})
                return
            time.sleep(0.02)
        self._signal(signal.SIGCONT)

    def join(self) -> None:
        self._thread.join(150)
        self._signal(signal.SIGCONT, set(self._pids) - {self.killed or ""})


def _run_stream(
    cluster: FailoverCluster, kill: bool
) -> tuple[list[int], str, list[dict[str, Any]]]:
    """(token ids, text, error events) of one stream; ``kill``: kill -9 its decode worker."""
    killer = _Killer(cluster) if kill else None
    token_ids: list[int] = []
    text = ""
    errors: list[dict[str, Any]] = []
    done = False
    try:
        with _open_stream(cluster) as response:
            for event in _events(response):
                if event is None:
                    done = True
                    continue
                if "error" in event:
                    errors.append(event["error"])
                    continue
                choice = event["choices"][0]
                token_ids += choice.get("token_ids") or []
                text += choice["text"]
    finally:
        if killer is not None:
            killer.join()
    assert done
    if killer is not None:
        assert killer.killed is not None, "the request never reached a decode worker"
    return token_ids, text, errors


def test_kill_9_of_the_serving_decode_worker_loses_no_token(cluster: FailoverCluster) -> None:
    expected_ids, expected_text, errors = _run_stream(cluster, kill=False)
    assert errors == []
    assert len(expected_ids) == MAX_TOKENS

    ids, text, errors = _run_stream(cluster, kill=True)
    assert errors == []
    assert ids == expected_ids
    assert text == expected_text
    assert _failovers(cluster) == 1
    _, health = _get(cluster, "/health")
    states = sorted(w["state"] for w in health["workers"] if w["role"] == "decode")
    assert states == ["dead", "ready"]


def test_when_no_decode_worker_is_left_the_client_gets_an_error(
    cluster: FailoverCluster,
) -> None:
    live = [s for s in cluster.decodes.values() if s.alive()]
    assert len(live) == 1  # the previous test killed the other one
    ids, _, errors = _run_stream(cluster, kill=True)
    assert len(ids) < MAX_TOKENS  # the prefill's token, if any, then the error
    assert [e["code"] for e in errors] == ["worker_unavailable"]

    deadline = time.monotonic() + 30
    status, health = _get(cluster, "/health")
    while any(w["state"] == "ready" for w in health["workers"] if w["role"] == "decode"):
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
        status, health = _get(cluster, "/health")
    assert status == 503
    assert {w["role"] for w in health["workers"] if w["state"] == "ready"} == {"prefill"}
    request = urllib.request.Request(
        cluster.gateway_url + "/v1/completions",
        data=json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 503
    assert json.loads(info.value.read())["error"]["code"] == "worker_unavailable"
