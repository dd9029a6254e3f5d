"""Paired differences between differently named configs (simulations/experiments/paired.py), hand-computed."""

import math

import pytest

from fedpeft.results import write_results
from simulations.experiments.paired import final_by_name, main, paired


def _run(root, name, seed, final, status="completed"):
    rounds = [{"round": 0, "accuracy": 0.5}, {"round": 1, "accuracy": final}]
    write_results(
        root / name / f"seed-{seed}", {"status": status, "config": {"name": name, "seed": seed}, "rounds": rounds}
    )


def test_differences_are_taken_seed_by_seed_on_the_seeds_both_completed(tmp_path):
    for seed, (a, b) in enumerate([(0.70, 0.60), (0.74, 0.66), (0.72, 0.62)]):
        _run(tmp_path, "lora", seed, a)
        _run(tmp_path, "head", seed, b)
    _run(tmp_path, "lora", 3, 0.99)  # no head run with seed 3: left out of the pairs
    _run(tmp_path, "head", 4, 0.10, status="failed")  # failed: not a run to pair
    finals = final_by_name(tmp_path)
    assert sorted(finals["lora"]) == [0, 1, 2, 3] and sorted(finals["head"]) == [0, 1, 2]
    mean, half, n = paired(finals, "lora")["head"]
    # differences -0.10, -0.08, -0.10: mean -0.28/3, sample sd 0.011547, t(0.975, 2) = 4.302653
    assert n == 3
    assert mean == pytest.approx(-0.28 / 3)
    assert half == pytest.approx(4.302653 * 0.0115470 / math.sqrt(3), rel=1e-4)


def test_an_unknown_baseline_names_the_ones_there_are(tmp_path):
    _run(tmp_path, "lora", 0, 0.7)
    with pytest.raises(KeyError, match="no completed runs named 'ful'.*lora"):
        paired(final_by_name(tmp_path), "ful")


def test_two_completed_runs_of_one_name_and_seed_are_refused(tmp_path):
    _run(tmp_path / "a", "lora", 0, 0.7)
    _run(tmp_path / "b", "lora", 0, 0.7)
    with pytest.raises(ValueError, match="two completed runs of 'lora' with seed 0"):
        final_by_name(tmp_path)


def test_the_command_prints_one_line_per_paired_name(tmp_path, capsys):
    for seed in (0, 1):
        _run(tmp_path, "lora", seed, 0.7 + seed / 100)
        _run(tmp_path, "full", seed, 0.75 + seed / 100)
    main([str(tmp_path), "--baseline", "full"])
    out = capsys.readouterr().out
    assert "lora" in out and "-0.050 ± 0.000 (n=2)" in out
