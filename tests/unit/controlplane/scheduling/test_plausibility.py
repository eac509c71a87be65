"""The plausibility checks a profile passes before it replaces an instance's model: physics, a
sibling's model (same role, model and hardware), and the online observations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controlplane.scheduling.predictor.fitting import (
    DecodeSample,
    PrefillSample,
    fit_decode,
    fit_prefill,
)
from controlplane.scheduling.predictor.model import DecodeCoefficients, PrefillCoefficients
from controlplane.scheduling.predictor.plan import ProfilePlan
from controlplane.scheduling.predictor.plausibility import (
    PlausibilityBounds,
    Reference,
    Rejection,
    check_profile,
)

TRUE_PREFILL = PrefillCoefficients(
    fixed_s=0.005, per_new_token_s=1e-4, per_cached_token_s=5e-6, per_attention_pair_s=1e-8
)
TRUE_DECODE = DecodeCoefficients(fixed_s=0.010, per_sequence_s=2e-4, per_context_token_s=2e-8)
PLAN = ProfilePlan.for_engine(max_model_len=1024, block_size=16, max_num_seqs=8)


def profile(
    prefill_factor: float = 1.0, decode_factor: float = 1.0, noise: float = 0.0, seed: int = 0
) -> tuple[list[PrefillSample], list[DecodeSample]]:
    rng = np.random.default_rng(seed)

    def jitter() -> float:
        return float(1.0 + rng.uniform(-noise, noise))

    return (
        [
            PrefillSample(n, c, prefill_factor * TRUE_PREFILL.predict_s(n, c) * jitter())
            for n, c in PLAN.prefill_points
        ],
        [
            DecodeSample(b, k, decode_factor * TRUE_DECODE.predict_s(b, k) * jitter())
            for b, k in PLAN.decode_points
        ],
    )


def sibling(name: str = "w1", noise: float = 0.1, seed: int = 1) -> Reference:
    """A sibling calibrated by an honest profile (10 % timing noise)."""
    prefill, decode = profile(noise=noise, seed=seed)
    return Reference(name, fit_prefill(prefill), fit_decode(decode))


def truth_observed(count: int) -> tuple[list[PrefillSample], list[DecodeSample]]:
    """Observations of the true engine at shapes the profile did not run."""
    prefill = [PrefillSample(37 * i + 5, 16 * (i % 5), 0.0) for i in range(count)]
    decode = [DecodeSample(1 + i % 8, 300 * (i + 1), 0.0) for i in range(count)]
    return (
        [s._replace(seconds=TRUE_PREFILL.predict_s(s[0], s[1])) for s in prefill],
        [s._replace(seconds=TRUE_DECODE.predict_s(s[0], s[1])) for s in decode],
    )


def test_an_honest_profile_is_accepted() -> None:
    prefill, decode = profile(noise=0.1, seed=2)
    observed_prefill, observed_decode = truth_observed(12)
    assert (
        check_profile(
            prefill,
            decode,
            siblings=[sibling()],
            observed_prefill=observed_prefill,
            observed_decode=observed_decode,
        )
        is None
    )


@pytest.mark.parametrize(
    ("factor", "words"), [(10.0, "10.0x slower than w1's"), (0.1, "10.0x faster than w1's")]
)
def test_a_profile_10x_off_its_sibling_is_rejected(factor: float, words: str) -> None:
    prefill, decode = profile(prefill_factor=factor)
    rejection = check_profile(prefill, decode, siblings=[sibling(noise=0.0)])
    assert rejection is not None and rejection.reason == "sibling"
    assert rejection.detail.startswith(f"prefill {words} at ")


def test_the_worst_point_is_named_and_within_the_factor_passes() -> None:
    # 2.5x slow everywhere: within the default factor of 3.
    prefill, decode = profile(prefill_factor=2.5, decode_factor=0.4)
    assert check_profile(prefill, decode, siblings=[sibling(noise=0.0)]) is None
    # A factor of 2 rejects it; the decode model is judged too.
    bounds = PlausibilityBounds(sibling_factor=2.0)
    prefill, _ = profile()
    _, decode = profile(decode_factor=0.4)
    assert check_profile(prefill, decode, siblings=[sibling(noise=0.0)], bounds=bounds) == (
        Rejection("sibling", "decode step 2.5x faster than w1's at batch 1, 16 context tokens")
    )
    # Unmeasured decode (a prefill worker: None) is not judged.
    assert check_profile(prefill, None, siblings=[sibling(noise=0.0)], bounds=bounds) is None


def test_the_siblings_median_is_the_reference() -> None:
    # One poisoned sibling among three does not decide: the median of their predictions does.
    prefill, decode = profile(noise=0.05, seed=3)
    poisoned = Reference(
        "w9",
        PrefillCoefficients(*(10.0 * v for v in TRUE_PREFILL.as_tuple())),
        TRUE_DECODE,
    )
    siblings = [sibling("w1", seed=4), poisoned, sibling("w2", seed=5)]
    assert check_profile(prefill, decode, siblings=siblings) is None


def test_garbage_points_are_rejected() -> None:
    rng = np.random.default_rng(7)
    garbage = [
        PrefillSample(n, c, float(10.0 ** rng.uniform(-4.0, 0.0))) for n, c in PLAN.prefill_points
    ]
    prefill, decode = profile()
    rejection = check_profile(garbage, decode)
    # Random times: the best non-negative fit of these is about a constant, far from them.
    assert rejection == Rejection(
        "non_physical", "prefill fit misses its own points by 98% (median)"
    )
    assert check_profile(garbage, decode, siblings=[sibling()]) == rejection
    # Times that grow with the prompt, scattered 10x either way: no line through them.
    rng = np.random.default_rng(0)
    scattered = [s._replace(seconds=s.seconds * float(10 ** rng.uniform(-1, 1))) for s in prefill]
    assert check_profile(scattered, decode, siblings=[sibling()]) == Rejection(
        "non_physical", "prefill fit misses its own points by 90% (median)"
    )


def test_a_profile_with_some_slow_outliers_is_accepted_since_its_fit_ignores_them() -> None:
    # Every other point 8x slow (calls that shared the engine): the fit of relative errors
    # follows the clean half, and the model is right.
    prefill, decode = profile()
    spiky = [s._replace(seconds=s.seconds * (8.0 if i % 2 else 1.0)) for i, s in enumerate(prefill)]
    assert check_profile(spiky, decode, siblings=[sibling()]) is None
    assert fit_prefill(spiky).predict_s(500, 0) == pytest.approx(
        TRUE_PREFILL.predict_s(500, 0), rel=0.1
    )


def test_non_physical_samples_and_fits_are_rejected() -> None:
    prefill, decode = profile()
    nan = [*prefill[:-1], prefill[-1]._replace(seconds=math.nan)]
    rejection = check_profile(nan, decode)
    assert rejection is not None and rejection.reason == "non_physical"
    assert rejection.detail.endswith("is not a time")
    negative = [*prefill[:-1], prefill[-1]._replace(seconds=-0.1)]
    assert check_profile(negative, decode) == Rejection(
        "non_physical", f"sample {tuple(negative[-1])} is not a time"
    )
    # Every prompt "takes" 10 ms: a worker that reports a constant, not a measurement.
    constant = [s._replace(seconds=0.010) for s in prefill]
    assert check_profile(constant, decode) == Rejection(
        "non_physical", "every prefill took the same 0.01 s"
    )
    # About 10 ms, with timing noise: a small model on a fast device, flat over the profile's
    # prompts. The fit is flat (no per-token term) and right: accepted.
    rng = np.random.default_rng(8)
    flat = [s._replace(seconds=0.010 * float(1.0 + rng.uniform(-0.05, 0.05))) for s in prefill]
    flat_fit = fit_prefill(flat)
    assert flat_fit.per_new_token_s == flat_fit.per_attention_pair_s == 0.0
    assert check_profile(flat, decode) is None
    assert check_profile(prefill[:3], decode) == Rejection(
        "non_physical", "need at least 4 prefill samples to fit, got 3"
    )


def test_observations_judge_a_profile_without_a_sibling() -> None:
    observed_prefill, observed_decode = truth_observed(8)
    prefill, decode = profile(prefill_factor=10.0)
    assert check_profile(
        prefill, decode, observed_prefill=observed_prefill, observed_decode=observed_decode
    ) == Rejection("observations", "prefill 10.0x slower than observed (median of 8)")
    prefill, decode = profile(decode_factor=0.2)
    assert check_profile(
        prefill, decode, observed_prefill=observed_prefill, observed_decode=observed_decode
    ) == Rejection("observations", "decode step 5.0x faster than observed (median of 8)")
    # Three observations are not evidence yet; and with neither a sibling nor observations
    # only physics can judge: the online change-point rule is the safety net then.
    prefill, decode = profile(prefill_factor=10.0)
    assert check_profile(prefill, decode, observed_prefill=observed_prefill[:3]) is None
    assert check_profile(prefill, decode) is None


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError):
        PlausibilityBounds(sibling_factor=1.0)
    with pytest.raises(ValueError):
        PlausibilityBounds(min_observations=0)
