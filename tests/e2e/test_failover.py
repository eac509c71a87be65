"""Failover with real vLLM workers: `kill -9` of the decode worker serving a greedy stream.

One store node, one prefill and two decode workers (the tiny seeded model, each engine on its
own cores as `strata serve` does) and a gateway, all separate processes on loopback.

1. A greedy streaming request (ignore_eos, 600 tokens) is answered once undisturbed; the same
   request again, and once it is mid-stream the decode worker serving it (the one the gateway's
   /health shows with a request in flight) is killed with SIGKILL, engine processes included.
   The stream completes with exactly the undisturbed run's tokens and text: the gateway resumed
   it on the other decode worker from the prompt plus the tokens already sent.
2. Then the only decode worker left is killed mid-stream: the client gets an error event and
   `[DONE]`; the gateway keeps answering (/health 503 with its instance list, a new request an
   OpenAI error).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from strata.cli import engine_core_sets
from strata.supervisor import Service
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 600.0
MAX_TOKENS = 600
# Kill the decode worker once the client holds the prefill's token and a first decode chunk. The
# decode workers are slowed down meanwhile (_Throttle): on a quiet machine the tiny model can
# finish all its tokens between the client's read and the kill.
KILL_AFTER_TOKENS = 2
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
    py = sys.executable
    host = "127.0.0.1"
    services: list[Service] = []

    def start(service: Service) -> Service:
        services.append(service)
        service.start()
        return service

    try:
        store_port = free_port()
        argv = [py, "-m", "kvstore.server", "--host", host, "--port", str(store_port)]
        argv += ["--arena-size", "512MiB"]
        store = start(Service("store", argv, r"listening on"))
        store.wait_ready(READY_TIMEOUT_S)
        workers: list[tuple[str, Service]] = []
        for role, cores in zip(("prefill", "decode", "decode"), engine_core_sets(3), strict=True):
            port = free_port()
            argv = [py, "-m", "dataplane.worker", "--role", role, "--model", str(tiny_model_dir)]
            argv += ["--store", f"{host}:{store_port}", "--host", host, "--port", str(port)]
            env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores))}
            service = start(Service(f"{role}-{port}", argv, r"strata worker ready", env=env))
            workers.append((f"{host}:{port}", service))
        for _, service in workers:
            service.wait_ready(READY_TIMEOUT_S)
        (prefill_endpoint, prefill), *decode_workers = workers
        gateway_port = free_port()
        argv = [py, "-m", "controlplane.gateway", "--model-dir", str(tiny_model_dir)]
        argv += ["--served-model-name", "tiny", "--prefill", prefill_endpoint]
        for endpoint, _ in decode_workers:
            argv += ["--decode", endpoint]
        argv += ["--host", host, "--port", str(gateway_port), "--health-check-interval", "1s"]
        gateway = start(Service("gateway", argv, r"listening on"))
        gateway.wait_ready(READY_TIMEOUT_S)
        yield FailoverCluster(
            gateway_url=f"http://{host}:{gateway_port}",
            prefill=prefill,
            decodes=dict(decode_workers),
            services=services,
        )
    finally:
        for service in reversed(services):
            service.stop(20.0)


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


def _serving_decode(cluster: FailoverCluster) -> str:
    """Endpoint of the decode instance the gateway has a request in flight on."""
    _, health = _get(cluster, "/health")
    busy = [w["endpoint"] for w in health["workers"] if w["role"] == "decode" and w["in_flight"]]
    assert len(busy) == 1, health
    return str(busy[0])


def _kill_9(service: Service) -> None:
    assert service.proc is not None
    os.killpg(service.proc.pid, signal.SIGKILL)  # the worker and its engine-core processes
    service.proc.wait(30)


def _failovers(cluster: FailoverCluster) -> float:
    with urllib.request.urlopen(cluster.gateway_url + "/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('strata_gateway_failovers_total{role="decode"}'):
                return float(line.rpartition(" ")[2])
    return 0.0


class _Throttle:
    """Slows the live decode workers down with a SIGSTOP / SIGCONT duty cycle (test code only), so
    that a kill lands mid-stream however fast the engine is; :meth:`stop` lets them run again."""

    STOPPED_S = 0.02
    RUNNING_S = 0.002

    def __init__(self, services: list[Service]) -> None:
        self._pgids = [s.proc.pid for s in services if s.proc is not None and s.alive()]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _signal(self, sig: int) -> None:
        for pgid in self._pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)

    def _run(self) -> None:
        while not self._done.is_set():
            self._signal(signal.SIGSTOP)
            self._done.wait(self.STOPPED_S)
            self._signal(signal.SIGCONT)
            self._done.wait(self.RUNNING_S)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)
        self._signal(signal.SIGCONT)


def _run_stream(
    cluster: FailoverCluster, kill_after_tokens: int | None
) -> tuple[list[int], str, list[dict[str, Any]]]:
    """(token ids, text, error events) of one stream, killing its decode worker on the way."""
    throttle = _Throttle(list(cluster.decodes.values())) if kill_after_tokens else None
    try:
        token_ids, text, errors, done = _read_stream(cluster, kill_after_tokens, throttle)
    finally:
        if throttle is not None:
            throttle.stop()
    assert done
    return token_ids, text, errors


def _read_stream(
    cluster: FailoverCluster, kill_after_tokens: int | None, throttle: _Throttle | None
) -> tuple[list[int], str, list[dict[str, Any]], bool]:
    token_ids: list[int] = []
    text = ""
    errors: list[dict[str, Any]] = []
    done = False
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
            if kill_after_tokens is not None and len(token_ids) >= kill_after_tokens:
                kill_after_tokens = None
                _kill_9(cluster.decodes[_serving_decode(cluster)])
                if throttle is not None:
                    throttle.stop()  # the resumed decode runs at full speed
    return token_ids, text, errors, done


def test_kill_9_of_the_serving_decode_worker_loses_no_token(cluster: FailoverCluster) -> None:
    expected_ids, expected_text, errors = _run_stream(cluster, kill_after_tokens=None)
    assert errors == []
    assert len(expected_ids) == MAX_TOKENS

    ids, text, errors = _run_stream(cluster, kill_after_tokens=KILL_AFTER_TOKENS)
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
    ids, _, errors = _run_stream(cluster, kill_after_tokens=KILL_AFTER_TOKENS)
    assert KILL_AFTER_TOKENS <= len(ids) < MAX_TOKENS
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
