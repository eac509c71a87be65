"""The online refit's change-point rule: a model wrong by a factor (a poisoned profile, an engine
that changed speed) is rescaled after CHANGE_RUN (3) consecutive observations that disagree
with it by more than CHANGE_FACTOR (3x) the same way; noise and moderate drift are left to the
level and the refits (docs/design/scheduling.md §2.3, "Change points")."""

from __future__ import annotations

import pytest

from controlplane.scheduling.predictor.feedback import (
    CHANGE_FACTOR,
    CHANGE_RUN,
    ChangeDetector,
)
from controlplane.scheduling.predictor.fitting import DecodeSample, PrefillSample
from controlplane.scheduling.predictor.model import DecodeCoefficients, PrefillCoefficients
from controlplane.scheduling.predictor.plan import ProfilePlan
from controlplane.scheduling.predictor.predictor import LatencyPredictor

TRUE_PREFILL = PrefillCoefficients(
    fixed_s=0.020, per_new_token_s=2e-4, per_cached_token_s=1e-5, per_attention_pair_s=2e-8
)
TRUE_DECODE = DecodeCoefficients(fixed_s=0.015, per_sequence_s=3e-4, per_context_token_s=4e-8)
PLAN = ProfilePlan.for_engine(max_model_len=4096, block_size=16, max_num_seqs=16)
PREFILL_SHAPES = [(512, 0), (100, 2048), (3000, 16), (40, 0), (1024, 1024), (7, 4000), (2048, 0)]
DECODE_SHAPES = [(1, 100), (8, 8000), (16, 30000), (3, 900), (12, 4000), (2, 5000)]


def profiled(factor: float) -> LatencyPredictor:
    """A predictor calibrated by a noiseless profile of an engine ``factor`` times slower than
    the truth (factor 10: a profile taken while the host was swamped; 0.1: a garbage clock)."""
    predictor = LatencyPredictor()
    predictor.calibrate(
        [
            PrefillSample(n, c, factor * TRUE_PREFILL.predict_s(n, c))
            for n, c in PLAN.prefill_points
        ],
        [DecodeSample(b, k, factor * TRUE_DECODE.predict_s(b, k)) for b, k in PLAN.decode_points],
    )
    return predictor


def prefill_errors(predictor: LatencyPredictor, noise: list[float]) -> list[float]:
    """Relative error of the prediction made before each observed prefill (shape i, observed
    time ``truth · noise[i]``) against what was observed, in order."""
    errors = []
    for (n, c), factor in zip(PREFILL_SHAPES, noise, strict=False):
        observed = TRUE_PREFILL.predict_s(n, c) * factor
        errors.append(abs(predictor.prefill_s(n, c) / observed - 1.0))
        predictor.observe_prefill(n, c, observed)
    return errors


@pytest.mark.parametrize("factor", [10.0, 0.1])
def test_a_model_10x_off_is_exact_from_the_fourth_request_on(factor: float) -> None:
    predictor = profiled(factor)
    errors = prefill_errors(predictor, [1.0] * len(PREFILL_SHAPES))
    # Requests 1-3 are predicted with the poisoned model (10x: +900 %; 0.1x: -90 %) ...
    assert errors[:CHANGE_RUN] == pytest.approx([abs(factor - 1.0)] * CHANGE_RUN, rel=1e-6)
    # ... the third observation is the change point: from the fourth request on the model is
    # the truth (the error was a pure scale; the level has < 4 residuals, all 0).
    assert max(errors[CHANGE_RUN:]) < 1e-6
    assert predictor.num_change_points == 1
    for n, c in PLAN.prefill_points:
        assert predictor.prefill_s(n, c) == pytest.approx(TRUE_PREFILL.predict_s(n, c), rel=1e-6)


@pytest.mark.parametrize("factor", [10.0, 0.1])
def test_the_decode_model_recovers_the_same_way(factor: float) -> None:
    predictor = profiled(factor)
    for index, (b, k) in enumerate(DECODE_SHAPES):
        truth = TRUE_DECODE.predict_s(b, k)
        error = abs(predictor.decode_step_s(b, k) / truth - 1.0)
        if index < CHANGE_RUN:
            assert error == pytest.approx(abs(factor - 1.0), rel=1e-6)
        else:
            assert error < 1e-6
        predictor.observe_decode_step(b, k, truth)
    assert predictor.num_change_points == 1


def test_with_noise_the_scale_is_the_median_of_the_three_ratios() -> None:
    predictor = profiled(10.0)
    errors = prefill_errors(predictor, [1.08, 0.93, 1.05, 1.0])
    # Median ratio 1.05/10: the model lands 5 % slow, whatever the shape (the fourth request's
    # error; the level takes over from the fourth observation on).
    assert errors[CHANGE_RUN] == pytest.approx(0.05, rel=1e-6)
    # The profile's anchors were rescaled too: a refit from them keeps the recovered speed.
    predictor.refit()
    assert predictor.prefill_s(3000, 16) == pytest.approx(
        1.05 * TRUE_PREFILL.predict_s(3000, 16), rel=1e-3
    )


def test_an_engine_that_turns_10x_slower_is_followed_and_older_observations_dropped() -> None:
    predictor = profiled(1.0)
    for n, c in PREFILL_SHAPES:
        predictor.observe_prefill(n, c, TRUE_PREFILL.predict_s(n, c))
    assert predictor.num_prefill_observations == len(PREFILL_SHAPES)
    errors = prefill_errors(predictor, [10.0] * 5)
    assert errors[:CHANGE_RUN] == pytest.approx([0.9] * CHANGE_RUN, rel=1e-6)
    assert max(errors[CHANGE_RUN:]) < 1e-6
    # The 7 observations of the fast regime contradict the rescaled model: dropped (they would
    # pull the level back); the 3 of the change point and the 2 after it remain.
    assert predictor.num_prefill_observations == 5
    assert predictor.prefill_s(2048, 0) == pytest.approx(
        10.0 * TRUE_PREFILL.predict_s(2048, 0), rel=1e-6
    )


def test_noise_and_moderate_drift_do_not_make_a_change_point() -> None:
    predictor = profiled(1.0)
    # Spikes both ways (a GC pause, a cache effect): never three the same way in a row.
    prefill_errors(predictor, [5.0, 0.2, 5.0, 5.0, 1.0, 0.2, 0.2])
    assert predictor.num_change_points == 0
    # 2.5x slower, consistently: within the factor; the level and the refits follow it.
    predictor = profiled(1.0)
    prefill_errors(predictor, [2.5] * len(PREFILL_SHAPES))
    assert predictor.num_change_points == 0


def test_the_detector_answers_the_median_ratio_of_a_run() -> None:
    detector = ChangeDetector(factor=CHANGE_FACTOR, run=CHANGE_RUN)
    assert detector.observe(3.0, 1.0) is None  # exactly the factor: agrees
    assert detector.observe(4.0, 1.0) is None
    assert detector.observe(0.1, 1.0) is None  # the other way: a new run
    assert detector.observe(0.2, 1.0) is None
    assert detector.observe(0.3, 1.0) == pytest.approx(0.2)  # 0.3 < 1/3: the third of the run
    assert detector.observe(0.1, 1.0) is None  # the run starts over
    detector = ChangeDetector(factor=3.0, run=2)
    assert detector.observe(8.0, 1.0) is None
    assert detector.observe(4.5, 1.0) == pytest.approx(6.0)  # even run: geometric middle
    assert detector.observe(5.0, 0.0) is None  # no prediction: nothing to compare
    with pytest.raises(ValueError):
        ChangeDetector(factor=1.0)
