"""Accuracy-vs-epsilon figure: runs pooled over seeds per DP setting."""

import math

import pytest

from simulations.experiments.plot_dp import grouped, plot


def run(name, mode, target, eps, acc):
    return {"name": name, "mode": mode, "target": target, "epsilon": eps, "accuracy": acc,
            "accuracy_round0": 0.669, "delta": 1e-5}  # fmt: skip


def test_seeds_of_one_setting_pool_into_mean_and_t_interval_and_the_worst_epsilon(tmp_path):
    rows = [run("dp_client", "client", 8.0, 7.9, 0.70), run("dp_client", "client", 8.0, 8.0, 0.68),
            run("dp_client", "none", math.inf, math.inf, 0.72)]  # fmt: skip
    (private, public) = sorted(grouped(rows), key=lambda g: g["mode"])
    assert private["n"] == 2 and private["epsilon"] == 8.0 and private["accuracy"] == pytest.approx(0.69)
    # sd = 0.01 * sqrt(2); t(0.975, 1) = 12.706205 -> half-width 12.706205 * 0.01
    assert private["half_width"] == pytest.approx(12.706205 * 0.01, rel=1e-5)
    assert public["mode"] == "none" and public["n"] == 1 and public["half_width"] == 0.0
    assert plot(rows, tmp_path / "dp.png").stat().st_size > 10_000
