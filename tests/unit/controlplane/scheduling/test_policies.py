"""Scheduling policies, what they all share: the interface, the configuration, conditional
disaggregation; the chosen instances on tables of cluster states, exactly.

Latency models and units: scheduling_helpers.py (this folder; prefill 1 ms per new
token, decode step 10 ms + 1 ms per sequence, TCP 100 MB/s, shm 1 GB/s, 1000 B of KV per token).
The default request: 1000 prompt tokens (62 blocks of 16 can hit), 101 output tokens.
"""

from __future__ import annotations

import pytest

from controlplane.scheduling import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    Assign,
    CachedPrefix,
    Reject,
    RejectReason,
    RequestSnapshot,
    Route,
    SchedulingConfig,
    make_policy,
)
from controlplane.scheduling.policies import (
    ConductorPolicy,
    LeastLoadedPolicy,
    PrefixAwarePolicy,
    RoundRobinPolicy,
    SloAwarePolicy,
)
from tests.unit.controlplane.scheduling.scheduling_helpers import (
    DEAD,
    DRAINING,
    STARTING,
    B,
    D,
    P,
    assigned,
    config,
    instance,
    request,
)

# -- the interface ---------------------------------------------------------------------------


def test_policies_are_selected_by_name() -> None:
    assert POLICY_NAMES == (
        "round_robin",
        "least_loaded",
        "prefix_aware",
        "slo_aware",
        "conductor",
    )
    assert DEFAULT_POLICY == "slo_aware"
    for name, cls in zip(
        POLICY_NAMES,
        (RoundRobinPolicy, LeastLoadedPolicy, PrefixAwarePolicy, SloAwarePolicy, ConductorPolicy),
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


@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n != "conductor"])  # Mooncake's
# Conductor always disaggregates (test_conductor.py)
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


def test_policies_are_chosen_by_kind_or_name() -> None:
    from controlplane.scheduling.policies import POLICY_NAMES, PolicyKind

    assert POLICY_NAMES == (
        "round_robin",
        "least_loaded",
        "prefix_aware",
        "slo_aware",
        "conductor",
    )
    for kind in PolicyKind:
        assert make_policy(kind).name == kind.value == make_policy(kind.value).name
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        make_policy("fifo")
