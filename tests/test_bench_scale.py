"""The scale benchmark's pure helpers (simulations/bench/scale.py); the runs themselves are not tested."""

import pytest

from fedpeft.config import load_config
from simulations.bench.scale import compare, format_table, population_overrides


def test_both_populations_train_the_same_work_a_round_and_only_their_pool_grows():
    small = load_config("simulations/configs/quickstart.toml", population_overrides(100, 10, 8, 1, 5))
    large = load_config("simulations/configs/quickstart.toml", population_overrides(1000, 10, 8, 1, 5))
    for cfg, n in ((small, 100), (large, 1000)):
        assert cfg.partition.num_partitions == n
        assert cfg.data.num_train_examples == 8 * n  # 8 snippets per client
        assert cfg.participation.fraction * n == pytest.approx(10)  # 10 online a round
        assert (cfg.train.local_steps, cfg.train.batch_size) == (1, 8)  # one batch of a client's 8 snippets
        assert cfg.train.eval_every == 5 and cfg.partition.scheme == "iid"


def test_more_online_clients_than_the_population_is_refused():
    with pytest.raises(ValueError, match="online=20 must be in 1..clients=10"):
        population_overrides(10, 20, 8, 1, 5)


def _row(round_s, pss):
    return {"median_round_s": round_s, "peak_pss_gib": pss, "startup_teardown_s": 30.0, "wall_total_s": 40.0}


def test_ratios_are_to_the_smallest_population_and_the_bound_is_1_2():
    ratios = compare({100: _row(2.0, 3.0), 1000: _row(2.3, 3.3)})
    assert ratios["1000"]["median_round_ratio"] == pytest.approx(1.15)
    assert ratios["1000"]["peak_pss_ratio"] == pytest.approx(1.1)
    assert ratios["1000"]["within_bound"] is True
    assert compare({100: _row(2.0, 3.0), 1000: _row(2.5, 3.0)})["1000"]["within_bound"] is False  # round x1.25
    assert compare({100: _row(2.0, 3.0), 1000: _row(2.0, 3.7)})["1000"]["within_bound"] is False  # memory x1.23


def test_the_table_shows_each_population_with_its_ratio():
    report = {
        "online_per_round": 10,
        "steps_per_client_round": 1,
        "snippets_per_client": 8,
        "cores": 2,
        "load_avg_at_start": (0.5, 0.5, 0.5),
        "bound": 1.2,
        "populations": {"100": _row(2.0, 3.0), "1000": _row(2.3, 3.3)},
    }
    table = format_table(report)
    assert "1000 clients" in table and "2.30 (x1.15)" in table and "3.30 (x1.10)" in table
