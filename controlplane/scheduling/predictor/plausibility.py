"""Is a profile plausible? The checks a start-up profile passes before its fit replaces an
instance's model (docs/design/scheduling.md §2.3, "Plausibility").

A profile is a few dozen timed calls on a worker that may be shared, throttled, mid-compile or
misreporting; a wrong one would poison every decision on that instance until the refits undo it.
So before :meth:`LatencyPredictor.calibrate` takes it, :func:`check_profile` asks:

* **Physical**: every sample finite and > 0; not every prefill the same time (a constant is
  not a timing); a decode step takes time; each fit explains its own points (median relative
  residual ≤ ``max_fit_error``: random timings do not fit a line). The fit's coefficients are
  non-negative by construction (NNLS), so it never falls with the prompt; a flat one is allowed
  (a small model on a fast device really is flat over the profile's context).
* **Siblings** (instances of the same role, model fingerprint and hardware identity): at every
  point of the profile, its fit predicts within ``sibling_factor`` of the siblings' (their
  median at that point).
* **Observations** (what this instance and its siblings served: solo prefills' engine times,
  decode steps): the median of observed / predicted is within ``observed_factor`` of 1, once
  there are ``min_observations``.

Pure computation, like the rest of the package.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from controlplane.scheduling.predictor.fitting import (
    DecodeSample,
    PrefillSample,
    fit_decode,
    fit_prefill,
)
from controlplane.scheduling.predictor.model import DecodeCoefficients, PrefillCoefficients

__all__ = ["PlausibilityBounds", "Reference", "Rejection", "check_profile"]


@dataclass(frozen=True, slots=True)
class PlausibilityBounds:
    sibling_factor: float = 3.0
    """Largest ratio (either way) between the profile's prediction and its siblings' at a point."""
    observed_factor: float = 3.0
    """Largest median ratio (either way) between observed times and the profile's predictions."""
    min_observations: int = 4
    """Observations (of prefills; of decode steps) needed before they judge a profile."""
    max_fit_error: float = 0.5
    """Largest median relative residual of a fit over its own points."""

    def __post_init__(self) -> None:
        if not (self.sibling_factor > 1.0 and self.observed_factor > 1.0):
            raise ValueError("plausibility factors must be > 1")
        if self.min_observations < 1 or not self.max_fit_error > 0.0:
            raise ValueError("need min_observations >= 1 and max_fit_error > 0")


@dataclass(frozen=True, slots=True)
class Reference:
    """A sibling's model: what a plausible profile of this engine should come close to."""

    name: str
    prefill: PrefillCoefficients
    decode: DecodeCoefficients


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    """``non_physical``, ``sibling`` or ``observations`` (the metric's label)."""
    detail: str
    """What was off, with the figures (logged, and the instance's profile state)."""


def check_profile(
    prefill: Sequence[PrefillSample],
    decode: Sequence[DecodeSample] | None,
    *,
    siblings: Sequence[Reference] = (),
    observed_prefill: Sequence[PrefillSample] = (),
    observed_decode: Sequence[DecodeSample] = (),
    bounds: PlausibilityBounds = PlausibilityBounds(),
) -> Rejection | None:
    """None if the profile is plausible, else why not. ``decode`` is None when the profile did
    not measure decode steps (a prefill worker; too few points): only the prefill is judged."""
    for sample in (*prefill, *(decode or ())):
        *sizes, seconds = sample
        if any(size < 0 for size in sizes) or not (math.isfinite(seconds) and seconds > 0.0):
            return Rejection("non_physical", f"sample {tuple(sample)} is not a time")
    try:
        prefill_fit = fit_prefill(prefill)
        decode_fit = fit_decode(decode) if decode is not None else None
    except ValueError as exc:
        return Rejection("non_physical", str(exc))
    times = [s.seconds for s in prefill]
    if max(times) <= min(times) * (1.0 + 1e-9):
        # A flat fit alone is no fault (a small model on a fast device: prompts of up to the
        # profile's context cost the same), but identical times are a constant, not a timing.
        return Rejection("non_physical", f"every prefill took the same {times[0]:.6g} s")
    prefill_error = _median_error(prefill, prefill_fit.predict_s)
    if prefill_error > bounds.max_fit_error:
        return Rejection(
            "non_physical", f"prefill fit misses its own points by {prefill_error:.0%} (median)"
        )
    if decode is not None and decode_fit is not None:
        if min(decode_fit.predict_s(s.batch_size, s.context_tokens) for s in decode) <= 0.0:
            return Rejection("non_physical", "a decode step takes no time")
        decode_error = _median_error(decode, decode_fit.predict_s)
        if decode_error > bounds.max_fit_error:
            return Rejection(
                "non_physical", f"decode fit misses its own points by {decode_error:.0%} (median)"
            )
    if siblings:
        points = sorted({(s.new_tokens, s.cached_tokens) for s in prefill})
        off = _worst_ratio(points, prefill_fit.predict_s, [r.prefill.predict_s for r in siblings])
        if off is not None and _beyond(off[0], bounds.sibling_factor):
            return Rejection(
                "sibling",
                f"prefill {_times(off[0])} {_names(siblings)}'s at {off[1][0]} new, "
                f"{off[1][1]} cached tokens",
            )
        if decode is not None and decode_fit is not None:
            steps = sorted({(s.batch_size, s.context_tokens) for s in decode})
            off = _worst_ratio(steps, decode_fit.predict_s, [r.decode.predict_s for r in siblings])
            if off is not None and _beyond(off[0], bounds.sibling_factor):
                return Rejection(
                    "sibling",
                    f"decode step {_times(off[0])} {_names(siblings)}'s at batch {off[1][0]}, "
                    f"{off[1][1]} context tokens",
                )
    if len(observed_prefill) >= bounds.min_observations:
        ratio = _median_ratio(observed_prefill, prefill_fit.predict_s)
        if _beyond(ratio, bounds.observed_factor):
            return Rejection(
                "observations",
                f"prefill {_times(1.0 / ratio)} observed (median of {len(observed_prefill)})",
            )
    if decode_fit is not None and len(observed_decode) >= bounds.min_observations:
        ratio = _median_ratio(observed_decode, decode_fit.predict_s)
        if _beyond(ratio, bounds.observed_factor):
            return Rejection(
                "observations",
                f"decode step {_times(1.0 / ratio)} observed (median of {len(observed_decode)})",
            )
    return None


Predict = Callable[[int, int], float]


def _median_error(samples: Sequence[PrefillSample] | Sequence[DecodeSample], fit: Predict) -> float:
    return statistics.median(abs(fit(s[0], s[1]) / s.seconds - 1.0) for s in samples)


def _median_ratio(samples: Sequence[PrefillSample] | Sequence[DecodeSample], fit: Predict) -> float:
    """Median of observed / predicted (an observation the fit predicts as 0 counts as infinitely
    slower)."""
    ratios = [s.seconds / p if (p := fit(s[0], s[1])) > 0.0 else math.inf for s in samples]
    return statistics.median(ratios)


def _worst_ratio(
    points: Sequence[tuple[int, int]], fit: Predict, references: Sequence[Predict]
) -> tuple[float, tuple[int, int]] | None:
    """The point where ``fit`` is furthest (as a factor) from the references' median, and the
    ratio fit / reference there."""
    worst: tuple[float, tuple[int, int]] | None = None
    for point in points:
        reference = statistics.median(r(*point) for r in references)
        mine = fit(*point)
        if reference <= 0.0 or mine <= 0.0:
            continue
        ratio = mine / reference
        # Ties (a profile off by one factor everywhere) name the first point.
        if worst is None or abs(math.log(ratio)) > abs(math.log(worst[0])) * (1.0 + 1e-9):
            worst = (ratio, point)
    return worst


def _beyond(ratio: float, factor: float) -> bool:
    return not (1.0 / factor <= ratio <= factor)


def _times(ratio: float) -> str:
    """``10.2x slower than`` / ``8.0x faster than`` (the log and the profile state)."""
    if ratio >= 1.0:
        return f"{ratio:.1f}x slower than"
    return f"{1.0 / ratio:.1f}x faster than"


def _names(references: Sequence[Reference]) -> str:
    return "/".join(r.name for r in references)
