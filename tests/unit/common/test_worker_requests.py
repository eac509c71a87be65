"""The Worker services' shared refusals (strata_common/worker_requests.py)."""

from __future__ import annotations

import grpc
import pytest

from strata_common.worker_requests import request_refusal

C = grpc.StatusCode


@pytest.mark.parametrize(
    ("rpc", "role", "ready", "tokens", "expected"),
    [
        ("Prefill", "prefill", True, 5, None),
        ("Decode", "decode", True, 5, None),
        ("Prefill", "both", True, 5, None),
        ("Decode", "both", True, 99, None),
        ("Prefill", "decode", True, 5, (C.FAILED_PRECONDITION, "this is a decode worker")),
        ("Decode", "prefill", True, 5, (C.FAILED_PRECONDITION, "this is a prefill worker")),
        ("Decode", "decode", False, 5, (C.UNAVAILABLE, "worker is not ready")),
        ("Decode", "decode", True, 0, (C.INVALID_ARGUMENT, "prompt_token_ids is empty")),
        (
            "Prefill",
            "prefill",
            True,
            100,
            (C.INVALID_ARGUMENT, "prompt of 100 tokens does not fit max_model_len 100"),
        ),
    ],
)
def test_refusals(
    rpc: str, role: str, ready: bool, tokens: int, expected: tuple[C, str] | None
) -> None:
    assert request_refusal(rpc, role, ready=ready, num_tokens=tokens, max_model_len=100) == expected


def test_a_decode_must_ask_for_a_token() -> None:
    kw = {"ready": True, "num_tokens": 5, "max_model_len": 100}
    assert request_refusal("Decode", "decode", max_tokens=1, **kw) is None
    assert request_refusal("Decode", "decode", max_tokens=0, **kw) == (
        C.INVALID_ARGUMENT,
        "max_tokens must be >= 1",
    )
