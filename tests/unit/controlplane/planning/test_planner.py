"""The planner's choices on a table of loads against hand-computed pool sizes
(docs/design/planner.md §4), its forecasts, bounds and hysteresis."""

from __future__ import annotations

import math

import pytest

from controlplane.planning import (
    ConstantForecast,
    DynamoSla,
    HoltForecast,
    LoadForecast,
    LoadMeter,
    LoadSample,
    PlannerConfig,
    PoolSizes,
    SloModel,
    make_planner,
)
from controlplane.planning.policies import best_decode_batch


class LinearModel:
    """prefill_s(new, cached) = 0.02 + 1e-4·new; decode_step_s(b, k) = 0.01 + 0.001·b + 1e-6·k;
    no TTFT overhead."""

    ttft_overhead_s = 0.0

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float:
        return 0.02 + 1e-4 * new_tokens

    def decode_step_s(self, batch_size: int, context_tokens: int) -> float:
        return 0.01 + 0.001 * batch_size + 1e-6 * context_tokens


MODEL = LinearModel()
CONFIG = PlannerConfig(
    ttft_slo_s=2.0,
    tpot_slo_s=0.05,
    max_num_seqs=64,
    kv_capacity_tokens=200_000,
    interval_s=60.0,
    engine_start_s=0.0,
)


def forecast(rate: float, prompt: float, computed: float, output: float) -> LoadForecast:
    return LoadForecast(rate, prompt, computed, output)


def sample(rate: float, prompt: int, computed: int, output: int, **kw: float) -> LoadSample:
    n = round(rate * 60)
    return LoadSample(60.0, n, n * prompt, n * computed, n * output, n, **kw)  # type: ignore[arg-type]


# (rate, prompt, computed, output) -> (prefill, decode), computed by hand:
#   prefill t = 0.02 + 1e-4·computed; rho* = 1 - ln(10)·t/2; n_P = ceil(rate·t/rho*)
#   decode c = prompt + output/2; b* = largest b <= 64 with 0.01 + (0.001 + 1e-6·c)·b <= 0.05
#          and b·(prompt + output) <= 200,000; n_D = ceil(rate·output·step(b*) / b*)
SLO_TABLE = [
    # the worked example: t = 0.12, rho* = 0.861845, 1.2/0.8618 -> 2; b* = 12, 94.4/12 -> 8
    ((10.0, 2000, 1000, 200), (2, 8)),
    # nothing cached: t = 0.22, rho* = 0.746716, 2.2/0.7467 = 2.946 -> 3; decode as above
    ((10.0, 2000, 2000, 200), (3, 8)),
    # short prompts: t = 0.03, rho* = 0.965461, 3/0.9655 = 3.107 -> 4;
    #   c = 150, step = 0.01 + 0.00115·b <= 0.05 -> b <= 34.78, b* = 34, step 0.0491,
    #   running 100·100·0.0491 = 491 -> 491/34 = 14.44 -> 15
    ((100.0, 100, 100, 100), (4, 15)),
    # long contexts: c = 20,500, step = 0.01 + 0.0215·b -> b* = 1 (0.0315); t = 0.02 + 2 =
    #   2.02 >= the 2 s budget: unattainable, sized at 0.8: 2.02/0.8 = 2.525 -> 3;
    #   running 1·1000·0.0315 = 31.5 -> 32
    ((1.0, 20000, 20000, 1000), (3, 32)),
    # slow prompts: t = 0.02 + 0.7 = 0.72, rho* = 1 - ln(10)·0.36 = 0.171 -> the 0.25 floor:
    #   2·0.72/0.25 = 5.76 -> 6; c = 7,100, step = 0.01 + 0.0081·b -> b* = 4 (0.0424),
    #   running 2·200·0.0424 = 16.96 -> 16.96/4 = 4.24 -> 5
    ((2.0, 7000, 7000, 200), (6, 5)),
    # no load
    ((0.0, 2000, 1000, 200), (0, 0)),
]


@pytest.mark.parametrize(("load", "sizes"), SLO_TABLE)
def test_slo_model_sizes_match_hand_computed_ones(
    load: tuple[float, int, int, int], sizes: tuple[int, int]
) -> None:
    assert SloModel().size(forecast(*load), MODEL, None, CONFIG) == PoolSizes(*sizes)


def test_the_prefill_utilization_is_the_mm1_tail_bound() -> None:
    rho = SloModel.prefill_utilization
    assert rho(0.12, 2.0, 0.9) == pytest.approx(1 - math.log(10) * 0.06)
    assert rho(0.72, 2.0, 0.9) == 0.25  # the floor: the tail would cost > 4x the GPUs
    assert rho(2.5, 2.0, 0.9) == 0.8  # one prompt alone misses the budget: carry the load


def test_the_ttft_budget_leaves_out_the_models_overhead() -> None:
    class Slower(LinearModel):
        ttft_overhead_s = 1.0  # half the SLO goes to the gateway and the hand-off

    # t = 0.12 within a 1 s budget: rho* = 1 - ln(10)·0.12 = 0.7237, 1.2/0.7237 = 1.66 -> 2;
    # at 20 requests/s: 2.4/0.7237 = 3.32 -> 4 (against 2.4/0.8618 = 2.78 -> 3 without it)
    sized = SloModel().size(forecast(20.0, 2000, 1000, 200), Slower(), None, CONFIG)
    assert sized.prefill == 4
    assert SloModel().size(forecast(20.0, 2000, 1000, 200), MODEL, None, CONFIG).prefill == 3


# Dynamo's formulas, no observation (corrections 1): n_P = ceil(rate·prefill_s(prompt, 0)),
# n_D = ceil(rate·output / (b/step(b))) with b from the ITL SLO as above.
DYNAMO_TABLE = [
    # prefill_s(2000, 0) = 0.22 -> ceil(2.2) = 3; b = 12, 254.24 tokens/s -> ceil(7.87) = 8
    ((10.0, 2000, 1000, 200), None, (3, 8)),
    # observed TTFT half the expected: prefill load x0.5 -> ceil(1.1) = 2
    ((10.0, 2000, 1000, 200), {"ttft_s": 0.11}, (2, 8)),
    # observed TTFT twice the expected: min(1, 2) = 1 -> 3
    ((10.0, 2000, 1000, 200), {"ttft_s": 0.44}, (3, 8)),
    # observed ITL 1.25x the model's at batch 12 (0.059 vs 0.0472): ITL target 0.04 ->
    #   0.01 + 0.0031·b <= 0.04 -> b = 9, step 0.0379, 237.47 tokens/s -> ceil(8.42) = 9
    ((10.0, 2000, 1000, 200), {"itl_s": 0.059, "decode_batch": 12.0}, (3, 9)),
]


@pytest.mark.parametrize(("load", "observed", "sizes"), DYNAMO_TABLE)
def test_dynamo_sla_sizes_match_hand_computed_ones(
    load: tuple[float, int, int, int], observed: dict[str, float] | None, sizes: tuple[int, int]
) -> None:
    last = sample(*load, **observed) if observed is not None else None
    assert DynamoSla().size(forecast(*load), MODEL, last, CONFIG) == PoolSizes(*sizes)


def test_best_decode_batch_respects_the_step_limit_kv_and_max_num_seqs() -> None:
    assert best_decode_batch(MODEL, 0.05, 2100, 2200, 64, 200_000) == 12
    assert best_decode_batch(MODEL, 0.05, 2100, 2200, 64, 22_000) == 10  # KV: 10·2,200
    assert best_decode_batch(MODEL, 0.05, 2100, 2200, 5, 200_000) == 5
    assert best_decode_batch(MODEL, 0.001, 2100, 2200, 64, 200_000) == 1  # even one misses


def test_holt_follows_a_ramp_and_projects_its_trend() -> None:
    holt = HoltForecast(alpha=0.5, beta=0.3)
    assert holt.forecast(60.0) is None
    for rate in (10.0, 12.0, 14.0, 16.0, 18.0, 20.0):
        holt.observe(sample(rate, 1000, 500, 100))
    ahead = holt.forecast(120.0)  # two intervals ahead
    assert ahead is not None
    assert 20.0 < ahead.rate_rps < 26.0  # the ramp goes on (+2/interval)
    assert ahead.prompt_tokens == pytest.approx(1000)
    assert ahead.computed_tokens == pytest.approx(500)
    constant = ConstantForecast()
    constant.observe(sample(18.0, 1000, 500, 100))
    constant.observe(sample(20.0, 1000, 500, 100))
    assert constant.forecast(120.0) == LoadForecast(20.0, 1000.0, 500.0, 100.0)


def test_the_forecast_never_goes_below_zero() -> None:
    holt = HoltForecast(alpha=1.0, beta=1.0)
    for rate in (30.0, 10.0, 0.0):
        holt.observe(sample(rate, 1000, 500, 100))
    ahead = holt.forecast(600.0)
    assert ahead is not None and ahead.rate_rps == 0.0


def test_bounds_keep_minimums_and_share_the_budget() -> None:
    config = PlannerConfig(
        ttft_slo_s=2.0, tpot_slo_s=0.05, max_num_seqs=64, kv_capacity_tokens=200_000,
        max_instances=10, min_prefill=1, min_decode=2,
    )  # fmt: skip
    planner = make_planner("strata", config)
    assert planner.bounded(PoolSizes(0, 0)) == PoolSizes(1, 2)
    assert planner.bounded(PoolSizes(3, 4)) == PoolSizes(3, 4)
    assert planner.bounded(PoolSizes(10, 30)) == PoolSizes(2, 8)  # 25 % of 10, rounded
    assert planner.bounded(PoolSizes(30, 1)) == PoolSizes(8, 2)  # decode keeps its minimum


def test_a_held_pool_leaves_the_other_only_what_the_budget_has_left() -> None:
    # Budget 10, pools (6, 4). The load turns decode-heavy: (2, 8) wanted. Prefill is held by
    # hysteresis (its window is not settled), so decode may grow only into 10 - 6 = 4 now.
    config = PlannerConfig(
        ttft_slo_s=2.0, tpot_slo_s=0.05, max_num_seqs=64, kv_capacity_tokens=200_000,
        max_instances=10, engine_start_s=0.0, scale_down_after=2,
    )  # fmt: skip
    planner = make_planner("strata", config)
    planner.forecaster = ConstantForecast()
    current = planner.plan(sample(10.0, 2000, 1000, 200), PoolSizes(6, 4), MODEL)
    assert current == PoolSizes(6, 4)  # (2, 8) wanted; prefill held at 6: decode 4
    current = planner.plan(sample(10.0, 2000, 1000, 200), current, MODEL)
    assert current == PoolSizes(2, 8)  # settled: prefill down, decode up


def test_limits_can_change_without_losing_the_forecast() -> None:
    planner = make_planner("strata", CONFIG)
    planner.plan(sample(10.0, 2000, 1000, 200), PoolSizes(1, 1), MODEL)
    planner.set_limits(max_num_seqs=5, kv_capacity_tokens=200_000)
    assert planner.config.max_num_seqs == 5
    # b* = 5 now (was 12): step 0.0255, running 10·200·0.0255 = 51 -> 51/5 = 10.2 -> 11
    assert planner.plan(sample(10.0, 2000, 1000, 200), PoolSizes(2, 8), MODEL).decode == 11


def test_hysteresis_scales_up_at_once_and_down_after_a_settled_window() -> None:
    config = PlannerConfig(
        ttft_slo_s=2.0, tpot_slo_s=0.05, max_num_seqs=64, kv_capacity_tokens=200_000,
        engine_start_s=0.0, scale_down_after=3,
    )  # fmt: skip
    planner = make_planner("strata", config)
    planner.forecaster = ConstantForecast()  # exact sizes per interval for this test
    current = PoolSizes(1, 1)
    plans = []
    for rate in (10.0, 10.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0):
        current = planner.plan(sample(rate, 2000, 1000, 200), current, MODEL)
        plans.append((current.prefill, current.decode))
    # rate 10 -> (2, 8); rate 1 -> (1, 1); rate 5 -> (1, 4); each pool on its own:
    assert plans == [
        (2, 8),  # up at once
        (2, 8),
        (2, 8),  # down wanted, but the window [8, 8, 1] still holds a larger target
        (2, 8),  # [8, 1, 1]
        (1, 4),  # [1, 1, 4]: every target below the pools: down to the largest of them
        (1, 4),  # [1, 4, 1]
        (1, 4),  # [4, 1, 1]
        (1, 1),  # [1, 1, 1]
    ]


def test_the_dynamo_planner_applies_each_target_at_once() -> None:
    planner = make_planner("dynamo", CONFIG)
    current = PoolSizes(1, 1)
    current = planner.plan(sample(10.0, 2000, 1000, 200), current, MODEL)
    assert current == PoolSizes(3, 8)
    current = planner.plan(sample(1.0, 2000, 1000, 200), current, MODEL)
    assert current == PoolSizes(1, 1)


def test_the_meter_sums_an_interval_and_starts_the_next() -> None:
    meter = LoadMeter()
    meter.arrived(1000, 400)
    meter.arrived(3000, 5000)  # more computed than prompt: capped
    meter.first_token(0.5)
    meter.first_token(1.5)
    meter.finished(100, 0.02)
    meter.finished(1, None)
    sample = meter.take(30.0, decode_batch=3.0)
    assert sample == LoadSample(30.0, 2, 4000, 3400, 101, 2, 1.0, 0.02, 3.0)
    assert meter.take(30.0) == LoadSample(30.0, 0, 0, 0, 0, 0)


def test_a_request_s_samples_are_one_request_of_their_summed_output() -> None:
    meter = LoadMeter()
    meter.arrived(100, 100)  # one request with n = 3
    meter.finished(10, 0.02)  # its first sample
    meter.finished(12, 0.02, request=False)
    meter.finished(8, None, request=False)
    sample = meter.take(30.0)
    assert (sample.requests, sample.output_tokens, sample.finished) == (1, 30, 1)


def test_output_means_come_from_finished_requests() -> None:
    # Requests arrive in one interval and finish in the next: the output mean is kept.
    holt = HoltForecast()
    holt.observe(LoadSample(60.0, 60, 60_000, 30_000, 0, 0))
    holt.observe(LoadSample(60.0, 0, 0, 0, 6_000, 60))
    ahead = holt.forecast(60.0)
    assert ahead is not None
    assert (ahead.prompt_tokens, ahead.computed_tokens) == (1000.0, 500.0)
    assert ahead.output_tokens == 100.0  # first seen in the second interval


def test_config_and_names_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown planner"):
        make_planner("magic", CONFIG)
    with pytest.raises(ValueError, match="ttft_slo_s"):
        PlannerConfig(ttft_slo_s=0.0, tpot_slo_s=0.05, max_num_seqs=1, kv_capacity_tokens=1)
    with pytest.raises(ValueError, match="computed_tokens"):
        LoadSample(60.0, 1, 10, 11, 1)
