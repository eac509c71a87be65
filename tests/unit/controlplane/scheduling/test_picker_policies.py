"""The policies that pick each side by a criterion of their own (round_robin, least_loaded,
prefix_aware): the chosen instances on tables of cluster states, exactly.

Latency models and units: scheduling_helpers.py (this folder; prefill 1 ms per new
token, decode step 10 ms + 1 ms per sequence, TCP 100 MB/s, shm 1 GB/s, 1000 B of KV per token).
The default request: 1000 prompt tokens (62 blocks of 16 can hit), 101 output tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from controlplane.scheduling import (
    Assign,
    InstanceSnapshot,
    RequestCosts,
    Route,
)
from controlplane.scheduling.policies import (
    LeastLoadedPolicy,
    PrefixAwarePolicy,
    RoundRobinPolicy,
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
