"""dataplane/service.py's handlers over a stand-in ServedWorker: what Health and Stats report,
and the checks a Prefill or Decode passes before the engine sees it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from dataplane.config import WorkerConfig, WorkerRole
from dataplane.counters import EngineProgress, WorkerCounters
from dataplane.service import WorkerService, sampling_params
from strata_proto import worker_pb2


@dataclass
class StandInWorker:
    """A ServedWorker without an engine: generate must not be reached by these tests."""

    config: WorkerConfig
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    progress: EngineProgress = field(default_factory=EngineProgress)
    ready: bool = True
    draining: bool = False
    block_size: int = 16
    max_model_len: int = 64
    kv_capacity_tokens: int = 4096
    dtype: str = "float32"
    hardware: str = "cpu/test"

    async def generate(
        self, prompt: dict[str, Any], sampling: Any, request_id: str
    ) -> AsyncGenerator[Any, None]:
        raise AssertionError("the engine was reached")
        yield  # pragma: no cover

    def kv_identity(self) -> dict[str, Any]:
        return {"kv_source": "w1", "model_fingerprint": b"f" * 8, "kv_layout": "test"}


class Aborted(Exception):
    pass


class Context:
    """The grpc.aio context's abort: raises with the status code and details."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def worker(tmp_path: Path, role: WorkerRole = WorkerRole.BOTH) -> StandInWorker:
    (tmp_path / "config.json").write_text("{}")
    config = WorkerConfig(role=role, model_dir=tmp_path, store_endpoint="127.0.0.1:1")
    return StandInWorker(config)


def test_health_and_stats_report_the_worker(tmp_path: Path) -> None:
    w = worker(tmp_path, WorkerRole.DECODE)
    w.counters.add_kv({"blocks_loaded": 3, "heap_trims": 2, "heap_trimmed_bytes": 5 << 20})
    w.draining = True
    service = WorkerService(w)
    health = asyncio.run(service.Health(worker_pb2.HealthRequest(), None))
    assert (health.ready, health.role, health.draining) == (True, worker_pb2.ROLE_DECODE, True)
    assert (health.block_size, health.max_model_len, health.capacity) == (16, 64, 32)
    assert health.kv_capacity_tokens == 4096
    assert (health.kv_source, health.kv_layout, health.hardware) == ("w1", "test", "cpu/test")
    stats = asyncio.run(service.Stats(worker_pb2.StatsRequest(), None))
    assert (stats.kv_blocks_loaded, stats.engine_heap_trims) == (3, 2)
    assert stats.engine_heap_trimmed_bytes == 5 << 20


@pytest.mark.parametrize(
    ("role", "rpc", "tokens", "ready", "code"),
    [
        (WorkerRole.DECODE, "Prefill", [1, 2], True, grpc.StatusCode.FAILED_PRECONDITION),
        (WorkerRole.PREFILL, "Decode", [1, 2], True, grpc.StatusCode.FAILED_PRECONDITION),
        (WorkerRole.BOTH, "Prefill", [1, 2], False, grpc.StatusCode.UNAVAILABLE),
        (WorkerRole.BOTH, "Decode", [], True, grpc.StatusCode.INVALID_ARGUMENT),
        (WorkerRole.BOTH, "Prefill", list(range(64)), True, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_requests_the_worker_cannot_serve_are_refused_before_the_engine(
    tmp_path: Path, role: WorkerRole, rpc: str, tokens: list[int], ready: bool, code: Any
) -> None:
    w = worker(tmp_path, role)
    w.ready = ready
    service = WorkerService(w)
    with pytest.raises(Aborted) as refused:
        asyncio.run(service._check(Context(), rpc, tokens))  # type: ignore[arg-type]
    assert refused.value.args[0] is code
    assert w.counters.num_requests == 0


def test_the_sampling_extensions_reach_the_engine(tmp_path: Path) -> None:
    """worker.proto's zero values are "off"; the rest become vLLM's SamplingParams fields."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.DELTA
    off = sampling_params(worker_pb2.SamplingParams(max_tokens=4), 4, kind)
    default = SamplingParams(max_tokens=4)
    assert (off.top_k, off.min_p, off.repetition_penalty, off.min_tokens) == (
        default.top_k,
        0.0,
        1.0,
        0,
    )
    assert (off.presence_penalty, off.frequency_penalty, off.logit_bias) == (0.0, 0.0, None)
    on = worker_pb2.SamplingParams(  # not greedy: vLLM turns top_k and min_p off for greedy
        max_tokens=4, temperature=0.5, top_k=40, min_p=0.25, repetition_penalty=1.5, min_tokens=9
    )
    params = sampling_params(on, 4, kind)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (40, 0.25, 1.5)
    assert params.min_tokens == 4  # never more than the call may generate
    penalized = worker_pb2.SamplingParams(
        max_tokens=4, presence_penalty=-1.5, frequency_penalty=0.25, logit_bias={7: -100.0, 9: 2.5}
    )
    params = sampling_params(penalized, 4, kind)
    assert (params.presence_penalty, params.frequency_penalty) == (-1.5, 0.25)
    assert params.logit_bias == {7: -100.0, 9: 2.5}


@pytest.mark.parametrize(
    "fields",
    [
        {"logit_bias": {3: 101.0}},
        {"logit_bias": {3: float("nan")}},
        {"presence_penalty": 2.5},
        {"frequency_penalty": float("-inf")},
        {"repetition_penalty": float("inf")},
        {"top_p": 1.5},
    ],
)
def test_sampling_values_vllm_refuses_are_invalid_argument(
    tmp_path: Path, fields: dict[str, Any]
) -> None:
    """A call from elsewhere than the gateway, with values it would have refused: the call ends
    with INVALID_ARGUMENT, not an error inside the servicer."""
    from vllm.sampling_params import RequestOutputKind

    service = WorkerService(worker(tmp_path))
    sp = worker_pb2.SamplingParams(max_tokens=4, temperature=0.5, **fields)
    with pytest.raises(Aborted) as refused:
        asyncio.run(service._sampling(Context(), sp, 4, RequestOutputKind.DELTA))  # type: ignore[arg-type]
    assert refused.value.args[0] is grpc.StatusCode.INVALID_ARGUMENT


def test_token_logprobs_are_the_sampled_token_s_and_the_top_ones_by_rank() -> None:
    from vllm.logprobs import Logprob

    from dataplane.service import token_logprobs

    # vLLM's dict per position: the sampled token first (here rank 3), then the top ranks.
    steps = [
        {9: Logprob(-2.5, 3), 4: Logprob(-0.25, 1), 7: Logprob(-1.0, 2)},
        {4: Logprob(-0.5, 1)},
    ]
    sent = token_logprobs([9, 4], steps, num_top=2)
    assert [(s.logprob, list(s.top_token_ids), list(s.top_logprobs)) for s in sent] == [
        (-2.5, [4, 7], [-0.25, -1.0]),
        (-0.5, [4], [-0.5]),
    ]
    assert token_logprobs([9], None, num_top=2) == []  # not asked for
    assert [list(s.top_token_ids) for s in token_logprobs([9], steps[:1], num_top=0)] == [[]]


def test_structured_output_reaches_the_engine_as_vllm_s_params() -> None:
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.DELTA
    schema = worker_pb2.StructuredOutput(
        json_schema='{"type":"object"}', disable_any_whitespace=True
    )
    choice = worker_pb2.StructuredOutput(choice=worker_pb2.StringList(values=["a", "b"]))
    cases = [
        (schema, ("json", '{"type":"object"}')),
        (worker_pb2.StructuredOutput(json_object=True), ("json_object", True)),
        (worker_pb2.StructuredOutput(regex="[0-9]+"), ("regex", "[0-9]+")),
        (choice, ("choice", ["a", "b"])),
        (worker_pb2.StructuredOutput(grammar='root ::= "x"'), ("grammar", 'root ::= "x"')),
    ]
    for structured, (name, value) in cases:
        sp = worker_pb2.SamplingParams(max_tokens=4, structured=structured)
        params = sampling_params(sp, 4, kind).structured_outputs
        assert getattr(params, name) == value
    assert (
        sampling_params(worker_pb2.SamplingParams(max_tokens=4), 4, kind).structured_outputs is None
    )
    assert (
        sampling_params(
            worker_pb2.SamplingParams(max_tokens=4, structured=structured), 4, kind
        ).structured_outputs.disable_any_whitespace
        is False
    )
    # A constraint-less message (from elsewhere than the gateway) is refused.
    with pytest.raises(ValueError):
        sampling_params(
            worker_pb2.SamplingParams(
                max_tokens=4, structured=worker_pb2.StructuredOutput(disable_any_whitespace=True)
            ),
            4,
            kind,
        )
    assert sampling_params(
        worker_pb2.SamplingParams(max_tokens=4, structured=schema), 4, kind
    ).structured_outputs.disable_any_whitespace
