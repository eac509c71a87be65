"""The checks every Worker service (proto/strata_proto/worker.proto) makes before it takes a
Prefill or Decode call — vLLM's (dataplane/service.py) and the simulated engine's
(simulator/worker.py) — so that both refuse the same calls with the same status."""

from __future__ import annotations

import grpc

__all__ = ["request_refusal"]


def request_refusal(
    rpc: str,
    role: str,
    *,
    ready: bool,
    num_tokens: int,
    max_model_len: int,
    max_tokens: int | None = None,
) -> tuple[grpc.StatusCode, str] | None:
    """Why a worker of ``role`` ("prefill", "decode" or "both") refuses the ``rpc`` ("Prefill"
    or "Decode") of a prompt of ``num_tokens`` tokens (a Decode: asking for ``max_tokens``), as
    a gRPC status and its details; None when it takes it."""
    if rpc == "Prefill" and role == "decode":
        return grpc.StatusCode.FAILED_PRECONDITION, "this is a decode worker"
    if rpc == "Decode" and role == "prefill":
        return grpc.StatusCode.FAILED_PRECONDITION, "this is a prefill worker"
    if not ready:
        return grpc.StatusCode.UNAVAILABLE, "worker is not ready"
    if num_tokens == 0:
        return grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty"
    if num_tokens >= max_model_len:
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"prompt of {num_tokens} tokens does not fit max_model_len {max_model_len}",
        )
    if max_tokens is not None and max_tokens < 1:
        return grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be >= 1"
    return None
