"""The two-sample Kolmogorov-Smirnov test the tenant timing probe uses (benchmarks/harness.py):
the statistic exactly, the p-value against the Kolmogorov distribution's tabulated quantiles."""

from __future__ import annotations

import pytest

from benchmarks.harness import kolmogorov_q, ks_two_sample


@pytest.mark.parametrize(
    ("x", "tail"),
    [(1.2238, 0.10), (1.3581, 0.05), (1.6276, 0.01), (1.9495, 0.001)],
)
def test_the_kolmogorov_tail_at_its_tabulated_quantiles(x: float, tail: float) -> None:
    assert kolmogorov_q(x) == pytest.approx(tail, rel=2e-3)


def test_the_statistic() -> None:
    assert ks_two_sample([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])[0] == 1.0
    assert ks_two_sample([1.0, 1.0, 2.0], [1.0, 2.0, 2.0])[0] == pytest.approx(1 / 3)  # ties
    assert ks_two_sample([3.0, 1.0, 2.0], [2.0, 3.0, 1.0]) == (0.0, 1.0)
    with pytest.raises(ValueError):
        ks_two_sample([], [1.0])


def test_p_values_of_shifted_and_equal_samples() -> None:
    same = [float(i) for i in range(250)]
    shifted = [v + 125.0 for v in same]  # D = 0.5 over 250 + 250 values: p ~ 1e-27
    d, p = ks_two_sample(same, shifted)
    assert d == 0.5
    assert p < 1e-20
    interleaved = [v + 0.5 for v in same]  # D = 1/250
    assert ks_two_sample(same, interleaved)[1] == 1.0
