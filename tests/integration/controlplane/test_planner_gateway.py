"""The P:D planner in a real gateway (``--planner strata``): a planning tick after a heavy
interval launches workers up to the budget through the gateway's launcher, and they serve; a
tick after a quiet one drains and stops them, leaving the workers the operator configured.

Workers are ScriptedWorker test doubles started by a ScriptedLauncher (test_admin_gateway.py);
the loop's own timer is an hour, so the test drives each tick.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from tokenizers import Tokenizer

from controlplane.config import GatewayConfig, HttpConfig, RegistryConfig
from controlplane.gateway import GatewayServer
from controlplane.instances.types import InstanceState
from controlplane.launch.planner import PlannerSettings
from controlplane.planning import PoolSizes
from controlplane.scheduling.types import SchedulingConfig
from controlplane.text.tokenizer import ModelTokenizer
from controlplane.workers.roles import WorkerRole
from strata_proto import worker_pb2
from tests.integration.controlplane.conftest import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    SERVED_MODEL_NAME,
    LoopThread,
    default_script,
)
from tests.integration.controlplane.scripted_worker import ScriptedWorker
from tests.integration.controlplane.test_admin_gateway import ScriptedLauncher
from tests.waiting import wait_until

MAX_WORKERS = 4


@pytest.fixture
def planned(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> Iterator[tuple[GatewayServer, ScriptedLauncher]]:
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    script = default_script(tokenizer)
    prefill, decode = (
        ScriptedWorker(role, script, tokenizer, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE)
        for role in (worker_pb2.ROLE_PREFILL, worker_pb2.ROLE_DECODE)
    )
    for worker in (prefill, decode):
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
        scheduling=SchedulingConfig(
            local_prefill_threshold_tokens=0, default_ttft_slo_s=2.0, default_tpot_slo_s=0.1
        ),
        planner=PlannerSettings(
            kind="strata", interval_s=3600.0, engine_start_s=0.0, scale_down_after=1,
            max_workers=MAX_WORKERS,
        ),
    )  # fmt: skip
    server = GatewayServer(config, tokenizer=model_tokenizer, launcher=launcher)
    loop_thread.run(server.start())
    yield server, launcher
    loop_thread.run(server.stop())
    for worker in (prefill, decode):
        loop_thread.run(worker.stop())


def _active(server: GatewayServer, state: InstanceState = InstanceState.READY) -> PoolSizes:
    infos = server.registry.list_instances()
    return PoolSizes(
        sum(i.role is WorkerRole.PREFILL and i.state is state for i in infos),
        sum(i.role is WorkerRole.DECODE and i.state is state for i in infos),
    )


def test_the_planner_grows_the_pools_for_load_and_drains_them_when_it_goes(
    planned: tuple[GatewayServer, ScriptedLauncher], loop_thread: LoopThread
) -> None:
    server, launcher = planned
    assert server.planner is not None
    meter = server.registry.load_meter
    for _ in range(20_000):  # far more than four workers serve within the SLOs
        meter.arrived(200, 200)
        meter.finished(50, 0.02)
    target = loop_thread.run(server.planner.tick())
    assert target is not None and target.total == MAX_WORKERS
    assert min(target.prefill, target.decode) >= 1
    wait_until(lambda: _active(server) == target)
    assert len(launcher.handles) == MAX_WORKERS - 2  # the two configured ones stay
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model=SERVED_MODEL_NAME, prompt="hello there", max_tokens=4)
    assert reply.choices[0].text
    # A quiet interval: back to one worker each; the launched ones drain and stop.
    target = loop_thread.run(server.planner.tick())
    assert target == PoolSizes(1, 1)
    wait_until(lambda: all(h.stopped for h in launcher.handles))
    wait_until(lambda: _active(server) == PoolSizes(1, 1))
    configured = {i.endpoint for i in server.registry.list_instances() if not i.launched}
    assert len(configured) == 2


def test_each_request_feeds_the_meter_once(
    planned: tuple[GatewayServer, ScriptedLauncher], loop_thread: LoopThread
) -> None:
    server, _ = planned
    registry = server.registry
    registry.take_load_sample(1.0, None)  # start a clean interval
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    lengths = []
    for max_tokens in (1, 4, 4):  # one ends at its prefill: it is counted as finished too
        reply = client.completions.create(
            model=SERVED_MODEL_NAME, prompt="hello there", max_tokens=max_tokens
        )
        assert reply.usage is not None
        lengths.append((reply.usage.prompt_tokens, reply.usage.completion_tokens))
    sample = registry.take_load_sample(10.0, None)
    assert (sample.requests, sample.finished) == (3, 3)
    assert sample.prompt_tokens == sum(p for p, _ in lengths)
    assert sample.computed_tokens == sample.prompt_tokens  # no prefix index: nothing cached
    assert sample.output_tokens == sum(c for _, c in lengths)
    assert sample.ttft_s is not None and sample.ttft_s > 0
    assert sample.itl_s is not None  # the two 4-token requests
