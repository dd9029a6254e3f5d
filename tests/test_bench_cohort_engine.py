"""The cohort-engine benchmark's pure helpers (simulations/bench/cohort_engine.py); the runs themselves are not tested."""

import os

import psutil
import pytest

from simulations.bench.cohort_engine import (
    TreeSampler,
    add_work_efficiency,
    format_table,
    parallel_efficiency,
    pss_tree,
    summarize,
    variants,
)


def test_the_process_tree_pss_of_this_process_is_at_least_its_unique_memory():
    uss = psutil.Process().memory_full_info().uss
    pss, cpu_s = pss_tree(os.getpid())
    assert pss >= uss > 0  # PSS = USS + a share of the shared pages
    assert cpu_s > 0


def test_the_process_tree_of_a_process_that_does_not_exist_is_empty():
    assert pss_tree(2**22 + 1) == (0, 0.0)  # above the largest pid_max Linux allows (2**22)


def test_the_sampler_takes_at_least_one_sample_however_short_the_run():
    with TreeSampler(os.getpid(), interval_s=10.0) as sampler:
        pass
    assert sampler.samples == 1 and sampler.peak_pss > 0


def test_parallel_efficiency_is_training_cpu_over_cores_times_round_wall():
    # 2 cores for 10 s of rounds = 20 core-seconds, 15 of them in client training
    assert parallel_efficiency(15.0, 2, 10.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="cores=0"):
        parallel_efficiency(1.0, 0, 10.0)


def test_one_worker_owns_every_partition_and_all_the_cores():
    v = variants(num_partitions=10, cores=2)
    assert v["one-per-actor"] == {
        "simulation.cohort-size": 1,
        "simulation.num-cpus-per-client": 1.0,
        "simulation.torch-threads": 1,
    }
    assert v["cohort-sequential"] == {
        "simulation.cohort-size": 10,
        "simulation.num-cpus-per-client": 2.0,
        "simulation.torch-threads": 2,
        "simulation.cohort-batched": False,
    }
    assert v["cohort-batched"]["simulation.cohort-batched"] is True


def test_two_workers_split_the_partitions_and_the_cores():
    v = variants(num_partitions=5, cores=2, workers=2)
    assert v["cohort-batched"]["simulation.cohort-size"] == 3  # ceil(5 / 2): workers own 0-2 and 3-4
    assert v["cohort-batched"]["simulation.torch-threads"] == 1
    with pytest.raises(ValueError, match="--workers 3"):
        variants(num_partitions=5, cores=2, workers=3)


RESULTS = {
    "rounds": [
        {"round": 0, "accuracy": 0.5, "wall_s": 3.0},
        {"round": 1, "accuracy": 0.6, "wall_s": 4.0, "clients": [{"train-cpu-s": 2.0}, {"train-cpu-s": 3.0}]},
        {"round": 2, "accuracy": 0.7, "wall_s": 6.0, "clients": [{"train-cpu-s": 4.0}, {"train-cpu-s": 5.0}]},
    ]
}


def test_a_summary_sums_rounds_one_to_r_and_the_clients_training_cpu():
    row = summarize(RESULTS, wall_total_s=25.0, cores=2)
    assert row["rounds_s"] == 10.0 and row["startup_teardown_s"] == 15.0  # round 0 counts as start-up
    assert row["train_cpu_s"] == 14.0 and row["client_trainings"] == 4
    assert row["efficiency"] == pytest.approx(14.0 / (2 * 10.0))
    assert row["accuracy"] == 0.7


def test_a_summary_without_client_cpu_times_has_no_efficiency():
    untimed = {"rounds": [RESULTS["rounds"][0], {**RESULTS["rounds"][1], "clients": [{"num-steps": 2}]}]}
    row = summarize(untimed, wall_total_s=10.0, cores=2)
    assert row["train_cpu_s"] is None and row["efficiency"] is None


def test_work_efficiency_divides_the_first_variants_training_cpu_by_each_variants_round_walls():
    rows = {"one-per-actor": {"train_cpu_s": 8.0, "rounds_s": 10.0}, "cohort": {"train_cpu_s": 30.0, "rounds_s": 5.0}}
    add_work_efficiency(rows, cores=2)
    assert rows["one-per-actor"]["work_efficiency"] == pytest.approx(0.4)  # 8 / (2 x 10)
    assert rows["cohort"]["work_efficiency"] == pytest.approx(0.8)  # 8 / (2 x 5), not 30 / 10


def test_the_table_gives_each_variant_its_ratio_to_the_first():
    first = {**summarize(RESULTS, 25.0, 2), "peak_pss_gib": 2.0, "tree_cpu_s": 30.0, "work_efficiency": 0.7}
    second = {**first, "wall_total_s": 12.5, "peak_pss_gib": 1.0}
    report = {
        "cores": 2,
        "config": "x.toml",
        "overrides": {},
        "load_avg_at_start": (0.5, 0.5, 0.5),
        "targets": {"efficiency": 0.85, "peak_pss_gib": 3.0, "wall_total_s": 100.0},
        "variants": {"one-per-actor": first, "cohort-batched": second},
    }
    table = format_table(report)
    assert "12.5 (x0.50)" in table and "1.00 (x0.50)" in table
