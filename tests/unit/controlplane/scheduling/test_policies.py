"""Scheduling policies: the chosen instances on tables of cluster states, exactly.

Latency models and units: scheduling_helpers.py (this folder; prefill 1 ms per new
token, decode step 10 ms + 1 ms per sequence, TCP 100 MB/s, shm 1 GB/s, 1000 B of KV per token).
The default request: 1000 prompt tokens (62 blocks of 16 can hit), 101 output tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import pytest

from controlplane.instances.types import InstanceState
from controlplane.scheduling import (
    DEFAULT_POLICY,
    NO_CACHE,
    POLICY_NAMES,
    Assign,
    CachedPrefix,
    InstanceLoad,
    InstanceSnapshot,
    LatencyPredictor,
    Reject,
    RejectReason,
    RequestCosts,
    RequestSnapshot,
    Route,
    SchedulingConfig,
    cached_prefix,
    make_policy,
)
from controlplane.scheduling.policies import (
    LeastLoadedPolicy,
    PrefixAwarePolicy,
    RoundRobinPolicy,
    SloAwarePolicy,
)
from controlplane.workers.roles import WorkerRole
from kvstore.blocks.tier import Tier
from kvstore.cluster.events import BlocksStored
from kvstore.cluster.index import PrefixIndex
from tests.unit.controlplane.scheduling.scheduling_helpers import (
    BLOCK,
    DEAD,
    DRAINING,
    STARTING,
    B,
    D,
    P,
    config,
    instance,
)


def request(
    prompt: int = 1000,
    *,
    max_tokens: int = 101,
    pool: int = 0,
    ssd: int = 0,
    hbm: Mapping[str, int] | None = None,
    ttft_slo_s: float | None = None,
    tpot_slo_s: float | None = None,
) -> RequestSnapshot:
    cached = CachedPrefix(pool, ssd, MappingProxyType(dict(hbm or {})))
    return RequestSnapshot(prompt, max_tokens, BLOCK, cached, ttft_slo_s, tpot_slo_s)


def assigned(decision: object) -> tuple[str | None, str]:
    assert isinstance(decision, Assign), decision
    return decision.prefill, decision.decode


# -- the interface ---------------------------------------------------------------------------


def test_policies_are_selected_by_name() -> None:
    assert POLICY_NAMES == ("round_robin", "least_loaded", "prefix_aware", "slo_aware")
    assert DEFAULT_POLICY == "slo_aware"
    for name, cls in zip(
        POLICY_NAMES,
        (RoundRobinPolicy, LeastLoadedPolicy, PrefixAwarePolicy, SloAwarePolicy),
        strict=True,
    ):
        policy = make_policy(name)
        assert type(policy) is cls
        assert policy.name == name
    with pytest.raises(ValueError, match="unknown policy 'fastest'; choose one of round_robin"):
        make_policy("fastest")


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_no_ready_decode_instance_is_a_no_instance_reject(name: str) -> None:
    cluster = [instance("p0", P), instance("d0", D, DRAINING), instance("b0", B, STARTING)]
    decision = make_policy(name, config()).decide(request(), cluster)
    assert decision == Reject(
        RejectReason.NO_INSTANCE, None, "no ready decode instance among 3 known"
    )


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_starting_draining_and_dead_instances_are_never_chosen(name: str) -> None:
    # The unready instances are idle and hold the whole prefix; the ready ones are busy.
    cluster = [
        instance("p-starting", P, STARTING),
        instance("p-draining", P, DRAINING),
        instance("p-dead", P, DEAD),
        instance("p-ready", P, queued=5000),
        instance("d-starting", D, STARTING),
        instance("d-draining", D, DRAINING),
        instance("d-dead", D, DEAD),
        instance("d-ready", D, running=40, context=40_000),
    ]
    hbm = {i.id: 62 for i in cluster if i.id != "p-ready" and i.id != "d-ready"}
    policy = make_policy(name, config())
    for _ in range(3):
        assert assigned(policy.decide(request(hbm=hbm), cluster)) == ("p-ready", "d-ready")


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_assign_carries_the_predictions(name: str) -> None:
    cluster = [instance("p0", P, queued=500), instance("d0", D, running=4, context=4000)]
    decision = make_policy(name, config()).decide(request(pool=20), cluster)
    # TTFT: 0.5 s queued + 680 new tokens + 320 cached tokens (320 kB over shm at 1 GB/s).
    # TPOT: a step of 5 sequences + 1 MB over TCP (10 ms) spread over 100 tokens.
    assert isinstance(decision, Assign)
    assert (decision.prefill, decision.decode, decision.route, decision.policy) == (
        "p0",
        "d0",
        Route.DISAGGREGATED,
        name,
    )
    assert decision.predicted_ttft_s == pytest.approx(0.5 + 0.68 + 0.00032, rel=1e-9)
    assert decision.predicted_tpot_s == pytest.approx(0.015 + 0.0001, rel=1e-9)
    assert decision.cached_blocks == 20


def test_kv_moves_over_shared_memory_within_a_host() -> None:
    cluster = [instance("p0", P, host="h"), instance("d0", D, host="h")]
    decision = LeastLoadedPolicy(config()).decide(request(), cluster)
    assert isinstance(decision, Assign)
    assert decision.predicted_tpot_s == pytest.approx(0.011 + 0.00001, rel=1e-9)


# -- round robin -----------------------------------------------------------------------------


def test_round_robin_takes_each_side_in_turn() -> None:
    cluster = [instance("p0", P), instance("p1", P), instance("d0", D), instance("d1", D)]
    policy = RoundRobinPolicy(config())
    picks = [assigned(policy.decide(request(), cluster)) for _ in range(4)]
    assert picks == [("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]
    # A short prompt prefills on its decode instance and does not use up a prefill turn.
    assert assigned(policy.decide(request(100), cluster)) == (None, "d0")
    assert assigned(policy.decide(request(), cluster)) == ("p0", "d1")


def test_round_robin_skips_unready_instances_and_follows_membership() -> None:
    policy = RoundRobinPolicy(config())
    cluster = [instance("p0", P), instance("d0", D), instance("d1", D, DRAINING)]
    picks = [assigned(policy.decide(request(), cluster)) for _ in range(2)]
    assert picks == [("p0", "d0"), ("p0", "d0")]
    cluster.append(instance("d2", D))  # joins: counters continue modulo the ready set
    picks = [assigned(policy.decide(request(), cluster)) for _ in range(3)]
    assert picks == [("p0", "d0"), ("p0", "d2"), ("p0", "d0")]


# -- least loaded ----------------------------------------------------------------------------


LEAST_LOADED_CASES = [
    pytest.param(
        [
            instance("p0", P, queued=300),
            instance("p1", P, queued=100, requests=2),
            instance("p2", P, queued=100, requests=1),
            instance("d0", D, running=3, context=300),
            instance("d1", D, running=1, context=500),
            instance("d2", D, running=1, context=300),
        ],
        ("p2", "d2"),
        id="fewest-tokens-then-requests/fewest-sequences-then-context",
    ),
    pytest.param(
        [
            instance("p0", P, DRAINING),
            instance("p1", P, queued=10),
            instance("d0", D, DEAD),
            instance("d1", D, STARTING),
            instance("d2", D, running=5),
        ],
        ("p1", "d2"),
        id="idle-but-unready-skipped",
    ),
    pytest.param(
        [
            instance("p0", P),
            instance("p1", P),
            instance("d0", D, running=2, context=100),
            instance("d1", D, running=2, context=100),
        ],
        ("p0", "d0"),
        id="ties-go-to-the-first-listed",
    ),
    pytest.param(
        [
            instance("d0", D, running=7),
            instance("b0", B, queued=40, running=6),
            instance("p0", P, queued=50),
        ],
        ("b0", "b0"),
        id="both-role-serves-either-side",
    ),
]


@pytest.mark.parametrize(("cluster", "expected"), LEAST_LOADED_CASES)
def test_least_loaded(cluster: Sequence[InstanceSnapshot], expected: tuple[str, str]) -> None:
    decision = LeastLoadedPolicy(config()).decide(request(), cluster)
    if expected[0] == expected[1]:  # a BOTH instance on both sides prefills locally
        assert isinstance(decision, Assign)
        assert (decision.prefill, decision.decode, decision.route) == (
            None,
            expected[1],
            Route.LOCAL_SAME_INSTANCE,
        )
    else:
        assert assigned(decision) == expected


# -- prefix aware ----------------------------------------------------------------------------

# cost(P) = (w·new tokens + queued tokens) / 16; cost(D) = w·(63 - blocks in D's HBM) + context/16


PREFIX_AWARE_CASES = [
    pytest.param(
        [instance("p0", P, queued=320), instance("p1", P), instance("d0", D), instance("d1", D)],
        {"hbm": {"p0": 62}},
        {},
        ("p0", "d0"),
        id="cached-prefix-beats-a-short-queue",  # p0: (8 + 320)/16 = 20.5 < p1: 62.5
    ),
    pytest.param(
        [instance("p0", P, queued=1200), instance("p1", P), instance("d0", D)],
        {"hbm": {"p0": 62}},
        {},
        ("p1", "d0"),
        id="a-long-queue-beats-a-cached-prefix",  # p0: (8 + 1200)/16 = 75.5 > p1: 62.5
    ),
    pytest.param(
        [instance("p0", P, queued=32), instance("p1", P, queued=16), instance("d0", D)],
        {"pool": 40},
        {"local_prefill_threshold_tokens": 0},
        ("p1", "d0"),
        id="pool-blocks-are-visible-to-all-so-load-decides",
    ),
    pytest.param(
        [
            instance("p0", P),
            instance("p1", P),
            instance("d0", D, running=10, context=1600),
            instance("d1", D),
        ],
        {"hbm": {"d0": 62}},
        {},
        ("p0", "d1"),
        id="decode-load-beats-decode-hbm",  # d0: 1 + 100 = 101 > d1: 63
    ),
    pytest.param(
        [
            instance("p0", P),
            instance("d0", D, running=10, context=800),
            instance("d1", D),
        ],
        {"hbm": {"d0": 62}},
        {},
        (None, "d0"),
        id="decode-hbm-beats-decode-load-then-prefills-locally",  # d0: 1 + 50 = 51 < 63
    ),
    pytest.param(
        [instance("p0", P, queued=320), instance("p1", P), instance("d0", D)],
        {"hbm": {"p0": 62}},
        {"overlap_weight": 0.0},
        ("p1", "d0"),
        id="weight-zero-is-least-queued",
    ),
]


@pytest.mark.parametrize(("cluster", "cache", "overrides", "expected"), PREFIX_AWARE_CASES)
def test_prefix_aware(
    cluster: Sequence[InstanceSnapshot],
    cache: dict[str, object],
    overrides: dict[str, object],
    expected: tuple[str | None, str],
) -> None:
    policy = PrefixAwarePolicy(config(**overrides))
    assert assigned(policy.decide(request(**cache), cluster)) == expected  # type: ignore[arg-type]


def test_prefix_aware_costs_are_in_blocks() -> None:
    policy = PrefixAwarePolicy(config(overlap_weight=2.0))
    costs = RequestCosts(request(hbm={"p0": 62, "d0": 30}), policy.config)
    assert policy.prefill_cost(costs, instance("p0", P, queued=64)) == (2 * 8 + 64) / 16
    assert policy.decode_cost(costs, instance("d0", D, context=160)) == 2 * (63 - 30) + 10


# -- slo aware -------------------------------------------------------------------------------

# Each case: cluster, request, config overrides, expected (prefill, decode, route, TTFT, TPOT).

SLO_AWARE_CASES = [
    pytest.param(
        [
            instance("p0", P, queued=2000),
            instance("p1", P, queued=500),
            instance("d0", D, running=30),
            instance("d1", D, running=5),
        ],
        request(),
        {},
        ("p1", "d1", Route.DISAGGREGATED, 1.5, 0.016 + 0.0001),
        id="lowest-ttft-then-lowest-tpot",
    ),
    pytest.param(
        [instance("p0", P, queued=2000), instance("p1", P, queued=500), instance("d0", D)],
        request(pool=40),
        {"local_prefill_threshold_tokens": 0},
        ("p1", "d0", Route.DISAGGREGATED, 0.5 + 0.36 + 0.00064, 0.011 + 0.0001),
        id="pool-hit-loaded-from-dram",  # 640 cached tokens = 640 kB over shm
    ),
    pytest.param(
        [instance("p1", P, queued=500), instance("d0", D)],
        request(pool=40, ssd=10),
        {"local_prefill_threshold_tokens": 0},
        ("p1", "d0", Route.DISAGGREGATED, 0.5 + 0.36 + 0.00064 + 0.0016, 0.011 + 0.0001),
        id="pool-hit-partly-on-ssd",  # + 160 kB read from SSD at 100 MB/s
    ),
    pytest.param(
        [instance("p0", P, queued=600), instance("p1", P, queued=500), instance("d0", D)],
        request(hbm={"p0": 62}),
        {},
        ("p0", "d0", Route.DISAGGREGATED, 0.6 + 0.008, 0.011 + 0.0001),
        id="hbm-prefix-beats-a-shorter-queue",
    ),
    pytest.param(
        [
            instance("p0", P),
            instance("d0", D, running=30),
            instance("d1", D, running=25),
            instance("d2", D, running=15),
        ],
        request(tpot_slo_s=0.03),
        {},
        ("p0", "d2", Route.DISAGGREGATED, 1.0, 0.026 + 0.0001),
        id="tpot-slo-filters-decode-instances",
    ),
    pytest.param(
        [
            instance("p0", P, host="h1"),
            instance("d0", D, running=5, host="h1"),
            instance("d1", D, running=5, host="h2"),
        ],
        request(),
        {},
        ("p0", "d0", Route.DISAGGREGATED, 1.0, 0.016 + 0.00001),
        id="same-host-moves-kv-over-shm",
    ),
    pytest.param(
        [
            instance("p0", P, host="h1"),
            instance("d0", D, running=5, host="h1"),
            instance("d1", D, running=4, host="h2"),
        ],
        request(),
        {},
        ("p0", "d1", Route.DISAGGREGATED, 1.0, 0.015 + 0.0001),
        id="a-lighter-batch-beats-shm",
    ),
    pytest.param(
        [
            instance("p0", P),
            instance("d0", D, running=8, capacity=8),
            instance("d1", D, running=10),
        ],
        request(tpot_slo_s=0.05),
        {},
        ("p0", "d1", Route.DISAGGREGATED, 1.0, 0.021 + 0.0001),
        id="a-full-decode-instance-cannot-meet-a-tpot-slo",
    ),
    pytest.param(
        [instance("b0", B, running=2), instance("p0", P, queued=2000)],
        request(),
        {},
        (None, "b0", Route.LOCAL_SAME_INSTANCE, 1.0 + 0.012, 0.013),
        id="both-role-prefills-itself-when-faster",
    ),
    pytest.param(
        [
            instance("b0", B, running=1, host="h"),
            instance("d1", D, running=1, host="h"),
            instance("d2", D, running=9, host="g"),
        ],
        request(),
        {},
        ("b0", "d1", Route.DISAGGREGATED, 1.0, 0.012 + 0.00001),
        id="both-role-prefills-for-another-same-host-decode",
    ),
    pytest.param(
        [instance("p0", P, queued=5000), instance("d0", D, running=3)],
        request(pool=50),
        {},
        (None, "d0", Route.LOCAL_SHORT, 0.2 + 0.0008 + 0.013, 0.014),
        id="short-uncached-part-prefills-on-decode",
    ),
]


@pytest.mark.parametrize(("cluster", "req", "overrides", "expected"), SLO_AWARE_CASES)
def test_slo_aware(
    cluster: Sequence[InstanceSnapshot],
    req: RequestSnapshot,
    overrides: dict[str, object],
    expected: tuple[str | None, str, Route, float, float],
) -> None:
    decision = SloAwarePolicy(config(**overrides)).decide(req, cluster)
    assert isinstance(decision, Assign), decision
    prefill, decode, route, ttft, tpot = expected
    assert (decision.prefill, decision.decode, decision.route) == (prefill, decode, route)
    assert decision.predicted_ttft_s == pytest.approx(ttft, rel=1e-9)
    assert decision.predicted_tpot_s == pytest.approx(tpot, rel=1e-9)
    assert decision.policy == "slo_aware"


def test_slo_aware_uses_the_configured_slos_when_the_request_has_none() -> None:
    cluster = [instance("p0", P), instance("d0", D, running=30), instance("d1", D, running=25)]
    strict = SloAwarePolicy(config(default_tpot_slo_s=0.03))
    assert isinstance(strict.decide(request(), cluster), Reject)
    # The request's own SLO overrides the default.
    assert assigned(strict.decide(request(tpot_slo_s=0.05), cluster)) == ("p0", "d1")


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="local_prefill_threshold_tokens must be >= 0"):
        SchedulingConfig(local_prefill_threshold_tokens=-1)
    with pytest.raises(ValueError, match="default_tpot_slo_s must be finite and > 0"):
        SchedulingConfig(default_tpot_slo_s=0.0)
    with pytest.raises(ValueError, match="min_retry_after_s <= max_retry_after_s"):
        SchedulingConfig(min_retry_after_s=5.0, max_retry_after_s=1.0)
    with pytest.raises(ValueError, match="ttft_slo_s must be finite and > 0"):
        RequestSnapshot(10, 1, 16, ttft_slo_s=-1.0)
    with pytest.raises(ValueError, match="pool_ssd_blocks"):
        CachedPrefix(pool_blocks=1, pool_ssd_blocks=2)


# -- conditional disaggregation --------------------------------------------------------------

# (prompt, cache, config overrides, cluster, expected prefill, route, cached blocks). Cluster
# "pd": one prefill instance p0, one decode instance d0; "d": d0 alone.

DISAGGREGATION_CASES = [
    pytest.param(300, {}, {}, "pd", None, Route.LOCAL_SHORT, 0, id="short-prompt"),
    pytest.param(1000, {}, {}, "pd", "p0", Route.DISAGGREGATED, 0, id="long-prompt"),
    pytest.param(1000, {"pool": 50}, {}, "pd", None, Route.LOCAL_SHORT, 50, id="short-uncached"),
    pytest.param(
        1000, {"pool": 30}, {}, "pd", "p0", Route.DISAGGREGATED, 30, id="long-uncached"
    ),  # 1000 - 480 = 520 >= 512
    pytest.param(
        1000,
        {"hbm": {"d0": 62}},
        {"local_prefill_threshold_tokens": 0},
        "pd",
        None,
        Route.LOCAL_RESIDENT,
        62,
        id="resident-on-decode",
    ),
    pytest.param(
        1000,
        {"hbm": {"d0": 61}},
        {"local_prefill_threshold_tokens": 0},
        "pd",
        "p0",
        Route.DISAGGREGATED,
        0,
        id="partly-resident-on-decode",
    ),
    pytest.param(
        1000, {"hbm": {"p0": 62}}, {}, "pd", "p0", Route.DISAGGREGATED, 62, id="resident-on-prefill"
    ),
    pytest.param(
        1000,
        {"hbm": {"d0": 62}},
        {"conditional_disaggregation": False},
        "pd",
        "p0",
        Route.DISAGGREGATED,
        0,
        id="turned-off",
    ),
    pytest.param(
        300,
        {},
        {"local_prefill_threshold_tokens": 300},
        "pd",
        "p0",
        Route.DISAGGREGATED,
        0,
        id="threshold-is-strict",
    ),
    pytest.param(1000, {}, {}, "d", None, Route.LOCAL_NO_PREFILL, 0, id="no-prefill-instance"),
]


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize(
    ("prompt", "cache", "overrides", "cluster", "prefill", "route", "cached"), DISAGGREGATION_CASES
)
def test_conditional_disaggregation(
    name: str,
    prompt: int,
    cache: dict[str, object],
    overrides: dict[str, object],
    cluster: str,
    prefill: str | None,
    route: Route,
    cached: int,
) -> None:
    instances = [instance("d0", D)] if cluster == "d" else [instance("p0", P), instance("d0", D)]
    decision = make_policy(name, config(**overrides)).decide(
        request(prompt, **cache),  # type: ignore[arg-type]
        instances,
    )
    assert isinstance(decision, Assign), decision
    assert (decision.prefill, decision.decode, decision.route) == (prefill, "d0", route)
    assert decision.cached_blocks == cached


# -- cached prefix from the prefix index -----------------------------------------------------

CHAIN = tuple(bytes([i]) * 16 for i in range(1, 31))


def index_with(*stored: tuple[str, Tier, slice]) -> PrefixIndex:
    index = PrefixIndex()
    seqs: dict[str, int] = {}
    for source, tier, blocks in stored:
        seq = seqs.get(source, 0)
        index.apply(BlocksStored(source, seq, tier, CHAIN[blocks]))
        seqs[source] = seq + 1
    return index


def test_cached_prefix_of_an_empty_match() -> None:
    assert cached_prefix(PrefixIndex().match(CHAIN), {"d0"}) is NO_CACHE


def test_cached_prefix_spread_over_store_nodes_is_exact() -> None:
    index = index_with(
        ("node-a", Tier.DRAM, slice(0, 10)),
        ("node-b", Tier.SSD, slice(10, 20)),
        ("node-b", Tier.DRAM, slice(20, 25)),
    )
    # Blocks 10..19 only on SSD; counted from the first SSD-only block on (an upper bound).
    assert cached_prefix(index.match(CHAIN), {"d0"}) == CachedPrefix(25, 15)


def test_cached_prefix_separates_engine_hbm_from_the_pool() -> None:
    index = index_with(
        ("d0", Tier.HBM, slice(0, 15)),
        ("p0", Tier.HBM, slice(0, 30)),
        ("node-a", Tier.DRAM, slice(0, 8)),
        ("node-a", Tier.SSD, slice(8, 12)),
    )
    prefix = cached_prefix(index.match(CHAIN), {"d0", "p0", "d1"})
    assert prefix == CachedPrefix(12, 4, MappingProxyType({"p0": 30, "d0": 15}))
    only_engines = index_with(("d0", Tier.HBM, slice(0, 5)))
    assert cached_prefix(only_engines.match(CHAIN), {"d0"}) == CachedPrefix(
        0, 0, MappingProxyType({"d0": 5})
    )


def test_prefix_aware_routes_to_the_engine_holding_the_prefix() -> None:
    # 20 blocks of 16 tokens resident in p1's HBM; p0 has nothing cached.
    index = index_with(("p1", Tier.HBM, slice(0, 20)))
    cluster = [instance("p0", P), instance("p1", P, queued=64), instance("d0", D)]
    prefix = cached_prefix(index.match(CHAIN[:20]), {i.id for i in cluster})
    decision = PrefixAwarePolicy(config(local_prefill_threshold_tokens=0)).decide(
        RequestSnapshot(20 * BLOCK + 1, 10, BLOCK, prefix), cluster
    )
    assert isinstance(decision, Assign)
    assert (decision.prefill, decision.decode, decision.cached_blocks) == ("p1", "d0", 20)


# -- the worked example of docs/design/scheduling.md §6 --------------------------------------


def test_worked_example_of_the_design_doc() -> None:
    def node(id: str, role: WorkerRole, host: str, **load: int) -> InstanceSnapshot:
        return InstanceSnapshot(
            id, role, InstanceState.READY, LatencyPredictor(), InstanceLoad(**load), 256, host
        )

    cluster = [
        node("p0", P, "h0", queued_prefill_tokens=2048, queued_prefill_requests=1),
        node("p1", P, "h1"),
        node("d0", D, "h0", running_decodes=32, decode_context_tokens=65536),
        node("d1", D, "h1", running_decodes=8, decode_context_tokens=16384,
             remaining_decode_tokens=800),
    ]  # fmt: skip
    cached = CachedPrefix(128, 0, MappingProxyType({"p0": 150}))
    policy = SloAwarePolicy()  # priors, kv_bytes_per_token 131072
    decision = policy.decide(RequestSnapshot(3000, 201, BLOCK, cached, 0.5, 0.05), cluster)
    assert isinstance(decision, Assign)
    assert (decision.prefill, decision.decode, decision.route) == ("p1", "d1", Route.DISAGGREGATED)
    assert decision.predicted_ttft_s == pytest.approx(0.1409661936, rel=1e-9)
    assert decision.predicted_tpot_s == pytest.approx(0.011484388, rel=1e-9)
    assert decision.cached_blocks == 128
    costs = RequestCosts(RequestSnapshot(3000, 201, BLOCK, cached, 0.5, 0.05), policy.config)
    assert costs.ttft_s(cluster[0], local=False) == pytest.approx(0.297036952, rel=1e-9)

    tight_tpot = policy.decide(RequestSnapshot(3000, 201, BLOCK, cached, 0.5, 0.011), cluster)
    assert isinstance(tight_tpot, Reject)
    assert tight_tpot.reason is RejectReason.OVERLOADED
    assert tight_tpot.retry_after_s == pytest.approx(100 * 0.01112768, rel=1e-9)
    tight_ttft = policy.decide(RequestSnapshot(3000, 201, BLOCK, cached, 0.1, 0.05), cluster)
    assert tight_ttft == Reject(
        RejectReason.OVERLOADED, 1.0, "no instance pair meets TTFT SLO 100 ms, TPOT SLO 50 ms now"
    )


def test_policies_are_chosen_by_kind_or_name() -> None:
    from controlplane.scheduling.policies import POLICY_NAMES, PolicyKind

    assert POLICY_NAMES == ("round_robin", "least_loaded", "prefix_aware", "slo_aware")
    for kind in PolicyKind:
        assert make_policy(kind).name == kind.value == make_policy(kind.value).name
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        make_policy("fifo")
