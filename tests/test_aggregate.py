"""strategies/aggregate.py: hand-computed aggregations and server-optimizer steps on 2-5 clients."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import aggregate as agg


def _d(a, b):
    return {"lora_A": np.array([[a, b]], np.float32), "head.bias": np.array([b - a], np.float32)}


def _scalars(*values):
    return [{"w": np.array([v], np.float32)} for v in values]


def test_mean_coefficients_divide_by_the_weight_sum_and_over_n_by_the_client_count():
    w = np.array([1.0, 3.0])
    np.testing.assert_allclose(agg.coefficients(w, *agg.mean_normalisation(w)), [0.25, 0.75])
    np.testing.assert_allclose(agg.coefficients(w, *agg.over_n_normalisation(8)), [0.125, 0.375])
    with pytest.raises(ValueError, match="sum to 0"):
        agg.mean_normalisation(np.zeros(2))


def test_combine_is_the_weighted_sum_over_the_divisor():
    # weights 1, 3, divisor 4: lora_A = (1*[1,2] + 3*[5,6]) / 4 = [4, 5]; bias = (1*1 + 3*1) / 4 = 1
    out = agg.combine([_d(1, 2), _d(5, 6)], np.array([1.0, 3.0]), divisor=4.0)
    np.testing.assert_array_equal(out["lora_A"], [[4.0, 5.0]])
    np.testing.assert_array_equal(out["head.bias"], [1.0])
    assert list(out) == ["lora_A", "head.bias"] and out["lora_A"].dtype == np.float32


def test_coordinate_median_of_three_deltas_is_the_middle_value_per_coordinate():
    # lora_A columns: (1, 0, 4) -> 1 and (0, 2, 4) -> 2; bias (-1, 2, 0) -> 0
    out = agg.coordinate_median([_d(1, 0), _d(0, 2), _d(4, 4)])
    np.testing.assert_array_equal(out["lora_A"], [[1.0, 2.0]])
    np.testing.assert_array_equal(out["head.bias"], [0.0])


def test_coordinate_median_of_an_even_count_averages_the_two_middle_values():
    np.testing.assert_array_equal(agg.coordinate_median(_scalars(1, 10, 2, -5))["w"], [1.5])


def test_trimmed_mean_drops_floor_beta_n_values_from_each_end():
    # n = 4, beta = 0.25: drop 1 each side of (-5, 1, 2, 10) -> mean(1, 2) = 1.5
    np.testing.assert_array_equal(agg.trimmed_mean(_scalars(1, 10, 2, -5), 0.25)["w"], [1.5])
    # beta = 0.2: floor(0.8) = 0 values dropped -> the plain mean 2.0
    np.testing.assert_array_equal(agg.trimmed_mean(_scalars(1, 10, 2, -5), 0.2)["w"], [2.0])
    # n = 5, beta = 0.4: drop 2 each side of (-5, 1, 2, 3, 10) -> 2
    np.testing.assert_array_equal(agg.trimmed_mean(_scalars(1, 10, 2, -5, 3), 0.4)["w"], [2.0])


def test_trimmed_mean_refuses_a_fraction_that_could_leave_no_client():
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        agg.trimmed_mean(_scalars(1, 2), 0.5)


def test_krum_scores_sum_the_squared_distances_to_the_n_minus_f_minus_2_nearest():
    # values 0, 1, 2, 10, 11 with f = 1: two nearest others each
    # 0: 1 + 4 = 5;  1: 1 + 1 = 2;  2: 1 + 4 = 5;  10: 1 + 64 = 65;  11: 1 + 81 = 82
    deltas = _scalars(0, 1, 2, 10, 11)
    np.testing.assert_allclose(agg.krum_scores(deltas, 1), [5, 2, 5, 65, 82])
    assert agg.multi_krum(deltas, 1, 1) == [1]  # Krum
    assert agg.multi_krum(deltas, 1, 2) == [0, 1]  # tie 0 / 2 at score 5: the lower index
    assert agg.multi_krum(deltas, 1, 3) == [0, 1, 2]


def test_krum_distances_span_every_tensor_of_the_state():
    # (0,0|0), (1,0|0), (0,1|0), (9,9|0), (0,0|9); f = 1: squared distances over all three coordinates
    deltas = [
        {"a": np.array([x, y], np.float32), "b": np.array([z], np.float32)}
        for x, y, z in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (9, 9, 0), (0, 0, 9)]
    ]
    # 0: nearest 1, 1 -> 2; 1: 1, 2 -> 3; 2: 1, 2 -> 3; 3: 145 (to 1: 64+81), 145 -> 290; 4: 81, 82 -> 163
    np.testing.assert_allclose(agg.krum_scores(deltas, 1), [2, 3, 3, 290, 163])


def test_krum_refuses_fewer_than_2f_plus_3_deltas_and_m_beyond_n_minus_f():
    with pytest.raises(ValueError, match="at least 2f \\+ 3 = 5"):
        agg.krum_scores(_scalars(0, 1, 2, 3), 1)
    with pytest.raises(ValueError, match="m in 1..n - f = 4"):
        agg.multi_krum(_scalars(0, 1, 2, 3, 4), 1, 5)


def test_sgd_step_adds_lr_times_the_delta():
    out = agg.sgd_step({"w": np.array([1.0], np.float32)}, {"w": np.array([0.5], np.float32)}, 0.1)
    np.testing.assert_array_equal(out["w"], np.float32(1.0) + np.float32(0.1) * np.float32(0.5))


def test_fedavgm_accumulates_the_pseudo_gradient_in_the_velocity():
    # g = -0.5; v = 0.9 * 0.2 + g = -0.32; x = 1 - 0.1 * (-0.32) = 1.032
    x, v = agg.momentum_step(
        {"w": np.array([1.0], np.float32)}, {"w": np.array([0.5], np.float32)}, {"w": np.array([0.2])}, lr=0.1, beta=0.9
    )
    np.testing.assert_allclose(v["w"], [-0.32])
    np.testing.assert_allclose(x["w"], [1.032], rtol=1e-7)


@pytest.mark.parametrize(
    ("rule", "v_expected"),
    [
        ("adam", 0.99 * 0.01 + 0.01 * 0.25),  # b2 v + (1 - b2) g^2 = 0.0124
        ("yogi", 0.01 + 0.01 * 0.25),  # v - (1 - b2) g^2 sign(v - g^2) = 0.0125 (sign(0.01 - 0.25) = -1)
        ("adagrad", 0.01 + 0.25),  # v + g^2 = 0.26
    ],
)
def test_adaptive_steps_follow_reddi_algorithm_2_from_v_equal_tau_squared(rule, v_expected):
    # Delta = 0.5 -> g = -0.5; m = 0.9 * 0 + 0.1 * g = -0.05; v_{-1} = tau^2 = 0.01
    current = {"w": np.array([1.0], np.float32)}
    x, m, v = agg.adaptive_step(
        current,
        {"w": np.array([0.5], np.float32)},
        agg.zeros_like(current),
        agg.zeros_like(current, 0.1**2),
        rule=rule,
        lr=0.1,
        beta1=0.9,
        beta2=0.99,
        tau=0.1,
    )
    np.testing.assert_allclose(m["w"], [-0.05])
    np.testing.assert_allclose(v["w"], [v_expected])
    # x = 1 - lr m / (sqrt(v) + tau) = 1 + 0.005 / (sqrt(v) + 0.1)
    np.testing.assert_allclose(x["w"], [1 + 0.005 / (math.sqrt(v_expected) + 0.1)], rtol=1e-7)


def test_yogi_shrinks_v_when_the_squared_gradient_is_below_it():
    current = {"w": np.array([0.0], np.float32)}
    _, _, v = agg.adaptive_step(
        current, {"w": np.array([0.1], np.float32)}, agg.zeros_like(current), {"w": np.array([1.0])},
        rule="yogi", lr=0.1, beta1=0.9, beta2=0.9, tau=1e-3,
    )  # fmt: skip
    # g^2 = 0.01 < v = 1: v - 0.1 * 0.01 * (+1) = 0.999
    np.testing.assert_allclose(v["w"], [0.999], rtol=1e-6)


finite = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=7), st.floats(0, 0.49))
def test_robust_aggregates_lie_between_the_coordinate_minimum_and_maximum(rows, beta):
    deltas = [{"w": np.array(r, np.float32)} for r in rows]
    low, high = np.min(rows, axis=0), np.max(rows, axis=0)
    for out in (agg.coordinate_median(deltas), agg.trimmed_mean(deltas, beta)):
        assert np.all(out["w"] >= np.float32(low) - 1e-4) and np.all(out["w"] <= np.float32(high) + 1e-4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 1e3), min_size=1, max_size=8))
def test_mean_coefficients_sum_to_one(weights):
    w = np.array(weights)
    assert math.isclose(float(agg.coefficients(w, *agg.mean_normalisation(w)).sum()), 1.0, rel_tol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=6), st.floats(0.0, 0.99))
def test_fedadagrad_moves_each_coordinate_less_than_the_server_lr_from_a_fresh_state(delta, beta1):
    # |m| = (1 - b1)|g| <= |g| <= sqrt(tau^2 + g^2) = sqrt(v): the step is below lr (Reddi et al. 2021, Sec. 3)
    current = {"w": np.zeros(len(delta), np.float32)}
    x, _, _ = agg.adaptive_step(
        current, {"w": np.array(delta, np.float32)}, agg.zeros_like(current), agg.zeros_like(current, 1e-6),
        rule="adagrad", lr=0.5, beta1=beta1, beta2=0.0, tau=1e-3,
    )  # fmt: skip
    assert np.all(np.abs(x["w"]) < 0.5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(finite, min_size=2, max_size=2), min_size=5, max_size=8))
def test_multi_krum_keeps_an_identical_majority_and_drops_a_far_outlier(rows):
    honest = [{"w": np.array(rows[0], np.float32)} for _ in range(len(rows) - 1)]
    outlier = {"w": np.array(rows[0], np.float32) + np.float32(1e4)}
    kept = agg.multi_krum([*honest, outlier], 1, len(rows) - 1)
    assert kept == list(range(len(rows) - 1))
