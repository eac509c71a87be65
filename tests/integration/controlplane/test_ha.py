"""High availability: two gateways sharing the instance registry through Redis (a real Valkey).

- In-process: an instance added through gateway A is used by gateway B; drained through A, B
  stops sending it requests; removed through A, B forgets it. Ids are the same on both.
- Processes: gateway G1 (configured with P, D1, D2) and G2 (configured with P, D1 only) share
  the registry; `kill -9` of G1 leaves G2 serving every worker, D2 included — which G2 knows
  only from the registry.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest
from tokenizers import Tokenizer

from controlplane.config import GatewayConfig, HttpConfig, RegistryConfig, RoutingConfig
from controlplane.gateway import GatewayServer
from controlplane.instances.types import InstanceState
from controlplane.scheduling.policies import PolicyKind
from controlplane.text.tokenizer import ModelTokenizer
from controlplane.workers.roles import WorkerRole
from strata_proto import worker_pb2
from tests.integration.controlplane.conftest import (
    SERVED_MODEL_NAME,
    LoopThread,
    default_script,
    start_workers,
)
from tests.integration.controlplane.scripted_worker import ScriptedWorker
from tests.integration.kvstore.valkey_fixture import valkey_url

__all__ = ["valkey_url"]

REPO_ROOT = Path(__file__).resolve().parents[3]
LISTENING = "strata gateway listening on "


@pytest.fixture
def workers(
    loop_thread: LoopThread, tiny_model_dir: Path
) -> Iterator[tuple[ScriptedWorker, ScriptedWorker, ScriptedWorker]]:
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    script = default_script(tokenizer)
    (prefill,) = start_workers(loop_thread, script, tokenizer, worker_pb2.ROLE_PREFILL, 1)
    decode1, decode2 = start_workers(loop_thread, script, tokenizer, worker_pb2.ROLE_DECODE, 2)
    yield prefill, decode1, decode2
    for worker in (prefill, decode1, decode2):
        loop_thread.run(worker.stop())


def _complete(url: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    return client.completions.create(model=SERVED_MODEL_NAME, prompt="Hi").choices[0].text or ""


def _wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_two_gateways_share_added_drained_and_removed_instances(
    loop_thread: LoopThread,
    tiny_model_dir: Path,
    model_tokenizer: ModelTokenizer,
    workers: tuple[ScriptedWorker, ScriptedWorker, ScriptedWorker],
    valkey_url: str,
) -> None:
    prefill, decode1, decode2 = workers
    config = GatewayConfig(
        model_dir=tiny_model_dir,
        served_model_name=SERVED_MODEL_NAME,
        prefill_endpoints=(prefill.endpoint,),
        decode_endpoints=(decode1.endpoint,),
        http=HttpConfig(port=0, shutdown_grace_s=1.0),
        registry=RegistryConfig(
            worker_startup_timeout_s=10.0, health_check_interval_s=3600.0, url=valkey_url
        ),
        routing=RoutingConfig(policy=PolicyKind.ROUND_ROBIN),
    )
    a, b = (GatewayServer(replace(config), tokenizer=model_tokenizer) for _ in range(2))
    url_a = loop_thread.run(a.start())
    url_b = loop_thread.run(b.start())
    try:

        async def sync_b() -> None:
            await b.registry.sync()
            await b.registry.check_all()

        def ids(server: GatewayServer) -> dict[str, str]:
            return {i.endpoint: i.id for i in server.registry.list_instances()}

        assert ids(a) == ids(b) and len(ids(a)) == 2  # one record per endpoint, shared ids

        info = loop_thread.run(a.registry.add_instance(WorkerRole.DECODE, decode2.endpoint))
        loop_thread.run(sync_b())
        on_b = {i.id: i for i in b.registry.list_instances()}
        assert on_b[info.id].endpoint == decode2.endpoint
        assert on_b[info.id].state is InstanceState.READY  # B checked it itself
        for _ in range(2):  # round-robin over D1, D2 on B
            assert _complete(url_b) == "Hello world!"
        assert len(decode1.decode_requests) == len(decode2.decode_requests) == 1

        loop_thread.run(a.registry.drain(info.id))
        loop_thread.run(sync_b())
        assert {i.id: i.state for i in b.registry.list_instances()}[info.id] is (
            InstanceState.DRAINING
        )
        for _ in range(2):
            assert _complete(url_b) == "Hello world!"
        assert len(decode2.decode_requests) == 1  # B sends nothing new to a drained instance

        loop_thread.run(a.registry.remove(info.id, wait_s=1.0))
        loop_thread.run(sync_b())
        assert decode2.endpoint not in ids(b)
        assert ids(a) == ids(b)
        assert _complete(url_a) == "Hello world!"
    finally:
        loop_thread.run(a.stop())
        loop_thread.run(b.stop())


def _spawn(model_dir: Path, registry: str, *endpoints: str) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-m", "controlplane.gateway",
        "--model-dir", str(model_dir), "--served-model-name", SERVED_MODEL_NAME,
        "--host", "127.0.0.1", "--port", "0", "--registry", registry,
        "--health-check-interval", "200ms", *endpoints,
        "--health-details", "true",  # _health maps instances by endpoint
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )


def _listening_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    assert line.startswith(LISTENING), (line, proc.poll())
    return line.removeprefix(LISTENING).strip()


def _health(url: str) -> dict[str, str]:
    """endpoint -> state, as the gateway at ``url`` sees its instances."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    return {w["endpoint"]: w["state"] for w in body["workers"]}


def test_killing_one_gateway_leaves_the_other_serving_every_worker(
    tiny_model_dir: Path,
    workers: tuple[ScriptedWorker, ScriptedWorker, ScriptedWorker],
    valkey_url: str,
) -> None:
    prefill, decode1, decode2 = workers
    g1 = _spawn(
        tiny_model_dir,
        valkey_url,
        *("--prefill", prefill.endpoint, "--decode", decode1.endpoint),
        *("--decode", decode2.endpoint),
    )
    g2 = None
    try:
        url1 = _listening_url(g1)
        g2 = _spawn(
            tiny_model_dir,
            valkey_url,
            *("--prefill", prefill.endpoint, "--decode", decode1.endpoint),
            *("--policy", "round_robin"),  # requests are counted per decode worker below
        )
        url2 = _listening_url(g2)
        every = {prefill.endpoint: "ready", decode1.endpoint: "ready", decode2.endpoint: "ready"}
        _wait_for(lambda: _health(url2) == every)  # G2 learned D2 from the registry
        assert _complete(url1) == "Hello world!"

        g1.send_signal(signal.SIGKILL)
        g1.wait(10)
        for worker in (prefill, decode1, decode2):
            worker.prefill_requests.clear()
            worker.decode_requests.clear()
        for _ in range(4):
            assert _complete(url2) == "Hello world!"
        assert len(prefill.prefill_requests) == 4
        assert len(decode1.decode_requests) == len(decode2.decode_requests) == 2
        assert _health(url2) == every
    finally:
        for proc in (g1, g2):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
