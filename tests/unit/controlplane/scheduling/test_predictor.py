"""LatencyPredictor: formulas, the profile plan, NNLS fitting, online refits, rolling MAPE."""

from __future__ import annotations

import numpy as np
import pytest

from controlplane.scheduling.predictor.accuracy import PredictionAccuracy
from controlplane.scheduling.predictor.feedback import OVERHEAD_MIN_OBSERVATIONS, RollingMedian
from controlplane.scheduling.predictor.fitting import (
    DecodeSample,
    PrefillSample,
    fit_decode,
    fit_nonnegative,
    fit_prefill,
)
from controlplane.scheduling.predictor.model import (
    PRIOR_DECODE,
    PRIOR_PREFILL,
    PRIOR_TRANSFERS,
    DecodeCoefficients,
    PrefillCoefficients,
    TransferCoefficients,
    Transport,
    attention_pairs,
)
from controlplane.scheduling.predictor.plan import ProfilePlan
from controlplane.scheduling.predictor.predictor import LatencyPredictor

# A 7B-class model on one GPU, with an attention term that matters at long contexts (at 8k
# tokens it is ~30 % of the prefill), so that every coefficient is observable through 1 % noise.
TRUE_PREFILL = PrefillCoefficients(
    fixed_s=0.020, per_new_token_s=2e-4, per_cached_token_s=1e-5, per_attention_pair_s=2e-8
)
TRUE_DECODE = DecodeCoefficients(fixed_s=0.015, per_sequence_s=3e-4, per_context_token_s=4e-8)
PLAN = ProfilePlan.for_engine(max_model_len=8192, block_size=16, max_num_seqs=64)


def noisy_prefill(
    coefficients: PrefillCoefficients,
    points: list[tuple[int, int]],
    rng: np.random.Generator,
    noise: float = 0.01,
) -> list[PrefillSample]:
    return [
        PrefillSample(n, c, coefficients.predict_s(n, c) * (1.0 + rng.normal(0.0, noise)))
        for n, c in points
    ]


def noisy_decode(
    coefficients: DecodeCoefficients,
    points: list[tuple[int, int]],
    rng: np.random.Generator,
    noise: float = 0.01,
) -> list[DecodeSample]:
    return [
        DecodeSample(b, k, coefficients.predict_s(b, k) * (1.0 + rng.normal(0.0, noise)))
        for b, k in points
    ]


def relative_errors(fitted: tuple[float, ...], true: tuple[float, ...]) -> list[float]:
    return [abs(f / t - 1.0) for f, t in zip(fitted, true, strict=True)]


def profile_samples(
    rng: np.random.Generator, prefill: PrefillCoefficients = TRUE_PREFILL
) -> tuple[list[PrefillSample], list[DecodeSample]]:
    prefill_points = [p for p in PLAN.prefill_points for _ in range(PLAN.repeats)]
    decode_points = [p for p in PLAN.decode_points for _ in range(PLAN.repeats)]
    return (
        noisy_prefill(prefill, prefill_points, rng),
        noisy_decode(TRUE_DECODE, decode_points, rng),
    )


def random_prefill_points(rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
    new = rng.integers(1, 4097, size=count)
    cached = 16 * rng.integers(0, 257, size=count)
    return list(zip(new.tolist(), cached.tolist(), strict=True))


def random_decode_points(rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
    batch = rng.integers(1, 65, size=count)
    per_sequence = rng.integers(16, 4097, size=count)
    return list(zip(batch.tolist(), (batch * per_sequence).tolist(), strict=True))


# -- formulas ----------------------------------------------------------------------------------


def test_attention_pairs_counts_causal_query_key_pairs() -> None:
    # 3 new tokens after 2 cached: they attend 3, 4 and 5 tokens.
    assert attention_pairs(3, 2) == 12
    assert attention_pairs(1, 0) == 1
    assert attention_pairs(0, 100) == 0


def test_predictions_follow_the_documented_formulas() -> None:
    predictor = LatencyPredictor(
        PrefillCoefficients(0.01, 1e-4, 2e-6, 1e-9),
        DecodeCoefficients(0.02, 1e-4, 1e-8),
        {
            Transport.SHM: TransferCoefficients(1e-5, 1e10),
            Transport.TCP: TransferCoefficients(1e-4, 1e9),
            Transport.RDMA: TransferCoefficients(1e-5, 2e10),
        },
        TransferCoefficients(1e-4, 1e9),
    )
    # 0.01 + 1e-4·1000 + 2e-6·3000 + 1e-9·(1000·3000 + 1000·1001/2)
    assert predictor.prefill_s(1000, 3000) == pytest.approx(0.1195005, rel=1e-12)
    # two prompts of 500 new tokens: 2·0.01 + 1e-4·1000 + 1e-9·1000·(500 + 1)/2
    assert predictor.queue_s(1000, 2) == pytest.approx(0.1202505, rel=1e-12)
    assert predictor.queue_s(0, 0) == 0.0
    assert predictor.queue_s(100, 0) == pytest.approx(predictor.prefill_s(100, 0), rel=1e-12)
    assert predictor.decode_step_s(8, 10_000) == pytest.approx(0.0209, rel=1e-12)
    assert predictor.transfer_s(Transport.TCP, 10**9) == pytest.approx(1.0001, rel=1e-12)
    assert predictor.transfer_s(Transport.SHM, 0) == 0.0
    # 1 GB from DRAM over SHM + 1 GB from SSD (read, then over SHM)
    assert predictor.load_s(Transport.SHM, 10**9, 10**9) == pytest.approx(
        (1e-5 + 0.2) + (1e-4 + 1.0), rel=1e-12
    )


def test_priors_are_used_until_calibrated() -> None:
    predictor = LatencyPredictor()
    assert not predictor.calibrated
    assert predictor.prefill == PRIOR_PREFILL
    assert predictor.decode == PRIOR_DECODE
    assert predictor.transfer(Transport.RDMA) == PRIOR_TRANSFERS[Transport.RDMA]


def test_invalid_coefficients_and_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="coefficients must be finite and >= 0"):
        PrefillCoefficients(0.0, -1e-4, 0.0, 0.0)
    with pytest.raises(ValueError, match="coefficients must be finite and >= 0"):
        DecodeCoefficients(float("nan"), 0.0, 0.0)
    with pytest.raises(ValueError, match="bytes_per_s"):
        TransferCoefficients(0.0, 0.0)
    with pytest.raises(ValueError, match="no transfer model for"):
        LatencyPredictor(transfers={Transport.SHM: TransferCoefficients(0.0, 1.0)})
    with pytest.raises(ValueError, match="need at least 4 prefill samples"):
        fit_prefill([PrefillSample(1, 0, 0.1)] * 3)
    with pytest.raises(ValueError, match="bad decode sample"):
        fit_decode([DecodeSample(1, 10, 0.1), DecodeSample(2, 10, 0.0), DecodeSample(3, 1, 1.0)])
    with pytest.raises(ValueError, match="bad prefill sample"):
        LatencyPredictor().observe_prefill(-1, 0, 0.1)


# -- profile plan ------------------------------------------------------------------------------


def test_profile_plan_for_a_small_engine_is_exact() -> None:
    plan = ProfilePlan.for_engine(max_model_len=2048, block_size=128, max_num_seqs=8)
    assert plan.prefill_points == (
        (128, 0), (128, 512), (128, 1024), (128, 1792),
        (256, 0), (256, 512), (256, 1024), (256, 1664),
        (512, 0), (512, 512), (512, 1024), (512, 1408),
        (1024, 0), (1024, 512), (1024, 896),
        (1919, 0), (1919, 128),
    )  # fmt: skip
    assert plan.decode_points == (
        (1, 128), (1, 1024), (1, 2047),
        (2, 256), (2, 2048), (2, 4094),
        (4, 512), (4, 4096), (4, 8188),
        (8, 1024), (8, 8192), (8, 16376),
    )  # fmt: skip
    assert plan.repeats == 2


def test_profile_plan_fits_every_prompt_in_the_context() -> None:
    plan = ProfilePlan.for_engine(max_model_len=256, block_size=128, max_num_seqs=1)
    assert plan.prefill_points == ((63, 0), (63, 128), (127, 0), (127, 128), (255, 0))
    assert all(n + c <= 255 for n, c in plan.prefill_points)
    assert plan.decode_points == ((1, 128), (1, 255))
    with pytest.raises(ValueError, match="max_model_len >= 4"):
        ProfilePlan.for_engine(max_model_len=3, block_size=16, max_num_seqs=1)


# -- fitting -----------------------------------------------------------------------------------


def test_fit_nonnegative_clamps_what_least_squares_would_make_negative() -> None:
    # y = 2·x1 exactly, plus a column that least squares would weight negatively.
    x1 = np.array([1.0, 2.0, 3.0, 4.0])
    x2 = np.array([1.0, 0.0, 1.0, 0.0])
    targets = 2.0 * x1 - 0.3 * x2
    unconstrained, *_ = np.linalg.lstsq(np.column_stack((x1, x2)), targets, rcond=None)
    assert unconstrained[1] < 0
    fitted = fit_nonnegative(np.column_stack((x1, x2)), targets)
    assert fitted[1] == 0.0
    # The best non-negative fit with x2 at 0 is the 1-D least squares on x1.
    assert fitted[0] == pytest.approx(float(x1 @ targets / (x1 @ x1)), rel=1e-12)


def test_profile_fit_recovers_known_coefficients_within_5_percent() -> None:
    prefill, decode = profile_samples(np.random.default_rng(0))
    prefill_fit = fit_prefill(prefill)
    decode_fit = fit_decode(decode)
    assert max(relative_errors(prefill_fit.as_tuple(), TRUE_PREFILL.as_tuple())) < 0.05
    assert max(relative_errors(decode_fit.as_tuple(), TRUE_DECODE.as_tuple())) < 0.05


def test_noiseless_profile_fit_is_exact() -> None:
    prefill, decode = profile_samples(np.random.default_rng(0))
    exact_prefill = [s._replace(seconds=TRUE_PREFILL.predict_s(*s[:2])) for s in prefill]
    exact_decode = [s._replace(seconds=TRUE_DECODE.predict_s(*s[:2])) for s in decode]
    assert (
        max(relative_errors(fit_prefill(exact_prefill).as_tuple(), TRUE_PREFILL.as_tuple())) < 1e-6
    )
    assert max(relative_errors(fit_decode(exact_decode).as_tuple(), TRUE_DECODE.as_tuple())) < 1e-6


def test_a_weak_attention_term_still_gives_accurate_predictions() -> None:
    # When attention is 1-2 % of the time, 1 % noise hides its coefficient, but the predictions
    # it matters for stay within a few percent.
    weak = PrefillCoefficients(0.020, 2e-4, 1e-5, 2e-10)
    prefill, _ = profile_samples(np.random.default_rng(1), prefill=weak)
    fitted = fit_prefill(prefill)
    points = random_prefill_points(np.random.default_rng(2), 200)
    errors = [abs(fitted.predict_s(n, c) / weak.predict_s(n, c) - 1.0) for n, c in points]
    assert max(errors) < 0.02


def test_calibrate_replaces_the_priors() -> None:
    predictor = LatencyPredictor()
    predictor.calibrate(*profile_samples(np.random.default_rng(0)))
    assert predictor.calibrated
    assert max(relative_errors(predictor.prefill.as_tuple(), TRUE_PREFILL.as_tuple())) < 0.05
    assert max(relative_errors(predictor.decode.as_tuple(), TRUE_DECODE.as_tuple())) < 0.05


def test_online_refit_from_observations_alone_recovers_the_coefficients() -> None:
    rng = np.random.default_rng(3)
    predictor = LatencyPredictor(window=256, refit_every=32)  # priors: far from the truth
    for sample in noisy_prefill(TRUE_PREFILL, random_prefill_points(rng, 256), rng):
        predictor.observe_prefill(*sample)
    for sample in noisy_decode(TRUE_DECODE, random_decode_points(rng, 256), rng):
        predictor.observe_decode_step(*sample)
    assert max(relative_errors(predictor.prefill_fit.as_tuple(), TRUE_PREFILL.as_tuple())) < 0.05
    assert max(relative_errors(predictor.decode_fit.as_tuple(), TRUE_DECODE.as_tuple())) < 0.05
    # The level (median of the last residuals) only moves the fixed costs, by noise here.
    assert predictor.prefill.as_tuple()[1:] == predictor.prefill_fit.as_tuple()[1:]
    assert predictor.prefill.fixed_s == predictor.prefill_fit.fixed_s + predictor.prefill_level_s()


def test_refits_happen_every_refit_every_observations() -> None:
    predictor = LatencyPredictor(window=64, refit_every=10)
    rng = np.random.default_rng(4)
    samples = noisy_prefill(TRUE_PREFILL, random_prefill_points(rng, 10), rng, noise=0.0)
    for sample in samples[:9]:
        predictor.observe_prefill(*sample)
    assert predictor.prefill_fit == PRIOR_PREFILL
    predictor.observe_prefill(*samples[9])
    assert max(relative_errors(predictor.prefill_fit.as_tuple(), TRUE_PREFILL.as_tuple())) < 1e-6
    # Noiseless samples of the fitted model: no residual left, the level is 0.
    assert predictor.prefill_level_s() == pytest.approx(0.0, abs=1e-12)


def test_few_narrow_observations_do_not_override_the_profile() -> None:
    # 32 observations of one prompt shape (and 2.5x slower: within the change-point factor)
    # cannot pin 4 coefficients: the profile samples stay in the training set, so the shape's
    # own prediction moves but the model holds.
    rng = np.random.default_rng(5)
    predictor = LatencyPredictor(window=256, refit_every=32)
    predictor.calibrate(*profile_samples(rng))
    before = predictor.prefill.predict_s(4096, 0)
    for _ in range(32):
        predictor.observe_prefill(512, 0, 2.5 * TRUE_PREFILL.predict_s(512, 0))
    assert predictor.prefill.predict_s(4096, 0) == pytest.approx(before, rel=0.5)
    assert predictor.prefill.predict_s(512, 0) > 1.1 * TRUE_PREFILL.predict_s(512, 0)


def test_a_full_window_follows_drift_away_from_the_profile() -> None:
    rng = np.random.default_rng(6)
    predictor = LatencyPredictor(window=128, refit_every=32)
    predictor.calibrate(*profile_samples(rng))
    slower = PrefillCoefficients(*(2.0 * v for v in TRUE_PREFILL.as_tuple()))
    slower_decode = DecodeCoefficients(*(1.5 * v for v in TRUE_DECODE.as_tuple()))
    for sample in noisy_prefill(slower, random_prefill_points(rng, 128), rng):
        predictor.observe_prefill(*sample)
    for sample in noisy_decode(slower_decode, random_decode_points(rng, 128), rng):
        predictor.observe_decode_step(*sample)
    assert max(relative_errors(predictor.prefill.as_tuple(), slower.as_tuple())) < 0.05
    assert max(relative_errors(predictor.decode.as_tuple(), slower_decode.as_tuple())) < 0.05


# -- accuracy ----------------------------------------------------------------------------------


def test_prediction_accuracy_is_a_rolling_mape() -> None:
    accuracy = PredictionAccuracy(window=3)
    assert accuracy.ttft_mape is None
    assert accuracy.tpot_mape is None
    accuracy.observe_ttft(predicted_s=1.1, observed_s=1.0)  # 10 %
    accuracy.observe_ttft(predicted_s=0.5, observed_s=1.0)  # 50 %
    assert accuracy.ttft_mape == pytest.approx(0.30, rel=1e-12)
    accuracy.observe_ttft(predicted_s=2.0, observed_s=2.0)  # 0 %
    accuracy.observe_ttft(predicted_s=3.0, observed_s=2.0)  # 50 %; the 10 % leaves the window
    assert accuracy.ttft_mape == pytest.approx(1.0 / 3.0, rel=1e-12)
    assert accuracy.num_ttft == 3
    accuracy.observe_tpot(predicted_s=0.02, observed_s=0.025)  # 20 %
    assert accuracy.tpot_mape == pytest.approx(0.2, rel=1e-12)
    assert accuracy.num_tpot == 1


def test_prediction_accuracy_refuses_bad_timings() -> None:
    accuracy = PredictionAccuracy()
    with pytest.raises(ValueError, match="observed time must be finite and > 0"):
        accuracy.observe_ttft(0.1, 0.0)
    with pytest.raises(ValueError, match="predicted time must be finite and >= 0"):
        accuracy.observe_tpot(float("inf"), 0.1)
    with pytest.raises(ValueError, match="window must be >= 1"):
        PredictionAccuracy(window=0)


# -- overheads outside the engine ------------------------------------------------------------


def test_rolling_median_uses_its_seed_until_enough_observations() -> None:
    median = RollingMedian(window=4, min_count=3)
    assert median.value == 0.0
    median.seed(0.005)
    median.add(0.010)
    median.add(0.030)
    assert median.value == 0.005  # two observations: still the seed
    median.add(0.020)
    assert median.value == 0.020  # median of 0.010, 0.030, 0.020
    median.add(0.001)
    assert median.value == pytest.approx(0.015, rel=1e-12)  # even count: mean of the middle two
    median.add(0.001)  # the window keeps the last 4: 0.030, 0.020, 0.001, 0.001
    assert median.value == pytest.approx(0.0105, rel=1e-12)
    assert len(median) == 4


def test_rolling_median_is_clamped_at_zero_and_refuses_bad_values() -> None:
    median = RollingMedian(window=3)
    median.seed(-1.0)
    assert median.value == 0.0
    median.add(-0.002)  # a hand-off faster than a step: noise around 0
    assert median.value == 0.0
    with pytest.raises(ValueError, match="observation must be finite"):
        median.add(float("inf"))
    with pytest.raises(ValueError, match="seed must be finite"):
        median.seed(float("nan"))
    with pytest.raises(ValueError, match="min_count <= window"):
        RollingMedian(window=2, min_count=3)


def test_handoff_is_part_of_the_transfer_to_a_decode_instance() -> None:
    predictor = LatencyPredictor()
    assert predictor.handoff_s == 0.0 and predictor.ttft_overhead_s == 0.0
    prefill, decode = profile_samples(np.random.default_rng(7))
    predictor.calibrate(prefill, decode, ttft_overhead_s=0.004, handoff_s=0.012)
    assert (predictor.ttft_overhead_s, predictor.handoff_s) == (0.004, 0.012)
    # 0.012 hand-off + 20 us + 1 MB at 10 GB/s
    assert predictor.transfer_s(Transport.SHM, 10**6) == pytest.approx(0.01212, rel=1e-12)
    assert predictor.transfer_s(Transport.SHM, 0) == pytest.approx(0.012, rel=1e-12)
    # Loading from the pool is not a hand-off: the transport alone.
    assert predictor.load_s(Transport.SHM, 10**6, 0) == pytest.approx(0.00012, rel=1e-12)
    for i in range(OVERHEAD_MIN_OBSERVATIONS):
        predictor.observe_handoff(0.020 + 0.001 * i)
        predictor.observe_ttft_overhead(0.003)
    # 8 observations 0.020 .. 0.027: median 0.0235 replaces the profile's seed.
    assert predictor.handoff_s == pytest.approx(0.0235, rel=1e-12)
    assert predictor.ttft_overhead_s == pytest.approx(0.003, rel=1e-12)


def test_profile_plan_has_handoff_points_of_half_a_block_plus_one() -> None:
    assert ProfilePlan.for_engine(1024, 128, 8).handoff_points == ((65, 128), (65, 512))
    assert ProfilePlan.for_engine(8192, 16, 64).handoff_points == ((9, 16), (9, 4096))
    # A context too short for a cached block, a tail and the timed tokens: none.
    assert ProfilePlan.for_engine(64, 64, 1).handoff_points == ()


def test_the_level_moves_the_fixed_cost_by_the_weighted_median_residual() -> None:
    predictor = LatencyPredictor(decode=DecodeCoefficients(0.010, 0.0, 0.0))
    for seconds in (0.011, 0.012, 0.030):
        predictor.observe_decode_step(4, 1000, seconds)
    assert predictor.decode_level_s() == 0.0  # 3 observations: below LEVEL_MIN_OBSERVATIONS
    assert predictor.decode == predictor.decode_fit
    predictor.observe_decode_step(4, 1000, 0.040)
    # Residuals 1, 2, 20, 30 ms weighted 1/observed (90.9, 83.3, 33.3, 25): half the weight is
    # reached at 2 ms (the plain median would be 11 ms, pulled by the two slow steps).
    assert predictor.decode_level_s() == pytest.approx(0.002, rel=1e-9)
    assert predictor.decode.fixed_s == pytest.approx(0.012, rel=1e-9)
    assert predictor.decode_step_s(4, 1000) == pytest.approx(0.012, rel=1e-9)
    # A regime change: the last 8 steps (LEVEL_WINDOW) all take 25 ms: the level follows.
    for _ in range(8):
        predictor.observe_decode_step(4, 1000, 0.025)
    assert predictor.decode_step_s(4, 1000) == pytest.approx(0.025, rel=1e-9)


def test_the_level_never_makes_a_fixed_cost_negative() -> None:
    predictor = LatencyPredictor(prefill=PrefillCoefficients(0.010, 1e-4, 0.0, 0.0))
    for _ in range(4):
        # 12 ms faster than the fit's 20 ms (0.4x: within the change-point factor of 3)
        predictor.observe_prefill(100, 0, 0.008)
    assert predictor.prefill_level_s() == pytest.approx(-0.012, rel=1e-9)
    assert predictor.prefill == PrefillCoefficients(0.0, 1e-4, 0.0, 0.0)


def test_rolling_median_follows_every_new_value_though_it_keeps_the_last_one() -> None:
    median = RollingMedian(window=3, min_count=1)
    median.add(5.0)
    assert median.value == 5.0
    median.add(1.0)
    assert median.value == 3.0  # recomputed after the new value, not the kept 5.0
    median.add(2.0)
    assert median.value == median.value == 2.0
    median.add(9.0)  # 5.0 leaves the window: 1, 2, 9
    assert median.value == 2.0
    median.add(10.0)  # 2, 9, 10
    assert median.value == 9.0
