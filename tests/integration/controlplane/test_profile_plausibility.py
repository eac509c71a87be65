"""A poisoned start-up profile through the real gateway and real gRPC workers: the second
prefill worker of the same model and hardware reports engine times 10x the first's; its profile
is rejected against the first's (profile state, metric) and it keeps the first's model."""

from __future__ import annotations

import time
from pathlib import Path

from tokenizers import Tokenizer

from controlplane.text.tokenizer import ModelTokenizer
from controlplane.workers.roles import WorkerRole
from strata_proto import worker_pb2
from tests.integration.controlplane.conftest import LoopThread, default_script
from tests.integration.controlplane.test_routing import (
    RoutingWorker,
    start_routing,
    stop_routing,
)

HARDWARE = "cpu/test-isa/2c/float32"


class SameHardwareWorker(RoutingWorker):
    """A RoutingWorker that reports a hardware identity (siblings need one) and engine times
    ``factor`` times COST's."""

    factor = 1.0

    async def Health(self, request, context):  # type: ignore[no-untyped-def]
        reply = await super().Health(request, context)
        reply.hardware = HARDWARE
        return reply

    async def Prefill(self, request, context):  # type: ignore[no-untyped-def]
        reply = await super().Prefill(request, context)
        reply.engine_time_s *= self.factor
        return reply


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.05)


def test_a_poisoned_profile_is_rejected_against_its_sibling(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> None:
    routing = start_routing(
        loop_thread,
        tiny_model_dir,
        model_tokenizer,
        num_prefill=1,  # reports no hardware identity: no sibling of the two below
        num_decode=1,
        profiling={"enabled": True, "max_model_len": 128, "max_batch": 2},
    )
    worker_tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    script = default_script(worker_tokenizer)
    workers = []
    try:
        registry = routing.registry
        ids = []
        for index, factor in enumerate((1.0, 10.0)):
            worker = SameHardwareWorker(
                worker_pb2.ROLE_PREFILL, script, worker_tokenizer, f"engine-p{index}"
            )
            worker.factor = factor
            loop_thread.run(worker.start())
            workers.append(worker)
            info = loop_thread.run(registry.add_instance(WorkerRole.PREFILL, worker.endpoint))
            ids.append(info.id)
            instance = registry.get(info.id)
            loop_thread.run(registry.check_all())
            wait_for(lambda i=instance: i.profile_state not in ("not run", "running"), "profile")
        first, second = (registry.get(i) for i in ids)
        assert first.profile_state == "done"
        assert second.profile_state.startswith("rejected: prefill 10.0x slower than ")
        assert second.predictor.prefill_fit == first.predictor.prefill_fit
        assert (
            routing.metric(
                'strata_gateway_profiles_rejected_total{reason="sibling",role="prefill"}'
            )
            == 1
        )
    finally:
        stop_routing(routing)
        for worker in workers:
            loop_thread.run(worker.stop())
