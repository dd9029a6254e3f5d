"""The Byzantine table: hand-made results folders in, hand-computed means and paired differences out."""

from __future__ import annotations

import json

import pytest

from simulations.experiments.byzantine_table import table


def write_run(root, agg, fraction, seed, accuracy, status="completed"):
    folder = root / f"byzantine_{agg}" / f"faults.byzantine-fraction={fraction}" / f"seed-{seed}"
    folder.mkdir(parents=True)
    rows = [{"round": 0, "accuracy": 0.5}, {"round": 40, "accuracy": accuracy}]
    (folder / "results.json").write_text(json.dumps({"status": status, "config": {}, "rounds": rows}))


def test_the_table_averages_seeds_and_pairs_every_aggregator_with_the_mean(tmp_path):
    accuracies = {"mean": (0.40, 0.50), "median": (0.70, 0.72), "trimmed": (0.60, 0.62), "krum": (0.71, 0.73)}
    for agg, values in accuracies.items():
        for seed, acc in enumerate(values):
            write_run(tmp_path, agg, "0.3", seed, acc)
    lines = table(tmp_path).splitlines()
    assert len(lines) == 2 + 4
    mean_row = next(line for line in lines if "| mean |" in line)
    krum_row = next(line for line in lines if "| krum |" in line)
    # mean of 0.40 and 0.50 = 0.450; krum - mean = 0.31 and 0.23, mean 0.270; 95% t(1) = 12.706 x 0.04 = 0.508
    assert "| 30% | mean | 0.450 ± 0.635 | .400 .500 |  |" == mean_row
    assert krum_row.endswith("| +0.270 ± 0.508 |")


def test_an_unfinished_run_is_an_error_naming_the_fix(tmp_path):
    for agg in ("mean", "median", "trimmed", "krum"):
        write_run(tmp_path, agg, "0", 0, 0.7, status="completed" if agg != "krum" else "interrupted")
    with pytest.raises(ValueError, match="rerun the sweep"):
        table(tmp_path)
