"""Gateway metrics in a registry of their own (several gateways can live in one test process).

Latency buckets follow vLLM's own (so dashboards line up), extended downwards because the tiny
test models answer in milliseconds.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["PROMETHEUS_CONTENT_TYPE", "GatewayMetrics"]

_TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_ITL_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
_E2E_BUCKETS_S = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
    240.0, 480.0, 960.0,
)  # fmt: skip


class GatewayMetrics:
    """All gateway series; the owner of the registry that /metrics renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "strata_gateway_"
        self.requests = Counter(
            p + "requests", "HTTP requests by route and status code", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.requests_in_flight = Gauge(
            p + "requests_in_flight", "Generation requests being served", registry=r
        )
        self.request_latency = Histogram(
            p + "request_latency_seconds", "End-to-end latency of generation requests",
            ["endpoint"], buckets=_E2E_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            p + "time_to_first_token_seconds", "Request arrival to first token ready to send",
            buckets=_TTFT_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            p + "inter_token_latency_seconds",
            "Gap between successive tokens (a chunk of n tokens counts n gaps of 1/n each)",
            buckets=_ITL_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_prompt_tokens = Counter(
            p + "cached_prompt_tokens", "Prompt tokens the worker that prefilled did not compute",
            registry=r,
        )  # fmt: skip
        self.completion_tokens = Counter(
            p + "completion_tokens", "Completion tokens generated", registry=r
        )
        self.kv_transfer_tokens = Counter(
            p + "kv_transfer_tokens",
            "Prompt tokens whose KV the decode worker loaded from the store (num_external_tokens)",
            registry=r,
        )
        self.kv_transfer_blocks = Counter(
            p + "kv_transfer_blocks", "KV blocks handed from prefill to decode (block_keys)",
            registry=r,
        )  # fmt: skip
        self.gateway_stop_hits = Counter(
            p + "gateway_stop_string_hits",
            "Stop strings the gateway caught before any worker did (e.g. across the boundary)",
            registry=r,
        )
        self.worker_errors = Counter(
            p + "worker_errors", "Failed worker calls by rpc and kind", ["rpc", "kind"], registry=r
        )
        self.failovers = Counter(
            p + "failovers",
            "Requests moved to another worker after one failed (prefill retried, decode resumed)",
            ["role"], registry=r,
        )  # fmt: skip
        self.worker_ready = Gauge(
            p + "worker_ready", "1 if the worker's last health check said ready",
            ["endpoint", "role"], registry=r,
        )  # fmt: skip

        self.requests_rejected = Counter(
            p + "requests_rejected",
            "Requests refused before any work: 429 (overloaded, slo_unattainable) or 503 "
            "(no_instance)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.routes = Counter(
            p + "routes", "Scheduling decisions by policy and route (disaggregated or local_*)",
            ["policy", "route"], registry=r,
        )  # fmt: skip
        self.predictor_ttft_mape = Gauge(
            p + "predictor_ttft_mape",
            "Mean absolute percentage error (fraction) of predicted vs observed TTFT, last 1000",
            registry=r,
        )
        self.predictor_tpot_mape = Gauge(
            p + "predictor_tpot_mape",
            "Mean absolute percentage error (fraction) of predicted vs observed time per output "
            "token, last 1000",
            registry=r,
        )
        self.profiled_instances = Counter(
            p + "profiled_instances", "Worker profiles run to calibrate latency models",
            ["role"], registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
