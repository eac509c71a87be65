"""`strata worker --engine simulated` (simulator/worker.py) behind the real gateway, over real
gRPC and HTTP: processes as an operator starts them."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from strata_common.credentials import Identity, load_or_create_cluster_key
from strata_common.grpc_auth import ClientAuth
from strata_proto import worker_pb2, worker_pb2_grpc
from tests.e2e.dataplane_processes import Process, spawn
from tests.integration.simulator.processes import endpoints, start_simulated
from tests.waiting import wait_until


def start_gateway(
    model: Path, key_file: Path, prefill: list[str], decode: list[str], *args: str
) -> Process:
    argv = [sys.executable, "-m", "controlplane.gateway", "--model-dir", str(model)]
    argv += ["--served-model-name", "sim", "--port", "0", "--cluster-key-file", str(key_file)]
    argv += ["--prefill", ",".join(prefill), "--decode", ",".join(decode), *args]
    gateway = spawn(argv, r"strata gateway listening on (\S+)", 120)
    wanted = len(set(prefill) | set(decode))

    def all_ready() -> bool:
        try:
            with urllib.request.urlopen(f"{gateway.endpoint}/health", timeout=5) as reply:
                workers = json.load(reply)["workers"]
        except (OSError, ValueError):
            return False
        return sum(w["ready"] for w in workers) == wanted

    wait_until(all_ready, 60)  # every instance profiled and ready
    return gateway


def gateway_stub(endpoint: str, key: bytes) -> worker_pb2_grpc.WorkerStub:
    auth = ClientAuth(key, Identity("gateway", "test"))
    return worker_pb2_grpc.WorkerStub(auth.intercept(grpc.insecure_channel(endpoint)))


@pytest.fixture
def cluster(tiny_model_dir: Path, key_file: Path) -> Iterator[dict[str, object]]:
    """Two simulated prefill and two decode instances (one process each), one colocated
    instance, and a gateway before each shape."""
    started: list[Process] = []
    try:
        quick = ("--drain-notice", "0s")  # no gateway left to tell at teardown
        prefills = start_simulated(tiny_model_dir, "prefill", key_file, "--instances", "2", *quick)
        started.append(prefills)
        decodes = start_simulated(tiny_model_dir, "decode", key_file, "--instances", "2", *quick)
        started.append(decodes)
        both = start_simulated(tiny_model_dir, "both", key_file, *quick)
        started.append(both)
        split = start_gateway(
            tiny_model_dir, key_file, endpoints(prefills, 2), endpoints(decodes, 2)
        )
        started.append(split)
        # Every prompt prefilled where it is decoded (the prefill instance is never used):
        # one instance's answer.
        one = start_gateway(
            tiny_model_dir,
            key_file,
            endpoints(prefills, 2)[:1],
            endpoints(both, 1),
            "--local-prefill-threshold",
            "100000",
        )
        started.append(one)
        yield {"split": split, "one": one, "decodes": decodes, "prefills": prefills}
    finally:
        for process in reversed(started):
            process.stop()


def _client(gateway: object) -> openai.OpenAI:
    assert isinstance(gateway, Process)
    return openai.OpenAI(base_url=f"{gateway.endpoint}/v1", api_key="unused", max_retries=0)


def test_disaggregated_answers_equal_one_instances_streaming_or_not(
    cluster: dict[str, object],
) -> None:
    split, one = _client(cluster["split"]), _client(cluster["one"])
    prompts = [f"request {i}: " + "the quick brown fox " * (i * 9) for i in range(6)]
    for prompt in prompts:
        a = split.completions.create(model="sim", prompt=prompt, max_tokens=12)
        b = one.completions.create(model="sim", prompt=prompt, max_tokens=12)
        assert a.choices[0].text == b.choices[0].text and a.choices[0].text
        assert a.choices[0].finish_reason == "length" and a.usage is not None
        assert a.usage.completion_tokens == 12
        stream = split.completions.create(model="sim", prompt=prompt, max_tokens=12, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == a.choices[0].text


def test_a_client_that_leaves_mid_stream_frees_the_engine(
    cluster: dict[str, object], key_file: Path
) -> None:
    split = _client(cluster["split"])
    stream = split.completions.create(
        model="sim", prompt="a long answer please", max_tokens=2000, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    key, _ = load_or_create_cluster_key(key_file)
    decodes = cluster["decodes"]
    assert isinstance(decodes, Process)
    stubs = [gateway_stub(ep, key) for ep in endpoints(decodes, 2)]

    def idle() -> bool:
        stats = [s.Stats(worker_pb2.StatsRequest(), timeout=5) for s in stubs]
        return all(s.num_running == 0 and s.kv_blocks_in_use == 0 for s in stats)

    # Run to its end, the answer would take ~11 s (2,000 steps of ~5.4 ms): freed long before.
    wait_until(idle, 3)
    assert sum(s.Stats(worker_pb2.StatsRequest(), timeout=5).num_requests for s in stubs) >= 1
    steps = [s.Health(worker_pb2.HealthRequest(), timeout=5).num_engine_steps for s in stubs]
    time.sleep(0.5)
    assert [s.Health(worker_pb2.HealthRequest(), timeout=5).num_engine_steps for s in stubs] == (
        steps
    )  # nothing left stepping


def test_health_says_simulated_and_calls_need_the_cluster_key(
    tiny_model_dir: Path, key_file: Path
) -> None:
    worker = start_simulated(tiny_model_dir, "decode", key_file)
    try:
        endpoint = endpoints(worker, 1)[0]
        bare = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(endpoint))
        with pytest.raises(grpc.RpcError) as refused:
            bare.Health(worker_pb2.HealthRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        key, _ = load_or_create_cluster_key(key_file)
        stub = gateway_stub(endpoint, key)
        health = stub.Health(worker_pb2.HealthRequest(), timeout=5)
        assert health.ready and health.dtype == "simulated"
        assert health.hardware == "simulated:llama2-7b-h100"
        assert health.role == worker_pb2.ROLE_DECODE and health.model_fingerprint
        with pytest.raises(grpc.RpcError) as wrong_role:
            stub.Prefill(worker_pb2.PrefillRequest(request_id="p", prompt_token_ids=[5, 6]))
        assert wrong_role.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        too_long = worker_pb2.DecodeRequest(
            request_id="d",
            prompt_token_ids=[5] * health.max_model_len,
            sampling=worker_pb2.SamplingParams(max_tokens=4),
        )
        with pytest.raises(grpc.RpcError) as invalid:
            list(stub.Decode(too_long, timeout=5))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_model_len" in (invalid.value.details() or "")
        # Still serving after the refusals.
        ok = worker_pb2.DecodeRequest(
            request_id="ok",
            prompt_token_ids=[5, 6, 7],
            sampling=worker_pb2.SamplingParams(max_tokens=3),
        )
        chunks = list(stub.Decode(ok, timeout=10))
        assert [len(c.token_ids) for c in chunks] == [1, 1, 1]
        assert chunks[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH
        # SIGTERM: Health says draining while requests are still served, then it exits.
        worker.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: stub.Health(worker_pb2.HealthRequest(), timeout=5).draining, 5)
        assert len(list(stub.Decode(ok, timeout=10))) == 3
        assert worker.proc.wait(30) == 0
    finally:
        worker.stop()


def test_unknown_engine_is_refused() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "strata.cli", "worker", "--engine", "gpu-magic", "--role", "decode"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--engine is vllm or simulated" in done.stderr
