"""simulator/profile.py: the step model's fit from measured points, and the profile files."""

from __future__ import annotations

from dataclasses import astuple
from pathlib import Path

import pytest
import yaml

from controlplane.scheduling import DecodeSample, PrefillSample
from simulator.profile import (
    StepFit,
    StepModel,
    fit_step_model,
    load_profile,
    profile_from_mapping,
    profile_yaml,
)

PROFILES = Path(__file__).resolve().parents[3] / "simulator/profiles"


def test_the_fit_recovers_the_step_model_that_timed_the_points() -> None:
    truth = StepModel(4e-3, 2e-5, 3e-6, 5e-9, 4e-4, 2e-7)
    prefill = [
        PrefillSample(n, c, truth.prefill_s(n, c))
        for n in (16, 64, 256, 1024)
        for c in (0, 256, 1024)
    ]
    decode = [
        DecodeSample(b, b * k, truth.decode_step_s(b, b * k))
        for b in (1, 4, 16, 32)
        for k in (16, 512, 2048)
    ]
    fit = fit_step_model(prefill, decode)
    assert fit.num_points == 24
    assert astuple(fit.step) == pytest.approx(astuple(truth), rel=1e-6)
    assert fit.mape < 1e-9 and fit.max_error < 1e-9


def test_the_fit_keeps_every_coefficient_non_negative_and_reports_its_error() -> None:
    # Prefill times that fall with the cached tokens: the per-cached-token cost pins at 0.
    prefill = [PrefillSample(64, c, 0.010 - 1e-6 * c) for c in (0, 512, 1024, 2048)]
    decode = [DecodeSample(b, 64 * b, 0.005 + 1e-3 * b) for b in (1, 2, 4, 8)]
    fit = fit_step_model(prefill, decode)
    assert min(astuple(fit.step)) >= 0.0 and fit.step.per_cached_token_s == 0.0
    assert 0.0 < fit.mape <= fit.max_error


def test_too_few_or_bad_points_are_refused() -> None:
    decode = [DecodeSample(b, 64 * b, 0.01) for b in (1, 2, 4)]
    with pytest.raises(ValueError, match="need at least 4 prefill samples to fit, got 3"):
        fit_step_model([PrefillSample(16 * i, 0, 0.01) for i in (1, 2, 3)], decode)
    prefill = [PrefillSample(16 * i, 0, 0.01) for i in (1, 2, 3, 4)]
    with pytest.raises(ValueError, match="need at least 3 decode samples"):
        fit_step_model(prefill, decode[:2])
    with pytest.raises(ValueError, match="bad decode sample"):
        fit_step_model(prefill, [*decode, DecodeSample(8, 512, 0.0)])


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.yaml")), ids=lambda p: p.stem)
def test_a_profile_file_is_what_profile_yaml_writes(path: Path) -> None:
    """The published profiles round-trip: read, then written again, byte for byte."""
    profile = load_profile(path)
    fit = yaml.safe_load(path.read_text())["fit"]
    written = profile_yaml(
        profile, StepFit(profile.step, fit["mape"], fit["max_error"], fit["grid_points"])
    )
    assert written == path.read_text()


def test_extra_lines_are_kept_and_ignored_by_the_reader() -> None:
    profile = load_profile(PROFILES / "llama2-7b-a100.yaml")
    text = profile_yaml(profile, extra=["samples:", "  decode:", "  - [1, 16, 0.01]"])
    data = yaml.safe_load(text)
    assert data["samples"] == {"decode": [[1, 16, 0.01]]} and "fit" not in data
    assert profile_from_mapping(data, "written") == profile
