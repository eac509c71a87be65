"""An instance's scheduling snapshot is reused while nothing it shows changed, and rebuilt as
soon as anything did (controlplane/instances/instance.py, ``scheduling_snapshot``)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from controlplane.instances.instance import Instance
from controlplane.instances.store import InstanceRecord
from controlplane.instances.types import InstanceState
from controlplane.scheduling import LatencyPredictor
from controlplane.workers.client import WorkerHealth
from controlplane.workers.roles import WorkerRole


def new_instance(role: WorkerRole) -> Instance:
    """An instance, made where its worker client can be (in an event loop)."""

    async def make() -> Instance:
        return Instance(InstanceRecord("w1", role, "10.0.0.1:5000"))

    return asyncio.run(make())


def test_snapshot_is_reused_until_what_it_shows_changes() -> None:
    instance = new_instance(WorkerRole.DECODE)
    first = instance.scheduling_snapshot(0.9, 1.0)
    assert instance.scheduling_snapshot(0.9, 2.0) is first  # nothing changed

    instance.num_running_decodes, instance.num_context_tokens = 1, 40
    second = instance.scheduling_snapshot(0.9, 3.0)
    assert second is not first
    assert (second.load.running_decodes, second.load.decode_context_tokens) == (1, 40)
    assert instance.scheduling_snapshot(0.9, 4.0) is second

    instance.health = WorkerHealth(True, WorkerRole.DECODE, "m", 16, 4096, 8, kv_source="src")
    third = instance.scheduling_snapshot(0.9, 5.0)
    assert (third.capacity, third.kv_source) == (8, "src")
    instance.health = replace(instance.health, capacity=16)  # a new health answer
    assert instance.scheduling_snapshot(0.9, 6.0).capacity == 16

    instance.state = InstanceState.READY
    assert instance.scheduling_snapshot(0.9, 7.0).state is InstanceState.READY
    instance.role = WorkerRole.PREFILL  # set-role
    assert instance.scheduling_snapshot(0.9, 8.0).role is WorkerRole.PREFILL
    instance.predictor = LatencyPredictor()
    assert instance.scheduling_snapshot(0.9, 9.0).predictor is instance.predictor


def test_a_new_margin_rebuilds_the_snapshot() -> None:
    instance = new_instance(WorkerRole.PREFILL)
    assert instance.scheduling_snapshot(0.9, 0.0).ttft_margin == 1.0
    for i in range(10):  # TTFTs twice what was predicted
        instance.predictor.observe_ttft(0.1, 0.2, float(i))
    assert instance.scheduling_snapshot(0.9, 10.0).ttft_margin == 2.0
    # Once the ratios expire (30 s), the margin is 1 again, and so is the snapshot's.
    assert instance.scheduling_snapshot(0.9, 100.0).ttft_margin == 1.0
