"""A launched worker that stops serving is replaced: real processes, a real gateway.

The gateway's real LocalProcessLauncher starts scripted workers in processes of their own
(tests/integration/controlplane/scripted_worker_process.py, a test double of `strata worker`);
a test kills one (SIGKILL of its process group) or stops it (SIGSTOP), and the gateway must kill
what is left, give its cores back, launch a replacement of the same role that becomes ready, and
keep serving throughout; a crash loop is given up after the restart limit."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from controlplane.config import GatewayConfig, HttpConfig, RegistryConfig
from controlplane.gateway import GatewayServer
from controlplane.instances.types import InstanceInfo, InstanceState
from controlplane.launch.launcher import (
    LaunchConfig,
    LocalLauncherConfig,
    LocalProcessLauncher,
    LocalWorker,
)
from controlplane.text.tokenizer import ModelTokenizer
from controlplane.workers.roles import WorkerRole
from tests.integration.controlplane.conftest import DEFAULT_TEXT, SERVED_MODEL_NAME, LoopThread
from tests.integration.controlplane.scripted_worker_process import (
    CRASH_AFTER_ENV,
    CRASH_FILE_ENV,
    stand_in_python,
)
from tests.proc_tree import descendants, wait_gone

DECODE = WorkerRole.DECODE


@dataclass
class Restarting:
    loop: LoopThread
    server: GatewayServer
    launcher: LocalProcessLauncher

    def instances(self) -> list[InstanceInfo]:
        async def read() -> list[InstanceInfo]:
            return list(self.server.registry.list_instances())

        return self.loop.run(read())

    def wait_for(
        self, condition: Callable[[list[InstanceInfo]], bool], timeout_s: float = 60.0
    ) -> list[InstanceInfo]:
        deadline = time.monotonic() + timeout_s
        while True:
            infos = self.instances()
            if condition(infos):
                return infos
            assert time.monotonic() < deadline, f"condition not met; instances: {infos}"
            time.sleep(0.05)

    def worker(self, endpoint: str) -> LocalWorker:
        (worker,) = [w for w in self.launcher.workers if w.endpoint == endpoint]
        return worker

    def complete(self) -> str:
        client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="unused", max_retries=0)
        response = client.completions.create(
            model=SERVED_MODEL_NAME, prompt="hello there", max_tokens=16
        )
        return response.choices[0].text

    def restarts(self) -> float:
        value = self.server.metrics.registry.get_sample_value(
            "strata_gateway_worker_restarts_total", {"role": "decode"}
        )
        return value or 0.0


def ready_decodes(infos: list[InstanceInfo]) -> list[InstanceInfo]:
    return [i for i in infos if i.role is DECODE and i.state is InstanceState.READY]


@pytest.fixture
def restarting(
    loop_thread: LoopThread,
    tiny_model_dir: Path,
    model_tokenizer: ModelTokenizer,
    tmp_path: Path,
) -> Iterator[Restarting]:
    launcher = LocalProcessLauncher(
        LocalLauncherConfig(
            model_dir=tiny_model_dir,
            store_endpoint="127.0.0.1:9",  # unused by the scripted workers
            python=str(stand_in_python(tmp_path)),
            cpus=(0, 1),
            log_dir=tmp_path / "logs",
            stop_timeout_s=5.0,
            startup_nice=0,
        )
    )
    config = GatewayConfig(
        model_dir=tiny_model_dir,
        served_model_name=SERVED_MODEL_NAME,
        http=HttpConfig(port=0, shutdown_grace_s=1.0),
        registry=RegistryConfig(
            worker_startup_timeout_s=60.0,
            health_check_interval_s=0.2,
            health_check_timeout_s=0.5,
            drain_timeout_s=5.0,
        ),
        launch=LaunchConfig(
            store="127.0.0.1:9",
            prefill=1,
            decode=2,
            restart_grace_s=1.0,
            restart_backoff_s=0.2,
            restart_limit=2,
            restart_window_s=600.0,
        ),
    )
    server = GatewayServer(config, tokenizer=model_tokenizer, launcher=launcher)
    loop_thread.run(server.start(), timeout_s=90.0)
    try:
        yield Restarting(loop_thread, server, launcher)
    finally:
        loop_thread.run(server.stop())
    assert launcher.workers == ()


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_a_killed_or_stopped_decode_worker_is_replaced(
    restarting: Restarting, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The gateway's secrets stay with it: a worker it starts does not inherit them.
    monkeypatch.setenv("STRATA_ADMIN_TOKEN", "gateway-only")
    monkeypatch.setenv("STRATA_GATEWAY_REGISTRY", "redis://:hunter2@10.0.0.1:6379")
    before = ready_decodes(restarting.instances())
    assert len(before) == 2
    # The scripted prefill and decode run in separate processes here (no shared script state):
    # what matters is that every worker answers the same, before and after the restart.
    expected = restarting.complete()
    assert expected.endswith(DEFAULT_TEXT)
    victim = restarting.worker(before[0].endpoint)
    tree = {victim.pid, *descendants(victim.pid)}
    # SIGKILL: the process is gone (noticed through the handle); SIGSTOP: it stops answering
    # (dead after 3 Health timeouts), and SIGKILL of the stopped tree ends it.
    os.killpg(victim.pid, signal.SIGKILL if fault == "sigkill" else signal.SIGSTOP)
    for _ in range(5):  # served by the other decode worker meanwhile
        assert restarting.complete() == expected
    after = restarting.wait_for(
        lambda infos: len(ready_decodes(infos)) == 2 and before[0].id not in {i.id for i in infos}
    )
    (replacement,) = [i for i in ready_decodes(after) if i.id != before[1].id]
    assert replacement.launched and replacement.endpoint != before[0].endpoint
    environ = Path(f"/proc/{restarting.worker(replacement.endpoint).pid}/environ").read_bytes()
    assert b"gateway-only" not in environ and b"hunter2" not in environ
    assert b"PATH=" in environ
    assert wait_gone(tree) == []
    assert victim not in restarting.launcher.workers
    assert len(restarting.launcher.workers) == 3
    cores = restarting.launcher.cores
    assert sum(cores.users(cpu) for cpu in cores.cpus) == 3  # the victim's core came back
    assert restarting.restarts() == 1.0
    for _ in range(5):
        assert restarting.complete() == expected


def test_a_crash_loop_is_given_up_after_the_limit(
    restarting: Restarting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash = tmp_path / "crash"
    crash.touch()
    monkeypatch.setenv(CRASH_FILE_ENV, str(crash))  # the launcher passes STRATA_WORKER_* on
    monkeypatch.setenv(CRASH_AFTER_ENV, "0.3")
    (first, _) = ready_decodes(restarting.instances())
    os.killpg(restarting.worker(first.endpoint).pid, signal.SIGKILL)
    # Its two replacements crash 0.3 s after start: restart limit 2, so the slot is given up.
    infos = restarting.wait_for(
        lambda infos: any(i.detail.startswith("not restarted") for i in infos)
    )
    (given_up,) = [i for i in infos if i.state is InstanceState.DEAD]
    given_up_prefix = "not restarted: restarted 2 times within 600 s (crash loop); last: "
    assert given_up.detail.startswith(given_up_prefix)
    # Its last crash was seen as the process's exit or, first on a loaded host, as its refused
    # Health: both end the replacement.
    last = given_up.detail.removeprefix(given_up_prefix)
    assert last.startswith(("its process exited", "unavailable: ")), last
    assert restarting.restarts() == 2.0
    assert len(ready_decodes(infos)) == 1
    # The given-up worker is reaped: its stop runs in the background after the note is set.
    deadline = time.monotonic() + 30
    while len(restarting.launcher.workers) != 2:
        assert time.monotonic() < deadline, restarting.launcher.workers
        time.sleep(0.05)
    assert restarting.complete().endswith(DEFAULT_TEXT)  # the pool is one short, still serving
