"""Exact tests of admission (kvstore.policy): the frequency sketch, the admission filters and
AdmittedPolicy's window, admission decisions and adaptive window target."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvstore.policy.admission import AdmissionFilter, GhostAdmission, TinyLFUAdmission
from kvstore.policy.admitted import AdmittedPolicy
from kvstore.policy.factory import PolicyKind, make_policy
from kvstore.policy.lru import LRUPolicy
from kvstore.policy.sketch import FrequencySketch


def simulate(policy: AdmittedPolicy, capacity: int, trace: str) -> list[str]:
    """Replay single-letter keys through a cache of ``capacity`` blocks as the store node does
    (hit: ``on_access``; miss: ``select_victim`` + ``on_remove`` until there is room, then
    ``on_insert``). Returns the evicted keys in order."""
    evicted: list[str] = []
    for name in trace.split():
        key = name.encode()
        if key in policy:
            policy.on_access(key)
            continue
        while len(policy) >= capacity:
            victim = policy.select_victim(lambda k: True)
            assert victim is not None
            policy.on_remove(victim)
            evicted.append(victim.decode())
        policy.on_insert(key)
    return evicted


def contents(policy: AdmittedPolicy) -> tuple[str, str]:
    """(main's keys, the window's keys), each sorted and space-separated."""
    window = sorted(k.decode() for k in policy._window)
    main = sorted(k.decode() for k in policy.main._order)  # type: ignore[attr-defined]
    return " ".join(main), " ".join(window)


# -- FrequencySketch -----------------------------------------------------------------------------


def test_sketch_doorkeeper_takes_the_first_access() -> None:
    sketch = FrequencySketch(width=64)
    assert sketch.frequency(b"a") == 0
    sketch.increment(b"a")
    assert sketch.frequency(b"a") == 1  # the doorkeeper bit only: no counter moved
    assert all(not any(row) for row in sketch._rows)
    sketch.increment(b"a")
    sketch.increment(b"a")
    assert sketch.frequency(b"a") == 3  # doorkeeper 1 + counters 2
    assert sketch.frequency(b"b") == 0


def test_sketch_counts_saturate_at_four_bits() -> None:
    sketch = FrequencySketch(width=64, doorkeeper_bits_per_counter=0, sample_factor=100)
    for _ in range(20):
        sketch.increment(b"a")
    assert sketch.frequency(b"a") == FrequencySketch.MAX_COUNT == 15


def test_sketch_halves_after_its_sample() -> None:
    sketch = FrequencySketch(width=4, sample_factor=2)  # 4 counters a row, halve every 8
    assert (sketch.width, sketch.sample_size) == (4, 8)
    for _ in range(7):
        sketch.increment(b"a")
    assert (sketch.frequency(b"a"), sketch.num_recorded) == (7, 7)  # doorkeeper 1 + 6
    sketch.increment(b"a")  # the 8th: counters 7 -> 3, doorkeeper cleared, count 8 -> 4
    assert (sketch.frequency(b"a"), sketch.num_recorded) == (3, 4)
    sketch.increment(b"a")  # back through the (cleared) doorkeeper: counters stay at 3
    assert (sketch.frequency(b"a"), sketch.num_recorded) == (4, 5)


def test_sketch_halve_rounds_down() -> None:
    sketch = FrequencySketch(width=64, doorkeeper_bits_per_counter=0, sample_factor=100)
    for key, times in ((b"a", 1), (b"b", 5), (b"c", 15)):
        for _ in range(times):
            sketch.increment(key)
    sketch.halve()
    assert [sketch.frequency(k) for k in (b"a", b"b", b"c")] == [0, 2, 7]


def test_sketch_width_is_a_power_of_two_and_only_grows() -> None:
    sketch = FrequencySketch(width=5)
    assert sketch.width == 8
    sketch.increment(b"a")
    sketch.ensure_capacity(8)
    assert (sketch.width, sketch.frequency(b"a")) == (8, 1)  # unchanged: history kept
    sketch.ensure_capacity(100)
    assert (sketch.width, sketch.sample_size, sketch.frequency(b"a")) == (128, 1280, 0)
    sketch.ensure_capacity(10)
    assert sketch.width == 128


def test_sketch_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        FrequencySketch(width=0)
    with pytest.raises(ValueError):
        FrequencySketch(doorkeeper_bits_per_counter=-1)


# -- admission filters ---------------------------------------------------------------------------


def test_tinylfu_admits_only_the_more_frequent() -> None:
    admission: AdmissionFilter = TinyLFUAdmission(FrequencySketch(doorkeeper_bits_per_counter=0))
    for key, times in ((b"a", 2), (b"b", 2), (b"c", 3)):
        for _ in range(times):
            admission.record(key)
    assert admission.admit(b"c", b"a")
    assert not admission.admit(b"a", b"b")  # a tie keeps the incumbent
    assert not admission.admit(b"a", b"c")
    assert not admission.admit(b"new", b"a")


def test_ghost_admits_a_key_seen_twice_within_its_window() -> None:
    ghost = GhostAdmission(ghost_ratio=2.0)
    ghost.ensure_capacity(2)  # remembers 2 * 2 = 4 keys
    for name in "a b a c d".split():
        ghost.record(name.encode())
    assert [ghost.accesses(k.encode()) for k in "a b c d".split()] == [2, 1, 1, 1]
    assert ghost.admit(b"a", b"zz") and not ghost.admit(b"b", b"zz")
    ghost.record(b"e")  # 5 keys > 4: the oldest (b) falls out
    assert ghost.accesses(b"b") == 0
    ghost.record(b"b")
    assert not ghost.admit(b"b", b"zz")  # b's first access was forgotten
    ghost.ensure_capacity(1)
    assert ghost._limit == 4  # never shrinks
    with pytest.raises(ValueError):
        GhostAdmission(ghost_ratio=0.0)


# -- AdmittedPolicy: exact admission and eviction orders -----------------------------------------


def _second_hit() -> AdmittedPolicy:
    return AdmittedPolicy(LRUPolicy(), GhostAdmission(4.0), window_ratio=0.0, adapt_window=False)


def _tinylfu() -> AdmittedPolicy:
    sketch = FrequencySketch(doorkeeper_bits_per_counter=0)
    return AdmittedPolicy(
        LRUPolicy(), TinyLFUAdmission(sketch), window_ratio=0.0, adapt_window=False
    )


ADMISSION_ORDERS = [
    # (name, policy, capacity, trace, evicted in order, main at the end, window at the end)
    # At d the window (a b c, a hit) drains b c into main; a, seen twice, is admitted against
    # main's LRU b. Then the one-hit wonders d e f are refused one by one while c, a stay; b
    # comes back (its second access) and is admitted at g, evicting c. (LRU evicts b c d e a.)
    ("second hit: one-hit wonders refused", _second_hit, 3, "a b c a d e a f b g", "b d e f c",
     "a b", "g"),
    # a has 3 accesses, b 2: b is admitted against c (2 > 1); d e are refused against a (3);
    # d's second access (2) still loses to a (3) under TinyLFU ...
    ("TinyLFU: the candidate must beat the victim", _tinylfu, 3, "a b c a a b d e d f",
     "c d e d", "a b", "f"),
    # ... whereas second-hit admission lets d in at f, evicting main's LRU a.
    ("second hit: the same trace", _second_hit, 3, "a b c a a b d e d f", "c d e a", "b d",
     "f"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "capacity", "trace", "evicted", "main", "window"),
    [case[1:] for case in ADMISSION_ORDERS],
    ids=[case[0] for case in ADMISSION_ORDERS],
)
def test_admission_order(
    build: Callable[[], AdmittedPolicy],
    capacity: int,
    trace: str,
    evicted: str,
    main: str,
    window: str,
) -> None:
    policy = build()
    assert simulate(policy, capacity, trace) == evicted.split()
    assert contents(policy) == (main, window)


def test_window_target_adapts_like_arcs_p() -> None:
    """Capacity 4, target starting at 0.5 * 4 = 2.

    e: a goes to main (warm-up), b is refused (window ghost: b). f: c refused. b: d refused; b,
    in the window ghost, grows the target by max(0 / 3, 1) to 3. g: the window (e f b) is at
    its target, so main's a goes (main ghost: a). a: e refused (main is empty); a, in main's
    ghost, shrinks the target by max(3 / 1, 1) to 0. h: f b g move into main, a (seen twice)
    is admitted against f, which goes.
    """
    policy = AdmittedPolicy(LRUPolicy(), GhostAdmission(), window_ratio=0.5)
    assert simulate(policy, 4, "a b c d e") == ["b"]
    assert policy.window_target == 2.0
    assert simulate(policy, 4, "f b") == ["c", "d"]
    assert policy.window_target == 3.0
    assert simulate(policy, 4, "g a") == ["a", "e"]
    assert policy.window_target == 0.0
    assert simulate(policy, 4, "h") == ["f"]
    assert contents(policy) == ("a b g", "h")


def test_fixed_window_is_a_share_of_the_tracked_keys() -> None:
    policy = AdmittedPolicy(LRUPolicy(), GhostAdmission(), window_ratio=0.5, adapt_window=False)
    simulate(policy, 4, "a b c d e f b g a h")
    assert policy.window_target == 2.0
    assert len(policy) == 4


def test_select_victim_is_stable_and_skips_refused_keys() -> None:
    policy = _second_hit()
    simulate(policy, 3, "a b c a")
    a, b, c = b"a", b"b", b"c"
    # The window (b c a) drains b c into main; a is admitted against b.
    assert policy.select_victim(lambda k: True) == b
    assert policy.select_victim(lambda k: True) == b  # nothing happened in between
    assert contents(policy) == ("a b c", "")
    assert policy.select_victim(lambda k: k != b) == c
    assert policy.select_victim(lambda k: False) is None
    assert len(policy) == 3 and a in policy


def test_leased_candidate_is_passed_over() -> None:
    policy = _second_hit()
    simulate(policy, 3, "a b c d")  # at d: a b into main, c refused; window: d
    assert policy.select_victim(lambda k: True) == b"d"
    # d leased: no window candidate, so main's LRU goes instead.
    assert policy.select_victim(lambda k: k != b"d") == b"a"


def test_admitted_policy_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        AdmittedPolicy(LRUPolicy(), GhostAdmission(), window_ratio=1.5)
    main = LRUPolicy()
    main.on_insert(b"a")
    with pytest.raises(ValueError):
        AdmittedPolicy(main, GhostAdmission())


@pytest.mark.parametrize("kind", [PolicyKind.W_TINYLFU, PolicyKind.SECOND_HIT_LRU])
def test_admission_kinds_by_name(kind: PolicyKind) -> None:
    policy = make_policy(PolicyKind(kind.value))
    assert isinstance(policy, AdmittedPolicy)
    assert isinstance(policy.main, LRUPolicy)
    expected = TinyLFUAdmission if kind is PolicyKind.W_TINYLFU else GhostAdmission
    assert isinstance(policy.admission, expected)
