"""Scheduling through the real gateway: SLO headers, 429 + Retry-After, policy switching, prefill
skipping (conditional disaggregation), the start-up profile and the prefix index.

Workers are ScriptedWorker test doubles on loopback (RoutingWorker adds what a real worker's
Health reports for scheduling: capacity and KV identity, and a prefill engine time that follows a
known cost model, so the profile's fit can be checked exactly). Background health checks are off
(interval 1 h): only requests and explicit calls change state.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from controlplane.config import GatewayConfig, HttpConfig, RegistryConfig
from controlplane.gateway import GatewayServer
from controlplane.instances.types import InstanceState, InvalidAdminRequest
from controlplane.request.routing import Router
from controlplane.scheduling import NO_CACHE, Assign, CachedPrefix, RequestSnapshot
from controlplane.scheduling.policies import PolicyKind
from controlplane.text.tokenizer import ModelTokenizer
from controlplane.workers.profiling import ProfileSettings
from kvstore.blocks.hashing import block_keys, root_key
from kvstore.blocks.tier import Tier
from kvstore.cluster.events import BlocksStored, SourceCleared, encode_event
from kvstore.metadata import RedisMetadataStore
from strata_common.options import replace_nested
from strata_proto import worker_pb2
from tests.integration.controlplane.conftest import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    SERVED_MODEL_NAME,
    LoopThread,
    default_script,
)
from tests.integration.controlplane.scripted_worker import EOS_TOKEN_ID, Script, ScriptedWorker
from tests.integration.kvstore.valkey_fixture import valkey_url

__all__ = ["valkey_url"]  # a fixture, imported to be found

FINGERPRINT = bytes(range(16))
LAYOUT = "test/L2/H2/D8/B16"
CAPACITY = 4
# The cost model RoutingWorker's prefills report as engine time (a0 + a1·n + a2·c + a3·pairs).
COST = (0.002, 1.0e-5, 2.0e-6, 1.0e-8)


class RoutingWorker(ScriptedWorker):
    """ScriptedWorker + what scheduling reads from a real worker's Health (capacity, KV
    identity, event source), and prefill engine times from ``COST``; the prefix cache is the
    longest earlier prompt that starts this one, in whole blocks (as vLLM's)."""

    def __init__(self, role: int, script: Script, tokenizer: Tokenizer, source: str) -> None:
        super().__init__(
            role, script, tokenizer, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE
        )
        self.source = source
        self.seen: list[tuple[int, ...]] = []

    async def Health(self, request, context):  # type: ignore[no-untyped-def]
        reply = await super().Health(request, context)
        reply.capacity = CAPACITY
        reply.kv_source = self.source
        reply.model_fingerprint = FINGERPRINT
        reply.kv_layout = LAYOUT
        return reply

    async def Prefill(self, request, context):  # type: ignore[no-untyped-def]
        prompt = tuple(request.prompt_token_ids)
        cached = 0
        for earlier in self.seen:
            common = 0
            for a, b in zip(earlier, prompt, strict=False):
                if a != b:
                    break
                common += 1
            cached = max(cached, min(common, len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE)
        self.seen.append(prompt)
        reply = await super().Prefill(request, context)
        new = len(prompt) - cached
        a0, a1, a2, a3 = COST
        reply.num_cached_tokens = cached
        reply.engine_time_s = (
            a0 + a1 * new + a2 * cached + a3 * (new * cached + new * (new + 1) / 2)
        )
        return reply


@dataclass
class Routing:
    loop: LoopThread
    script: Script
    prefills: list[RoutingWorker]
    decodes: list[RoutingWorker]
    server: GatewayServer
    url: str
    tokenizer: Tokenizer

    @property
    def registry(self) -> Any:
        return self.server.registry

    def post(
        self, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        url = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=20)
        try:
            conn.request(
                "POST",
                "/v1/completions",
                json.dumps(body),
                {"Content-Type": "application/json", **(headers or {})},
            )
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def metric(self, series: str) -> float:
        """The value of one exposed series (name plus labels, as rendered); 0 if absent."""
        for line in self.server.metrics.render().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.rpartition(" ")[2])
        return 0.0


def start_routing(
    loop: LoopThread,
    model_dir: Path,
    tokenizer: ModelTokenizer,
    *,
    num_prefill: int = 2,
    num_decode: int = 2,
    **config_overrides: Any,
) -> Routing:
    worker_tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    script = default_script(worker_tokenizer)
    prefills = [
        RoutingWorker(worker_pb2.ROLE_PREFILL, script, worker_tokenizer, f"engine-p{i}")
        for i in range(num_prefill)
    ]
    decodes = [
        RoutingWorker(worker_pb2.ROLE_DECODE, script, worker_tokenizer, f"engine-d{i}")
        for i in range(num_decode)
    ]
    for worker in (*prefills, *decodes):
        loop.run(worker.start())
    config = GatewayConfig(
        model_dir=model_dir,
        served_model_name=SERVED_MODEL_NAME,
        prefill_endpoints=tuple(w.endpoint for w in prefills),
        decode_endpoints=tuple(w.endpoint for w in decodes),
        http=HttpConfig(port=0, shutdown_grace_s=1.0),
        registry=RegistryConfig(worker_startup_timeout_s=10.0, health_check_interval_s=3600.0),
        profiling=ProfileSettings(enabled=False),
    )
    server = GatewayServer(replace_nested(config, **config_overrides), tokenizer=tokenizer)
    url = loop.run(server.start())
    return Routing(loop, script, prefills, decodes, server, url, worker_tokenizer)


def stop_routing(routing: Routing) -> None:
    routing.loop.run(routing.server.stop())
    for worker in (*routing.prefills, *routing.decodes):
        routing.loop.run(worker.stop())


@pytest.fixture
def routing(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> Iterator[Routing]:
    routing = start_routing(loop_thread, tiny_model_dir, model_tokenizer)
    yield routing
    stop_routing(routing)


def _body(prompt: str | list[int] = "Tell me a story", **extra: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": 20, **extra}


def _text(raw: bytes) -> str:
    text: str = json.loads(raw)["choices"][0]["text"]
    return text


def _error(raw: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(raw)["error"]
    return error


# -- SLO headers and admission ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-strata-ttft-slo-ms", "fast"),
        ("x-strata-ttft-slo-ms", "0"),
        ("x-strata-tpot-slo-ms", "-5"),
        ("x-strata-tpot-slo-ms", "nan"),
        ("x-strata-tpot-slo-ms", "inf"),
    ],
)
def test_bad_slo_header_is_a_400_openai_error(routing: Routing, header: str, value: str) -> None:
    status, _, raw = routing.post(_body(), {header: value})
    assert status == 400, raw
    error = _error(raw)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        header,
        "invalid_slo_header",
    )
    assert repr(value) in error["message"]
    assert all(not w.prefill_requests and not w.decode_requests for w in routing.prefills)
    assert routing.post(_body())[0] == 200  # and the gateway keeps serving


def test_unattainable_slo_is_a_429_without_retry_after(routing: Routing) -> None:
    # The priors predict > 10 ms for any prefill: a 1 ms TTFT SLO cannot be met even when idle.
    status, headers, raw = routing.post(_body(), {"x-strata-ttft-slo-ms": "1"})
    assert status == 429, raw
    assert "Retry-After" not in headers
    error = _error(raw)
    assert (error["type"], error["code"]) == ("rate_limit_error", "slo_unattainable")
    assert "retrying will not help" in error["message"]
    # Refused before any work: no worker saw it.
    assert not any(w.prefill_requests or w.decode_requests for w in routing.decodes)
    assert not any(w.prefill_requests for w in routing.prefills)
    assert routing.metric('strata_gateway_requests_rejected_total{reason="slo_unattainable"}') == 1
    assert routing.registry.stats().requests_rejected == 1


def test_overload_is_a_429_with_retry_after_and_a_relaxed_slo_passes(routing: Routing) -> None:
    prompt = routing.tokenizer.encode("Tell me a story", add_special_tokens=False).ids

    async def predicted_tpot_s() -> float:  # on the gateway's loop, like the request path
        decision = routing.registry.decide(
            RequestSnapshot(num_prompt_tokens=len(prompt), max_tokens=20, block_size=BLOCK_SIZE)
        )
        assert isinstance(decision, Assign)
        return float(decision.predicted_tpot_s)

    idle_tpot_s = routing.loop.run(predicted_tpot_s())
    # Keep one long decode running on each decode worker: every TPOT prediction grows.
    routing.script.decode_delay_s = 0.02
    routing.script.token_ids = routing.script.token_ids * 20
    streams = []
    for num_started in (1, 2):
        url = urllib.parse.urlsplit(routing.url)
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
        body = json.dumps(_body(stream=True, max_tokens=100))
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        response.readline()
        streams.append((conn, response))
        deadline = time.monotonic() + 10  # its decode has begun: the next choice sees it
        while sum(len(w.decode_requests) for w in routing.decodes) < num_started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    # slo_aware put the second stream on the idle decode worker (lowest TPOT).
    assert [len(w.decode_requests) for w in routing.decodes] == [1, 1]
    try:
        busy_tpot_s = routing.loop.run(predicted_tpot_s())
        assert busy_tpot_s > idle_tpot_s
        slo_ms = (idle_tpot_s + busy_tpot_s) / 2 * 1000
        status, headers, raw = routing.post(_body(), {"x-strata-tpot-slo-ms": f"{slo_ms:.6f}"})
        assert status == 429, raw
        assert int(headers["Retry-After"]) >= 1
        assert _error(raw)["code"] == "overloaded"
        assert routing.metric('strata_gateway_requests_rejected_total{reason="overloaded"}') == 1
        relaxed = f"{busy_tpot_s * 2 * 1000:.6f}"
        assert routing.post(_body(), {"x-strata-tpot-slo-ms": relaxed})[0] == 200
    finally:
        routing.script.decode_delay_s = 0.0
        for conn, response in streams:
            response.read()
            conn.close()
    status, _, raw = routing.post(_body(), {"x-strata-tpot-slo-ms": f"{slo_ms:.6f}"})
    assert status == 200, raw  # idle again: the same SLO is met


def test_no_decode_worker_is_a_503_before_any_prefill(routing: Routing) -> None:
    for worker in routing.decodes:
        routing.loop.run(worker.stop())
    routing.loop.run(routing.registry.check_all())
    status, headers, raw = routing.post(_body())
    assert status == 503, raw
    assert "Retry-After" not in headers
    assert _error(raw)["code"] == "worker_unavailable"
    assert "no decode worker is ready" in _error(raw)["message"]
    assert not any(w.prefill_requests for w in routing.prefills)
    assert routing.metric('strata_gateway_requests_rejected_total{reason="no_instance"}') == 1


# -- policies --------------------------------------------------------------------------------


def test_policy_switches_at_run_time(routing: Routing) -> None:
    registry = routing.registry
    assert registry.policy == "slo_aware"  # the default
    for _ in range(2):  # idle instances: ties go to the first listed
        assert routing.post(_body())[0] == 200
    assert [len(w.prefill_requests) for w in routing.prefills] == [2, 0]
    assert [len(w.decode_requests) for w in routing.decodes] == [2, 0]

    registry.set_policy("round_robin")
    for _ in range(4):
        assert routing.post(_body())[0] == 200
    assert [len(w.prefill_requests) for w in routing.prefills] == [4, 2]
    assert [len(w.decode_requests) for w in routing.decodes] == [4, 2]
    assert (
        routing.metric('strata_gateway_routes_total{policy="round_robin",route="disaggregated"}')
        == 4
    )

    with pytest.raises(InvalidAdminRequest, match="unknown policy 'fastest'"):
        registry.set_policy("fastest")
    assert registry.stats().policy == "round_robin"
    for name in ("least_loaded", "prefix_aware", "slo_aware"):
        registry.set_policy(name)
        assert routing.post(_body())[0] == 200
        assert registry.stats().policy == name


def test_predictions_are_scored_as_mape(routing: Routing) -> None:
    routing.script.decode_delay_s = 0.002
    for _ in range(3):
        assert routing.post(_body())[0] == 200
    stats = routing.registry.stats()
    assert stats.extra["predictor_ttft_samples"] == 3
    assert stats.extra["predictor_tpot_samples"] == 3
    assert stats.predictor_ttft_mape is not None and stats.predictor_ttft_mape >= 0
    assert stats.predictor_tpot_mape is not None and stats.predictor_tpot_mape >= 0
    assert routing.metric("strata_gateway_predictor_ttft_mape") == pytest.approx(
        stats.predictor_ttft_mape
    )
    assert routing.metric("strata_gateway_predictor_tpot_mape") == pytest.approx(
        stats.predictor_tpot_mape
    )


# -- conditional disaggregation --------------------------------------------------------------


def test_short_prompt_skips_the_prefill_pool(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> None:
    routing = start_routing(
        loop_thread,
        tiny_model_dir,
        model_tokenizer,
        scheduling={"local_prefill_threshold_tokens": 64},
    )
    try:
        expected = routing.tokenizer.decode(routing.script.token_ids)
        prompt = routing.tokenizer.encode("Tell me a story", add_special_tokens=False).ids
        status, _, raw = routing.post(_body(prompt))
        assert status == 200, raw
        assert _text(raw) == expected
        assert not any(w.prefill_requests for w in routing.prefills)
        (decode,) = [r for w in routing.decodes for r in w.decode_requests]
        assert list(decode.prompt_token_ids) == prompt  # the prompt alone: no first token
        assert decode.sampling.max_tokens == 20
        assert list(decode.block_keys) == []
        assert decode.kv_node == ""  # no prefill: no hint
        assert (
            routing.metric('strata_gateway_routes_total{policy="slo_aware",route="local_short"}')
            == 1
        )
        # A prompt of 64 tokens or more goes through the prefill pool.
        assert len(prompt * 20) >= 64
        status, _, raw = routing.post(_body(prompt * 20))
        assert status == 200 and _text(raw) == expected
        assert sum(len(w.prefill_requests) for w in routing.prefills) == 1
    finally:
        stop_routing(routing)


def test_local_request_resumes_on_another_decode_worker(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> None:
    routing = start_routing(
        loop_thread,
        tiny_model_dir,
        model_tokenizer,
        scheduling={"local_prefill_threshold_tokens": 64},
    )
    try:
        routing.script.token_ids = routing.script.token_ids * 3
        expected = routing.tokenizer.decode(routing.script.token_ids)
        routing.script.die_after_decode_chunks = 4
        status, _, raw = routing.post(_body(max_tokens=100, return_token_ids=True))
        assert status == 200, raw
        choice = json.loads(raw)["choices"][0]
        assert choice["text"] == expected
        assert choice["token_ids"] == [*routing.script.token_ids, EOS_TOKEN_ID]
        dead, survivor = routing.decodes
        (first,) = dead.decode_requests
        (resumed,) = survivor.decode_requests
        prompt = list(first.prompt_token_ids)
        assert list(resumed.prompt_token_ids) == [*prompt, *routing.script.token_ids[:4]]
        assert resumed.sampling.max_tokens == 100 - 4
        assert not any(w.prefill_requests for w in routing.prefills)
        assert routing.registry.stats().requests_failed_over == 1
    finally:
        stop_routing(routing)


def test_prefill_pool_down_the_decode_worker_serves(routing: Routing) -> None:
    expected = routing.tokenizer.decode(routing.script.token_ids)
    for worker in routing.prefills:
        routing.loop.run(worker.stop())
    # Still "ready" in the registry: the first request finds both dead, then prefills locally.
    status, _, raw = routing.post(_body())
    assert status == 200, raw
    assert _text(raw) == expected
    states = {i.endpoint: i.state for i in routing.registry.list_instances()}
    assert all(states[w.endpoint] is InstanceState.DEAD for w in routing.prefills)
    # Now known dead: the policy routes to a decode worker directly (no prefill attempt).
    status, _, raw = routing.post(_body())
    assert status == 200 and _text(raw) == expected
    assert (
        routing.metric('strata_gateway_routes_total{policy="slo_aware",route="local_no_prefill"}')
        == 1
    )
    assert [len(w.decode_requests) for w in routing.decodes] == [2, 0]


# -- profile ---------------------------------------------------------------------------------


def test_profile_calibrates_each_worker_when_it_becomes_ready(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> None:
    routing = start_routing(
        loop_thread,
        tiny_model_dir,
        model_tokenizer,
        num_prefill=1,
        num_decode=1,
        profiling={"enabled": True, "max_model_len": 128, "max_batch": 2},
    )
    try:
        registry = routing.registry
        # A bound for a loaded host, not a speed figure (each profile's own budget is 40 s; two
        # test suites beside it on 2 cores took it past 90 s).
        deadline = time.monotonic() + 180
        while registry.stats().extra["profiles_run"] < 2:
            assert time.monotonic() < deadline, "the profiles never finished"
            time.sleep(0.05)
        (prefill,) = routing.prefills
        instances = {i.endpoint: registry.get(i.id) for i in registry.list_instances()}
        p = instances[prefill.endpoint].predictor
        assert p.calibrated and instances[routing.decodes[0].endpoint].predictor.calibrated
        # The prefill worker's engine times follow COST exactly: the fit recovers it.
        assert p.prefill.as_tuple() == pytest.approx(COST, rel=1e-4)
        # Profile prompts of up to 128 tokens, some starting with an earlier one (cached).
        prompts = [len(r.prompt_token_ids) for r in prefill.prefill_requests]
        assert max(prompts) <= 127 and min(prompts) >= BLOCK_SIZE
        assert routing.metric('strata_gateway_profiled_instances_total{role="prefill"}') == 1
        assert routing.metric('strata_gateway_profiled_instances_total{role="decode"}') == 1
    finally:
        stop_routing(routing)


# -- prefix index ----------------------------------------------------------------------------


def test_prefix_aware_routes_to_the_engine_holding_the_prefix(
    loop_thread: LoopThread,
    tiny_model_dir: Path,
    model_tokenizer: ModelTokenizer,
    valkey_url: str,
) -> None:
    routing = start_routing(
        loop_thread,
        tiny_model_dir,
        model_tokenizer,
        routing={"kv_metadata": valkey_url, "policy": PolicyKind.PREFIX_AWARE},
    )
    store = RedisMetadataStore(valkey_url)
    try:
        prompt = routing.tokenizer.encode("Tell me a story " * 12, add_special_tokens=False).ids
        assert len(prompt) >= 3 * BLOCK_SIZE
        # What the second prefill engine would publish after computing the prompt with the
        # client's salt "t1" (a gateway without API keys sends it as "~t1": tenants.py).
        keys = block_keys(prompt, BLOCK_SIZE, root_key(FINGERPRINT, LAYOUT, "~t1"))
        source = routing.prefills[1].source
        store.publish(
            [
                encode_event(SourceCleared(source, 0)),
                encode_event(BlocksStored(source, 1, Tier.HBM, tuple(keys))),
            ]
        )
        view = routing.server.cluster_view
        assert view is not None and view.wait_for(lambda v: v.num_blocks() == len(keys))

        async def cached(salt: str) -> CachedPrefix:
            return Router(routing.registry, view).cached(prompt, salt)

        assert routing.loop.run(cached("~t1")) == CachedPrefix(0, 0, {source: len(keys)})
        assert routing.loop.run(cached("~t2")) == NO_CACHE

        assert routing.post(_body(prompt, cache_salt="t1"))[0] == 200
        assert [len(w.prefill_requests) for w in routing.prefills] == [0, 1]
        # Another namespace's keys differ: nothing cached, the tie goes to the first.
        assert routing.post(_body(prompt, cache_salt="t2"))[0] == 200
        assert [len(w.prefill_requests) for w in routing.prefills] == [1, 1]
    finally:
        store.close()
        stop_routing(routing)
