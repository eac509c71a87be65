"""Routing with real vLLM engines (tiny model): prefix-aware against round-robin on the prefill
instances' own prefix caches (issue 4, acceptance 4).

One store node (its embedded metadata served as strata://), two prefill workers and one decode
worker that publish their engines' HBM blocks there, and a gateway in this process following the
same metadata (its prefix index). With a shared KV pool, every prefill instance can *load* a
prefix another one computed, so "cached tokens" in usage are the same for both policies; what
prefix-aware routing improves is where the cached tokens come from: the chosen engine's own HBM
prefix cache instead of a load from the pool. The test measures that from the workers' Stats
(prompt tokens computed and loaded; the rest of the cached ones were HBM hits).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from controlplane.config import GatewayConfig, HttpConfig, RoutingConfig
from controlplane.gateway import GatewayServer
from controlplane.text.tokenizer import ModelTokenizer
from strata_common.options import replace_nested
from strata_proto import worker_pb2
from tests.e2e.dataplane_processes import Process, start_store, start_worker, stub
from tests.integration.controlplane.conftest import LoopThread

pytestmark = pytest.mark.slow

BLOCK_SIZE = 128  # vLLM's block size on CPU
NUM_PREFIXES = 3
REQUESTS_PER_PREFIX = 4


@dataclass
class RoutingCluster:
    loop: LoopThread
    store: Process
    prefills: list[Process]
    decode: Process
    server: GatewayServer
    url: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


def start_routing_cluster(
    model_dir: Path, num_prefill: int, **config: object
) -> Iterator[RoutingCluster]:
    """Store, ``num_prefill`` prefill workers and one decode worker, and the gateway (config:
    GatewayConfig overrides, a group's as a dict of its fields: ``replace_nested``)."""
    store = start_store("--metadata", "embedded")
    metadata = store.metadata  # strata://: its gRPC metadata service
    workers: list[Process] = []
    loop = LoopThread()
    server: GatewayServer | None = None
    try:
        common = ("--kv-metadata", metadata, "--max-num-seqs", "8", "--max-model-len", "1024")
        for role in ["prefill"] * num_prefill + ["decode"]:
            workers.append(start_worker(model_dir, role, store.endpoint, *common))
        base_config = GatewayConfig(
            model_dir=model_dir,
            served_model_name="tiny",
            prefill_endpoints=tuple(w.endpoint for w in workers[:-1]),
            decode_endpoints=(workers[-1].endpoint,),
            http=HttpConfig(port=0),
            routing=RoutingConfig(kv_metadata=metadata),
        )
        gateway_config = replace_nested(base_config, **config)
        server = GatewayServer(gateway_config, tokenizer=ModelTokenizer.from_model_dir(model_dir))
        url = loop.run(server.start(), timeout_s=120)
        yield RoutingCluster(loop, store, workers[:-1], workers[-1], server, url)
    finally:
        if server is not None:
            loop.run(server.stop(), timeout_s=60)
        loop.close()
        for worker in workers:
            worker.stop()
        store.stop()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[RoutingCluster]:
    # Prefill-side routing only: with conditional disaggregation the decode worker, which holds
    # every prefix it decoded, would serve the repeats itself (LOCAL_RESIDENT).
    yield from start_routing_cluster(
        tiny_model_dir,
        2,
        profiling={"enabled": False},
        scheduling={"conditional_disaggregation": False},
    )


def _prefill_stats(cluster: RoutingCluster) -> tuple[int, int]:
    """(prompt tokens computed, prompt tokens loaded from the pool), over both prefill workers."""
    computed = loaded = 0
    for worker in cluster.prefills:
        reply = stub(worker.endpoint).Stats(worker_pb2.StatsRequest(), timeout=30)
        computed += reply.prompt_tokens_computed
        loaded += reply.kv_tokens_loaded
    return computed, loaded


def _run_workload(cluster: RoutingCluster, policy: str, seed: int) -> dict[str, int]:
    """Shared-prefix requests, prefixes interleaved (A B C A B C ...), one at a time; returns
    prompt tokens, tokens served from the prefill engines' HBM and loaded from the pool."""
    cluster.server.registry.set_policy(policy)
    rng = random.Random(seed)  # fresh prefixes per run: nothing cached from another run
    prefixes = [[rng.randrange(10, 2000) for _ in range(2 * BLOCK_SIZE)] for _ in "ABC"]
    computed_before, loaded_before = _prefill_stats(cluster)
    client = cluster.client()
    num_prompt = num_cached = 0
    for i in range(NUM_PREFIXES * REQUESTS_PER_PREFIX):
        prompt = prefixes[i % NUM_PREFIXES] + [rng.randrange(10, 2000) for _ in range(20)]
        completion = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=2, temperature=0.0
        )
        assert completion.usage is not None
        num_prompt += completion.usage.prompt_tokens
        details = completion.usage.prompt_tokens_details
        num_cached += details.cached_tokens or 0 if details is not None else 0
    computed_after, loaded_after = _prefill_stats(cluster)
    computed = computed_after - computed_before
    loaded = loaded_after - loaded_before
    return {
        "prompt": num_prompt,
        "cached": num_cached,
        "hbm": num_prompt - computed - loaded,
        "loaded": loaded,
    }


def test_prefix_aware_serves_more_prefix_tokens_from_the_engines_own_cache(
    cluster: RoutingCluster,
) -> None:
    round_robin = _run_workload(cluster, "round_robin", seed=1)
    prefix_aware = _run_workload(cluster, "prefix_aware", seed=2)
    print(f"round_robin {round_robin}\nprefix_aware {prefix_aware}")
    # Every repeat of a prefix is cached somewhere (HBM or pool) under both policies ...
    repeats = NUM_PREFIXES * (REQUESTS_PER_PREFIX - 1)
    for counts in (round_robin, prefix_aware):
        assert counts["hbm"] + counts["loaded"] == repeats * 2 * BLOCK_SIZE, counts
        assert counts["cached"] == counts["hbm"] + counts["loaded"]
    # ... but round-robin sends the second request of each prefix to the other engine, which
    # loads it from the pool; prefix-aware keeps it where it is resident.
    assert prefix_aware["hbm"] > round_robin["hbm"]
    assert prefix_aware["loaded"] < round_robin["loaded"]
