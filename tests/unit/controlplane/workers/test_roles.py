"""WorkerRole mirrors the proto's Role enum, value for value, without importing grpc."""

from __future__ import annotations

import subprocess
import sys

from controlplane.workers.roles import WorkerRole
from strata_proto import worker_pb2


def test_values_are_the_protos() -> None:
    proto = dict(worker_pb2.Role.items())
    assert {f"ROLE_{role.name}": role.value for role in WorkerRole} == proto


def test_can_serve() -> None:
    assert WorkerRole.BOTH.can_serve(WorkerRole.PREFILL)
    assert WorkerRole.DECODE.can_serve(WorkerRole.DECODE)
    assert not WorkerRole.PREFILL.can_serve(WorkerRole.DECODE)


def test_scheduling_does_not_load_grpc() -> None:
    code = "import sys, controlplane.scheduling; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
