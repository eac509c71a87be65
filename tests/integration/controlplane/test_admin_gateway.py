"""The gateway's admin wiring: GatewayServer with ``admin_port`` set serves the admin API in front
of its own registry, and `strata admin` (its `main`, in this process, over real gRPC on loopback)
lists, adds, drains, removes and scales real instances behind a real gateway.

Workers are ScriptedWorker test doubles; `ScriptedLauncher` (a test double of the Launcher
protocol) "launches" them in the gateway's event loop, so scaling is exercised without vLLM.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenizers import Tokenizer

from controlplane.admin.config import AdminApiConfig
from controlplane.config import ConfigError, GatewayConfig, HttpConfig, RegistryConfig
from controlplane.gateway import GatewayServer
from controlplane.launch.launcher import LaunchConfig
from controlplane.text.tokenizer import ModelTokenizer
from controlplane.workers.roles import WorkerRole
from strata.admin_cli import (
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAUTHENTICATED,
    EXIT_UNREACHABLE,
)
from strata.admin_cli import main as admin_main
from strata_proto import worker_pb2
from tests.integration.controlplane.conftest import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    SERVED_MODEL_NAME,
    LoopThread,
    default_script,
)
from tests.integration.controlplane.scripted_worker import Script, ScriptedWorker

TOKEN = "gateway-admin-token-0123456789abcdef"


@dataclass(eq=False)
class ScriptedHandle:
    """A LaunchedWorker test double: one ScriptedWorker the launcher started."""

    worker: ScriptedWorker
    role: WorkerRole
    stopped: bool = False

    @property
    def endpoint(self) -> str:
        return self.worker.endpoint

    def alive(self) -> bool:
        return not self.stopped

    async def stop(self, *, timeout_s: float) -> None:
        if not self.stopped:
            self.stopped = True
            await self.worker.stop()


@dataclass
class ScriptedLauncher:
    """A Launcher test double: starts ScriptedWorkers (sharing one script) on the loopback."""

    script: Script
    tokenizer: Tokenizer
    handles: list[ScriptedHandle] = field(default_factory=list)
    closed: bool = False

    async def launch(self, role: WorkerRole) -> ScriptedHandle:
        worker = ScriptedWorker(
            role.value,
            self.script,
            self.tokenizer,
            max_model_len=MAX_MODEL_LEN,
            block_size=BLOCK_SIZE,
        )
        await worker.start()
        handle = ScriptedHandle(worker, role)
        self.handles.append(handle)
        return handle

    async def close(self) -> None:
        self.closed = True
        for handle in self.handles:
            await handle.stop(timeout_s=1.0)


@dataclass
class AdminGateway:
    loop: LoopThread
    server: GatewayServer
    launcher: ScriptedLauncher
    prefill: ScriptedWorker
    decode: ScriptedWorker
    spare: ScriptedWorker
    """A decode worker started but not configured: what `admin add` registers."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.admin_port}"

    def admin(
        self, capsys: pytest.CaptureFixture[str], *args: str, token: str = TOKEN
    ) -> tuple[int, str, str]:
        capsys.readouterr()
        code = admin_main(["--address", self.address, "--token", token, "--timeout", "10", *args])
        out, err = capsys.readouterr()
        return code, out, err

    def instances(self, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
        code, out, err = self.admin(capsys, "--json", "list")
        assert code == EXIT_OK, err
        infos: list[dict[str, Any]] = json.loads(out)
        return infos

    def wait_for(
        self,
        capsys: pytest.CaptureFixture[str],
        condition: Callable[[list[dict[str, Any]]], bool],
        timeout_s: float = 10.0,
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            infos = self.instances(capsys)
            if condition(infos):
                return infos
            assert time.monotonic() < deadline, f"condition not met; instances: {infos}"
            time.sleep(0.05)

    def complete(self) -> str:
        """One completion through the gateway's HTTP API."""
        import openai

        client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="unused", max_retries=0)
        response = client.completions.create(
            model=SERVED_MODEL_NAME, prompt="hello there", max_tokens=4
        )
        return response.choices[0].text


def _by_endpoint(infos: list[dict[str, Any]], endpoint: str) -> dict[str, Any]:
    (info,) = [i for i in infos if i["endpoint"] == endpoint]
    return info


@pytest.fixture
def gateway(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> Iterator[AdminGateway]:
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    script = default_script(tokenizer)
    prefill, decode, spare = (
        ScriptedWorker(role, script, tokenizer, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE)
        for role in (worker_pb2.ROLE_PREFILL, worker_pb2.ROLE_DECODE, worker_pb2.ROLE_DECODE)
    )
    for worker in (prefill, decode, spare):
        loop_thread.run(worker.start())
    launcher = ScriptedLauncher(script, tokenizer)
    config = GatewayConfig(
        model_dir=tiny_model_dir,
        served_model_name=SERVED_MODEL_NAME,
        prefill_endpoints=(prefill.endpoint,),
        decode_endpoints=(decode.endpoint,),
        http=HttpConfig(port=0, shutdown_grace_s=1.0),
        registry=RegistryConfig(
            worker_startup_timeout_s=10.0, health_check_interval_s=0.1, drain_timeout_s=5.0
        ),
        admin=AdminApiConfig(port=0, token=TOKEN),
    )
    server = GatewayServer(config, tokenizer=model_tokenizer, launcher=launcher)
    loop_thread.run(server.start())
    yield AdminGateway(loop_thread, server, launcher, prefill, decode, spare)
    loop_thread.run(server.stop())
    for worker in (prefill, decode, spare):
        loop_thread.run(worker.stop())


def test_list_shows_the_gateways_workers_and_health_follows_the_registry(
    gateway: AdminGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = gateway.admin(capsys, "list")
    assert code == EXIT_OK
    header, *lines = out.splitlines()
    assert header.split() == ["ID", "ROLE", "STATE", "ENDPOINT", "LOAD"]
    rows = sorted(line.split()[1:4] for line in lines)
    assert rows == [
        ["decode", "ready", gateway.decode.endpoint],
        ["prefill", "ready", gateway.prefill.endpoint],
    ]
    with grpc.insecure_channel(gateway.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The only decode worker drained: no pair can be served, health says so.
        decode_id = _by_endpoint(gateway.instances(capsys), gateway.decode.endpoint)["id"]
        assert gateway.admin(capsys, "drain", decode_id)[0] == EXIT_OK
        deadline = time.monotonic() + 10
        while (
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            != health_pb2.HealthCheckResponse.NOT_SERVING
        ):
            assert time.monotonic() < deadline, "admin health still SERVING"
            time.sleep(0.05)


def test_add_drain_remove_move_traffic_between_real_instances(
    gateway: AdminGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = gateway.admin(
        capsys, "add", "--role", "decode", "--endpoint", gateway.spare.endpoint
    )
    assert code == EXIT_OK, err
    assert gateway.spare.endpoint in out
    infos = gateway.wait_for(
        capsys, lambda i: _by_endpoint(i, gateway.spare.endpoint)["state"] == "ready"
    )
    spare = _by_endpoint(infos, gateway.spare.endpoint)
    assert (spare["role"], spare["launched"]) == ("decode", False)
    original_id = _by_endpoint(infos, gateway.decode.endpoint)["id"]

    code, out, _ = gateway.admin(capsys, "drain", original_id)
    assert code == EXIT_OK
    assert "draining" in out
    num_before = len(gateway.decode.decode_requests)
    assert gateway.complete() == "Hello w"  # the script's first 4 tokens
    assert len(gateway.decode.decode_requests) == num_before  # drained: not used
    assert len(gateway.spare.decode_requests) == 1

    assert gateway.admin(capsys, "remove", original_id, "--wait", "5")[0] == EXIT_OK
    endpoints = sorted(i["endpoint"] for i in gateway.instances(capsys))
    assert endpoints == sorted([gateway.prefill.endpoint, gateway.spare.endpoint])
    assert gateway.admin(capsys, "remove", original_id)[0] == EXIT_NOT_FOUND
    assert gateway.admin(capsys, "drain", "w999")[0] == EXIT_NOT_FOUND
    code, _, err = gateway.admin(
        capsys, "add", "--role", "decode", "--endpoint", gateway.spare.endpoint
    )
    assert code == EXIT_CONFLICT, err
    assert "ALREADY_EXISTS" in err
    assert gateway.complete() == "Hello w"  # still serving after every refused call


def test_wrong_token_is_refused_and_changes_nothing(
    gateway: AdminGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    decode_id = _by_endpoint(gateway.instances(capsys), gateway.decode.endpoint)["id"]
    code, _, err = gateway.admin(capsys, "drain", decode_id, token="wrong-token-0123456789abcdef")
    assert code == EXIT_UNAUTHENTICATED
    assert "UNAUTHENTICATED" in err
    assert _by_endpoint(gateway.instances(capsys), gateway.decode.endpoint)["state"] == "ready"


def test_scale_launches_and_retires_workers_through_the_launcher(
    gateway: AdminGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = gateway.admin(capsys, "scale", "--role", "decode", "--replicas", "2")
    assert code == EXIT_OK, err
    (handle,) = gateway.launcher.handles
    assert handle.role is WorkerRole.DECODE
    infos = gateway.wait_for(capsys, lambda i: _by_endpoint(i, handle.endpoint)["state"] == "ready")
    launched = _by_endpoint(infos, handle.endpoint)
    assert launched["launched"] is True
    # Only the launched worker left to decode: it takes the traffic.
    configured_id = _by_endpoint(infos, gateway.decode.endpoint)["id"]
    assert gateway.admin(capsys, "drain", configured_id)[0] == EXIT_OK
    assert gateway.complete() == "Hello w"
    assert len(handle.worker.decode_requests) == 1
    # Scaling below the configured worker is refused; scaling to 0 stops the launched one.
    code, _, err = gateway.admin(capsys, "scale", "--role", "prefill", "--replicas", "0")
    assert code == EXIT_CONFLICT, err
    code, _, err = gateway.admin(capsys, "scale", "--role", "decode", "--replicas", "0")
    assert code == EXIT_OK, err
    gateway.wait_for(capsys, lambda i: all(x["endpoint"] != handle.endpoint for x in i))
    deadline = time.monotonic() + 10
    while not handle.stopped:
        assert time.monotonic() < deadline, "the scaled-down worker was not stopped"
        time.sleep(0.05)


def test_stop_closes_the_launcher_and_the_admin_port(
    gateway: AdminGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.admin(capsys, "scale", "--role", "prefill", "--replicas", "2")[0] == EXIT_OK
    (handle,) = gateway.launcher.handles
    gateway.loop.run(gateway.server.stop())
    assert gateway.launcher.closed
    assert handle.stopped
    code, _, err = gateway.admin(capsys, "list")
    assert code == EXIT_UNREACHABLE, err


def test_startup_workers_are_launched_waited_for_and_scalable(
    loop_thread: LoopThread,
    tiny_model_dir: Path,
    model_tokenizer: ModelTokenizer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """launch_prefill/launch_decode with no configured endpoint at all: start-up launches them,
    waits until they are ready, and `scale` may stop them (they stay `launched`)."""
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    launcher = ScriptedLauncher(default_script(tokenizer), tokenizer)
    config = GatewayConfig(
        model_dir=tiny_model_dir,
        served_model_name=SERVED_MODEL_NAME,
        prefill_endpoints=(),
        decode_endpoints=(),
        http=HttpConfig(port=0, shutdown_grace_s=1.0),
        registry=RegistryConfig(
            worker_startup_timeout_s=10.0, health_check_interval_s=0.1, drain_timeout_s=5.0
        ),
        admin=AdminApiConfig(port=0, token=TOKEN),
        launch=LaunchConfig(store="127.0.0.1:9", prefill=1, decode=2),
    )
    server = GatewayServer(config, tokenizer=model_tokenizer, launcher=launcher)
    loop_thread.run(server.start())
    try:
        gateway = AdminGateway(loop_thread, server, launcher, *(h.worker for h in launcher.handles))
        infos = gateway.instances(capsys)
        assert sorted((i["role"], i["state"], i["launched"]) for i in infos) == [
            ("decode", "ready", True),
            ("decode", "ready", True),
            ("prefill", "ready", True),
        ]
        assert gateway.complete() == "Hello w"
        code, _, err = gateway.admin(capsys, "scale", "--role", "decode", "--replicas", "1")
        assert code == EXIT_OK, err
        gateway.wait_for(capsys, lambda i: sum(x["role"] == "decode" for x in i) == 1)
        assert sum(h.stopped for h in launcher.handles) == 1
        assert gateway.complete() == "Hello w"
    finally:
        loop_thread.run(server.stop())
    assert launcher.closed and all(h.stopped for h in launcher.handles)


def test_admin_port_without_a_token_is_a_config_error(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STRATA_ADMIN_TOKEN", raising=False)
    config = GatewayConfig(
        model_dir=tiny_model_dir,
        served_model_name=SERVED_MODEL_NAME,
        prefill_endpoints=("127.0.0.1:9",),
        decode_endpoints=("127.0.0.1:9",),
        admin=AdminApiConfig(port=0),
    )
    with pytest.raises(ConfigError, match="no admin token"):
        GatewayServer(config)
    monkeypatch.setenv("STRATA_ADMIN_TOKEN", TOKEN)
    assert GatewayServer(config).admin_port is None  # resolved, not started yet
