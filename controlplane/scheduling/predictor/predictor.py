"""One instance's latency model (:class:`LatencyPredictor`): priors, then the profile's fit,
then online refits from what the gateway observes."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from controlplane.scheduling.predictor.accuracy import PredictionAccuracy
from controlplane.scheduling.predictor.feedback import (
    CHANGE_FACTOR,
    CHANGE_RUN,
    OVERHEAD_MIN_OBSERVATIONS,
    OVERHEAD_WINDOW,
    ChangeDetector,
    RollingMedian,
    level_s,
    rescaled,
    training_set,
)
from controlplane.scheduling.predictor.fitting import (
    DecodeSample,
    PrefillSample,
    decode_features,
    fit_decode,
    fit_prefill,
    prefill_features,
    validate_samples,
)
from controlplane.scheduling.predictor.margin import TailRatio
from controlplane.scheduling.predictor.model import (
    PRIOR_DECODE,
    PRIOR_PREFILL,
    PRIOR_SSD_READ,
    PRIOR_TRANSFERS,
    DecodeCoefficients,
    PrefillCoefficients,
    TransferCoefficients,
    Transport,
)

FloatArray = npt.NDArray[np.float64]


# -- the predictor -----------------------------------------------------------------------------


class LatencyPredictor:
    """The latency model of one instance: priors, then the profile fit, then online refits.

    Owned by the registry (one per instance); policies only call the ``*_s`` methods.
    """

    __slots__ = (
        "_accuracy",
        "_calibrated",
        "_calibrated_prefill",
        "_change_points",
        "_decode",
        "_decode_change",
        "_decode_fit",
        "_decode_profile",
        "_decode_profile_fit",
        "_decode_since_fit",
        "_decode_window",
        "_handoff",
        "_prefill",
        "_prefill_change",
        "_prefill_fit",
        "_prefill_profile",
        "_prefill_profile_fit",
        "_prefill_since_fit",
        "_prefill_window",
        "_refit_every",
        "_ssd_read",
        "_transfers",
        "_ttft_overhead",
        "_ttft_ratio",
    )

    def __init__(
        self,
        prefill: PrefillCoefficients = PRIOR_PREFILL,
        decode: DecodeCoefficients = PRIOR_DECODE,
        transfers: Mapping[Transport, TransferCoefficients] = PRIOR_TRANSFERS,
        ssd_read: TransferCoefficients = PRIOR_SSD_READ,
        *,
        window: int = 256,
        refit_every: int = 32,
        change_factor: float = CHANGE_FACTOR,
        change_run: int = CHANGE_RUN,
    ) -> None:
        if window < 8 or refit_every < 1:
            raise ValueError("need window >= 8 and refit_every >= 1")
        missing = set(Transport) - set(transfers)
        if missing:
            raise ValueError(f"no transfer model for {sorted(t.value for t in missing)}")
        self._prefill_fit = self._prefill = prefill
        self._decode_fit = self._decode = decode
        self._transfers = dict(transfers)
        self._ssd_read = ssd_read
        self._refit_every = refit_every
        self._prefill_profile: tuple[PrefillSample, ...] = ()
        self._prefill_profile_fit = prefill
        self._calibrated_prefill = prefill
        self._decode_profile_fit = decode
        self._decode_profile: tuple[DecodeSample, ...] = ()
        self._prefill_window: deque[PrefillSample] = deque(maxlen=window)
        self._decode_window: deque[DecodeSample] = deque(maxlen=window)
        self._prefill_since_fit = 0
        self._decode_since_fit = 0
        self._calibrated = False
        self._accuracy = PredictionAccuracy()
        self._ttft_overhead = RollingMedian(OVERHEAD_WINDOW, OVERHEAD_MIN_OBSERVATIONS)
        self._handoff = RollingMedian(OVERHEAD_WINDOW, OVERHEAD_MIN_OBSERVATIONS)
        self._ttft_ratio = TailRatio()
        self._prefill_change = ChangeDetector(change_factor, change_run)
        self._decode_change = ChangeDetector(change_factor, change_run)
        self._change_points = 0

    # -- model state ---------------------------------------------------------------------------

    @property
    def prefill(self) -> PrefillCoefficients:
        """The prefill model in use: the fit with its fixed cost moved by the current level
        (:meth:`prefill_level_s`)."""
        return self._prefill

    @property
    def decode(self) -> DecodeCoefficients:
        """The decode-step model in use: the fit moved by the current level."""
        return self._decode

    @property
    def prefill_fit(self) -> PrefillCoefficients:
        """The last least-squares fit (profile, then refits), before the level correction."""
        return self._prefill_fit

    @property
    def decode_fit(self) -> DecodeCoefficients:
        return self._decode_fit

    @property
    def profile_prefill_fit(self) -> PrefillCoefficients:
        """The fit of the profile alone (the priors before one), rescaled by change points but
        not moved by refits: what another instance's profile of the same engine, taken in the
        same quiet conditions, is compared with (controlplane/scheduling/predictor/
        plausibility.py)."""
        return self._prefill_profile_fit

    @property
    def calibrated_prefill_fit(self) -> PrefillCoefficients:
        """The prefill fit as the profile measured it on an idle engine (the priors before
        one), moved by nothing since: not by refits, levels or change points (a busy host
        slows the engine for a while and makes change points too). What the quiet TTFT of
        admission is made of (``RequestCosts.quiet_ttft_s``)."""
        return self._calibrated_prefill

    @property
    def profile_decode_fit(self) -> DecodeCoefficients:
        return self._decode_profile_fit

    def prefill_level_s(self) -> float:
        """Median of ``observed - fit`` over the last ``LEVEL_WINDOW`` observed prefills (0
        before ``LEVEL_MIN_OBSERVATIONS``): how far the engine runs from its fit right now."""
        return level_s(self._prefill_window, self._prefill_fit.predict_s)

    def decode_level_s(self) -> float:
        """The same for decode steps."""
        return level_s(self._decode_window, self._decode_fit.predict_s)

    def _apply_levels(self) -> None:
        fit = self._prefill_fit
        self._prefill = replace(fit, fixed_s=max(0.0, fit.fixed_s + self.prefill_level_s()))
        step = self._decode_fit
        self._decode = replace(step, fixed_s=max(0.0, step.fixed_s + self.decode_level_s()))

    @property
    def calibrated(self) -> bool:
        """True once a profile was fitted (until then the priors are used)."""
        return self._calibrated

    @property
    def accuracy(self) -> PredictionAccuracy:
        """This instance's rolling TTFT/TPOT error (the registry also keeps a cluster-wide one)."""
        return self._accuracy

    @property
    def ssd_read(self) -> TransferCoefficients:
        return self._ssd_read

    @property
    def num_prefill_observations(self) -> int:
        """Observed prefills in the refit window (the profile's samples not counted)."""
        return len(self._prefill_window)

    @property
    def num_change_points(self) -> int:
        """Times the change-point rule rescaled a model (:class:`ChangeDetector`)."""
        return self._change_points

    def recent_prefill(self) -> tuple[PrefillSample, ...]:
        """The observed prefills in the refit window, oldest first."""
        return tuple(self._prefill_window)

    def recent_decode(self) -> tuple[DecodeSample, ...]:
        """The observed decode steps in the refit window, oldest first."""
        return tuple(self._decode_window)

    @property
    def ttft_overhead_s(self) -> float:
        """What a TTFT on this instance (as its prefill instance) holds beyond the engine's
        time: the gateway's own work before and after the Prefill rpc and the rpc itself. The
        median of the last observations (observed TTFT minus the engine time the worker
        reported), the profile's rpc overhead until there are ``OVERHEAD_MIN_OBSERVATIONS``,
        0 before both."""
        return self._ttft_overhead.value

    @property
    def quiet_ttft_overhead_s(self) -> float:
        """:attr:`ttft_overhead_s` in quiet conditions: the lower of the profile's measurement
        and the recent median (on a busy host the median also holds the gateway's queueing)."""
        return self._ttft_overhead.floor

    @property
    def handoff_s(self) -> float:
        """What taking over a prefilled request costs this (decode) instance beyond one decode
        step: the Decode rpc, the connector's load, the last partial block recomputed (the pool
        holds whole blocks only). The median of the last observations (first chunk's wait
        minus its tokens' steps), the profile's measurement until there are
        ``OVERHEAD_MIN_OBSERVATIONS``, 0 before both."""
        return self._handoff.value

    def transfer(self, transport: Transport) -> TransferCoefficients:
        return self._transfers[transport]

    # -- predictions ---------------------------------------------------------------------------

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float:
        return self._prefill.predict_s(new_tokens, cached_tokens)

    def queue_s(self, queued_tokens: int, queued_requests: int) -> float:
        """Time to clear queued prefill work: ``r`` prompts of ``t/r`` uncached tokens each."""
        if queued_tokens <= 0:
            return 0.0
        requests = max(1, queued_requests)
        p = self._prefill
        return (
            p.fixed_s * requests
            + p.per_new_token_s * queued_tokens
            + p.per_attention_pair_s * queued_tokens * (queued_tokens / requests + 1.0) / 2.0
        )

    def decode_step_s(self, batch_size: int, context_tokens: int) -> float:
        return self._decode.predict_s(batch_size, context_tokens)

    def transfer_s(self, transport: Transport, num_bytes: int) -> float:
        """Handing a request prefilled elsewhere to this instance, ``num_bytes`` of KV away:
        :attr:`handoff_s` plus the bytes over ``transport``. The policy spreads it over the
        output's gaps (the first gap pays it; TPOT is their mean)."""
        return self._handoff.value + self._transfers[transport].predict_s(num_bytes)

    def load_s(self, transport: Transport, dram_bytes: int, ssd_bytes: int) -> float:
        """Time to bring cached KV in from the pool: DRAM bytes over ``transport``; SSD bytes are
        read from disk first, then sent the same way."""
        seconds = self._transfers[transport].predict_s(dram_bytes + ssd_bytes)
        if ssd_bytes > 0:
            seconds += self._ssd_read.predict_s(ssd_bytes)
        return seconds

    # -- calibration ---------------------------------------------------------------------------

    def calibrate(
        self,
        prefill: Sequence[PrefillSample],
        decode: Sequence[DecodeSample],
        *,
        ttft_overhead_s: float | None = None,
        handoff_s: float | None = None,
    ) -> None:
        """Fit both models to a profile's timings (see :class:`ProfilePlan`); the samples stay as
        anchors for online refits until the recent window can stand alone. ``ttft_overhead_s``
        and ``handoff_s``, when the profile measured them, stand until observations replace
        them."""
        self._prefill_fit = fit_prefill(prefill)
        self._decode_fit = fit_decode(decode)
        self._apply_levels()
        self._prefill_profile, self._decode_profile = tuple(prefill), tuple(decode)
        self._prefill_profile_fit, self._decode_profile_fit = self._prefill_fit, self._decode_fit
        self._calibrated_prefill = self._prefill_fit
        if ttft_overhead_s is not None:
            self._ttft_overhead.seed(ttft_overhead_s)
        if handoff_s is not None:
            self._handoff.seed(handoff_s)
        self._prefill_change.reset()
        self._decode_change.reset()
        self._calibrated = True

    def adopt(self, sibling: LatencyPredictor) -> None:
        """Start from ``sibling``'s calibration: an instance of the same model on the same
        hardware runs at the same speed, so its profile beats the priors until this instance's
        own profile lands (which then replaces it through :meth:`calibrate`). Copies the fits,
        the profile anchors and the overheads' current values; not the sibling's recent
        observations (they describe its load, not this instance's)."""
        if not sibling.calibrated:
            raise ValueError("the sibling is not calibrated")
        self._prefill_fit, self._decode_fit = sibling._prefill_fit, sibling._decode_fit
        self._prefill_profile = sibling._prefill_profile
        self._decode_profile = sibling._decode_profile
        self._prefill_profile_fit = sibling._prefill_profile_fit
        self._calibrated_prefill = sibling._calibrated_prefill
        self._decode_profile_fit = sibling._decode_profile_fit
        self._ttft_overhead.seed(sibling.ttft_overhead_s)
        self._handoff.seed(sibling.handoff_s)
        self._apply_levels()
        self._prefill_change.reset()
        self._decode_change.reset()
        self._calibrated = True

    def observe_ttft_overhead(self, seconds: float) -> None:
        """One TTFT minus the engine time of its prefill on this instance (see
        :attr:`ttft_overhead_s`)."""
        self._ttft_overhead.add(seconds)

    def observe_ttft(self, predicted_s: float, observed_s: float, now: float) -> None:
        """A request's TTFT (this instance produced its first token) against its prediction:
        for :attr:`accuracy` and for :meth:`ttft_margin`. ``now``: the monotonic clock."""
        self._accuracy.observe_ttft(predicted_s, observed_s)
        self._ttft_ratio.add(predicted_s, observed_s, now)

    def ttft_margin(self, quantile: float, now: float) -> float:
        """The ``quantile`` of the recent observed/predicted TTFT ratios (at least 1; 1 with
        fewer than 8 in the last 30 s): what admission scales a busy instance's predicted TTFT
        by (controlplane/scheduling/predictor/margin.py)."""
        return self._ttft_ratio.quantile(quantile, now)

    def observe_handoff(self, seconds: float) -> None:
        """One take-over's first-chunk wait minus the steps of that chunk's tokens (see
        :attr:`handoff_s`); may be negative (noise), the estimate is clamped at 0."""
        self._handoff.add(seconds)

    def observe_prefill(self, new_tokens: int, cached_tokens: int, seconds: float) -> None:
        """One observed prefill (engine time, no queueing); refits every ``refit_every``, and
        rescales the model at once on a change point (:class:`ChangeDetector`)."""
        sample = PrefillSample(new_tokens, cached_tokens, seconds)
        validate_samples((sample,), 1, "prefill")
        scale = self._prefill_change.observe(seconds, self.prefill_s(new_tokens, cached_tokens))
        if scale is not None:
            fit = PrefillCoefficients(*(v * scale for v in self._prefill_fit.as_tuple()))
            self._prefill_fit = fit
            self._prefill_profile = rescaled(self._prefill_profile, scale)
            self._prefill_profile_fit = PrefillCoefficients(
                *(v * scale for v in self._prefill_profile_fit.as_tuple())
            )
            self._prefill_window = self._prefill_change.consistent(
                self._prefill_window, fit.predict_s
            )
            self._change_points += 1
        self._prefill_window.append(sample)
        self._prefill_since_fit += 1
        if self._prefill_since_fit >= self._refit_every:
            self.refit()
        else:
            self._apply_levels()

    def observe_decode_step(self, batch_size: int, context_tokens: int, seconds: float) -> None:
        """One observed decode step (or a mean over several of the same shape); the same
        change-point rule as :meth:`observe_prefill`."""
        sample = DecodeSample(batch_size, context_tokens, seconds)
        validate_samples((sample,), 1, "decode")
        scale = self._decode_change.observe(seconds, self.decode_step_s(batch_size, context_tokens))
        if scale is not None:
            step = DecodeCoefficients(*(v * scale for v in self._decode_fit.as_tuple()))
            self._decode_fit = step
            self._decode_profile = rescaled(self._decode_profile, scale)
            self._decode_profile_fit = DecodeCoefficients(
                *(v * scale for v in self._decode_profile_fit.as_tuple())
            )
            self._decode_window = self._decode_change.consistent(
                self._decode_window, step.predict_s
            )
            self._change_points += 1
        self._decode_window.append(sample)
        self._decode_since_fit += 1
        if self._decode_since_fit >= self._refit_every:
            self.refit()
        else:
            self._apply_levels()

    def refit(self) -> None:
        """Refit both models from the recent windows (plus the profile anchors when the window
        is not full or cannot determine every coefficient alone). Keeps the current model when
        there is too little data."""
        prefill = training_set(self._prefill_window, self._prefill_profile, prefill_features)
        if len(prefill) >= 8:
            self._prefill_fit = fit_prefill(prefill)
        decode = training_set(self._decode_window, self._decode_profile, decode_features)
        if len(decode) >= 6:
            self._decode_fit = fit_decode(decode)
        self._prefill_since_fit = 0
        self._decode_since_fit = 0
        self._apply_levels()
