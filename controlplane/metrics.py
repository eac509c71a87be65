"""Gateway metrics in a registry of their own (several gateways can live in one test process).

Latency buckets follow vLLM's own (so dashboards line up), extended downwards because the tiny
test models answer in milliseconds.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["PROMETHEUS_CONTENT_TYPE", "GatewayMetrics"]

_PREFIX = "strata_gateway_"

_TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_ITL_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
_DECISION_BUCKETS_S = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512,
    0.1,
)  # fmt: skip
_E2E_BUCKETS_S = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
    240.0, 480.0, 960.0,
)  # fmt: skip


class GatewayMetrics:
    """All gateway series; the owner of the registry that /metrics renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        counter, gauge, histogram = self._counter, self._gauge, self._histogram
        self.requests = counter(
            "requests", "HTTP requests by route and status code", "endpoint", "status"
        )
        self.requests_in_flight = gauge("requests_in_flight", "Generation requests being served")
        self.http_connections = gauge("http_connections", "Open HTTP connections")
        self.http_connections_refused = counter(
            "http_connections_refused", "HTTP connections answered 503 at --max-connections"
        )
        self.http_write_timeouts = counter(
            "http_write_timeouts",
            "HTTP connections aborted because the client did not read for --write-timeout",
        )
        self.request_latency = histogram(
            "request_latency_seconds", "End-to-end latency of generation requests",
            _E2E_BUCKETS_S, "endpoint",
        )  # fmt: skip
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Request arrival to first token ready to send",
            _TTFT_BUCKETS_S,
        )  # fmt: skip
        self.scheduling_decision = histogram(
            "scheduling_decision_seconds",
            "Time one scheduling decision took: every instance's snapshot and the policy's choice",
            _DECISION_BUCKETS_S,
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "Gap between successive tokens (a chunk of n tokens counts n gaps of 1/n each)",
            _ITL_BUCKETS_S,
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens received")
        self.cached_prompt_tokens = counter(
            "cached_prompt_tokens", "Prompt tokens the worker that prefilled did not compute"
        )
        self.completion_tokens = counter("completion_tokens", "Completion tokens generated")
        self.kv_transfer_tokens = counter(
            "kv_transfer_tokens",
            "Prompt tokens whose KV the decode worker loaded from the store (num_external_tokens)",
        )
        self.kv_transfer_blocks = counter(
            "kv_transfer_blocks", "KV blocks handed from prefill to decode (block_keys)"
        )
        self.gateway_stop_hits = counter(
            "gateway_stop_string_hits",
            "Stop strings the gateway caught before any worker did (e.g. across the boundary)",
        )
        self.worker_errors = counter(
            "worker_errors", "Failed worker calls by rpc and kind", "rpc", "kind"
        )
        self.failovers = counter(
            "failovers",
            "Requests moved to another worker after one failed (prefill retried, decode resumed)",
            "role",
        )
        self.worker_ready = gauge(
            "worker_ready", "1 if the worker's last health check said ready", "endpoint", "role"
        )
        self.worker_restarts = counter(
            "worker_restarts", "Launched workers replaced after they stopped serving", "role"
        )
        self.worker_restarts_given_up = counter(
            "worker_restarts_given_up",
            "Launched workers left dead after too many restarts (crash loop): the pool is short",
            "role",
        )

        self.requests_rejected = counter(
            "requests_rejected",
            "Requests refused before any work: 429 (overloaded, slo_unattainable) or 503 "
            "(no_instance)",
            "reason",
        )
        self.routes = counter(
            "routes", "Scheduling decisions by policy and route (disaggregated or local_*)",
            "policy", "route",
        )  # fmt: skip
        self.predictor_ttft_mape = gauge(
            "predictor_ttft_mape",
            "Mean absolute percentage error (fraction) of predicted vs observed TTFT, last 1000",
        )
        self.predictor_tpot_mape = gauge(
            "predictor_tpot_mape",
            "Mean absolute percentage error (fraction) of predicted vs observed time per output "
            "token, last 1000",
        )
        self.profiled_instances = counter(
            "profiled_instances", "Worker profiles run to calibrate latency models", "role"
        )
        self.predictor_change_points = counter(
            "predictor_change_points",
            "Latency models rescaled at once because consecutive observations disagreed with "
            "them by more than a factor (a wrong profile, an engine that changed speed)",
            "role", "model",
        )  # fmt: skip
        self.profiles_rejected = counter(
            "profiles_rejected",
            "Worker profiles rejected as implausible (the instance kept its sibling's model or "
            "the priors) by role and reason: non_physical, sibling, observations",
            "role", "reason",
        )  # fmt: skip

    def _counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(_PREFIX + name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(_PREFIX + name, doc, labels, registry=self.registry)

    def _histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], *labels: str
    ) -> Histogram:
        return Histogram(_PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
