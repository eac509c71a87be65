"""controlplane.request.routing and controlplane.workers.profiling: SLO headers, Reject → HTTP
answer, KV bytes per token, block keys as the connector computes them, the bounded profile plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from controlplane.api.openai_protocol import OpenAIError
from controlplane.instances.instance import KVIdentity
from controlplane.request.routing import (
    RejectedRequest,
    Router,
    kv_bytes_per_token,
    parse_slo_headers,
    rejection_error,
)
from controlplane.scheduling import Reject, RejectReason
from controlplane.workers.profiling import ProfileSettings, plan_for
from controlplane.workers.roles import WorkerRole
from kvstore.blocks.hashing import block_keys, root_key


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, (None, None)),
        ({"x-strata-ttft-slo-ms": "250"}, (0.25, None)),
        ({"x-strata-tpot-slo-ms": " 12.5 "}, (None, 0.0125)),
        ({"x-strata-ttft-slo-ms": "1000", "x-strata-tpot-slo-ms": "40"}, (1.0, 0.04)),
    ],
)
def test_slo_headers(headers: dict[str, str], expected: tuple[float | None, float | None]) -> None:
    assert parse_slo_headers(headers) == expected


@pytest.mark.parametrize("value", ["", "abc", "0", "-1", "nan", "inf", "1e12", "1,5"])
def test_bad_slo_header(value: str) -> None:
    with pytest.raises(OpenAIError) as caught:
        parse_slo_headers({"x-strata-tpot-slo-ms": value})
    error = caught.value
    assert (error.status, error.param, error.code) == (
        400,
        "x-strata-tpot-slo-ms",
        "invalid_slo_header",
    )


class _Registry:
    """What rejection_error and Router read from the registry."""

    def __init__(self, identity: KVIdentity | None = None) -> None:
        self.identity = identity

    def describe_role(self, role: WorkerRole) -> str:
        return f"no {role.name.lower()} worker is ready (a:1: dead, refused)"

    def kv_identity(self) -> KVIdentity | None:
        return self.identity


@pytest.mark.parametrize(
    ("reject", "status", "code", "retry_after"),
    [
        (Reject(RejectReason.OVERLOADED, 1.11), 429, "overloaded", 2),
        (Reject(RejectReason.OVERLOADED, 3.0), 429, "overloaded", 3),
        (Reject(RejectReason.OVERLOADED, 0.2), 429, "overloaded", 1),
        (Reject(RejectReason.SLO_UNATTAINABLE, None), 429, "slo_unattainable", None),
        (Reject(RejectReason.NO_INSTANCE, None), 503, "worker_unavailable", None),
    ],
)
def test_rejection_error(reject: Reject, status: int, code: str, retry_after: int | None) -> None:
    error = rejection_error(reject, _Registry())  # type: ignore[arg-type]
    assert isinstance(error, RejectedRequest)
    assert (error.status, error.code, error.retry_after_s) == (status, code, retry_after)
    assert error.type == ("server_error" if status == 503 else "rate_limit_error")
    assert "a:1" not in error.message  # no worker endpoint reaches the client


def _config(tmp_path: Path, **fields: Any) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(fields))
    return tmp_path


def test_kv_bytes_per_token(tmp_path: Path) -> None:
    # Llama-3-8B: 32 layers x 8 KV heads x 128 x (K, V) x 2 bytes.
    llama = _config(
        tmp_path,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_size=4096,
    )
    assert kv_bytes_per_token(llama, default=1) == 131_072


def test_kv_bytes_per_token_head_dim_and_defaults(tmp_path: Path) -> None:
    explicit = _config(
        tmp_path, num_hidden_layers=2, num_attention_heads=4, head_dim=16, hidden_size=4096
    )
    assert kv_bytes_per_token(explicit, default=1) == 2 * 2 * 4 * 16 * 2  # no GQA: 4 KV heads
    assert kv_bytes_per_token(_config(tmp_path, hidden_size=64), default=7) == 7
    assert kv_bytes_per_token(tmp_path / "missing", default=7) == 7


def test_router_computes_the_connectors_block_keys() -> None:
    fingerprint = bytes(range(16))
    layout = "cpu/L4/H2/D32/B4/auto/torch.bfloat16"
    router = Router(_Registry(KVIdentity(fingerprint, layout, 4)), None)  # type: ignore[arg-type]
    prompt = list(range(100, 111))  # two full blocks of 4 and a tail
    for salt in ("", "tenant-a"):
        assert router.block_keys(prompt, salt) == block_keys(
            prompt, 4, root_key(fingerprint, layout, salt)
        )
    assert router.block_keys(prompt, "") != router.block_keys(prompt, "tenant-a")
    assert len(router.block_keys(prompt, "")) == 2


def test_router_without_identity_or_index_knows_nothing_cached() -> None:
    assert Router(_Registry(None), None).block_keys([1, 2, 3, 4, 5], "") == []  # type: ignore[arg-type]


def test_profile_plan_is_bounded_by_the_settings() -> None:
    settings = ProfileSettings(max_model_len=1024, max_batch=8, repeats=1)
    plan = plan_for(settings, max_model_len=8192, block_size=16, capacity=64)
    assert plan.repeats == 1
    assert max(n + c for n, c in plan.prefill_points) <= 1023
    assert max(b for b, _ in plan.decode_points) == 8
    small = plan_for(settings, max_model_len=512, block_size=16, capacity=4)
    assert max(n + c for n, c in small.prefill_points) <= 511
    assert max(b for b, _ in small.decode_points) == 4
