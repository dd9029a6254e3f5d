"""Confidence intervals over seeds, against hand-computed Student-t intervals."""

import math

import pytest

from fedpeft.stats import curve_band, format_ci, mean_ci, t_quantile


def test_t_interval_of_one_two_three_four_matches_the_hand_computed_half_width():
    # mean 2.5; s = sqrt(5/3) = 1.290994; t_{0.975, 3} = 3.182446; h = 3.182446 * 1.290994 / 2 = 2.054260
    mean, half, n = mean_ci([1, 2, 3, 4])
    assert (mean, n) == (2.5, 4)
    assert half == pytest.approx(2.054260, abs=1e-6)


def test_t_quantiles_match_the_printed_table():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 3) == pytest.approx(3.18245, abs=1e-5)
    assert t_quantile(0.975, 4) == pytest.approx(2.77645, abs=1e-5)


def test_a_90_percent_interval_uses_the_95th_percentile():
    # two seeds 0.70, 0.74: s = 0.0282843, s / sqrt(2) = 0.02; t_{0.95, 1} = 6.313752
    _, half, _ = mean_ci([0.70, 0.74], level=0.90)
    assert half == pytest.approx(6.313752 * 0.02, rel=1e-6)


def test_one_seed_has_a_mean_but_no_interval_and_no_seed_has_neither():
    mean, half, n = mean_ci([0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(half)
    mean, half, n = mean_ci([None, float("nan")])
    assert n == 0 and math.isnan(mean) and math.isnan(half)


def test_a_confidence_level_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="confidence level"):
        mean_ci([1, 2], level=95)


def test_curve_band_keeps_only_rounds_every_seed_evaluated():
    rounds, means, halves, ns = curve_band([{0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.5, 2: 0.9}])
    assert rounds == [0, 2]
    assert means == pytest.approx([0.5, 0.8])
    assert halves[0] == 0.0 and ns == [2, 2]
    assert halves[1] == pytest.approx(12.706205 * 0.1, rel=1e-6)  # s = 0.141421, s / sqrt(2) = 0.1


def test_format_ci_says_when_there_is_no_interval():
    assert format_ci(0.72, 0.254124, 2) == "0.7200 ± 0.2541"
    assert format_ci(0.72, math.nan, 1) == "0.7200 (n=1, no CI)"
    assert format_ci(math.nan, math.nan, 0) == "-"
    assert format_ci(1234567.0, 890.4, 3, ",.0f") == "1,234,567 ± 890"
