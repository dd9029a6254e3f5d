"""``fedpeft tune``: held-out seeds only, validation metrics only, the choice by hand, resume, the tables."""

import json

import pytest

from fedpeft.config import ConfigError
from fedpeft.results import write_results
from simulations.experiments.plan import parse_grid, plan_sweep
from simulations.experiments.tune import check_seeds, choose, parse_metric, run_value
from simulations.run import main

TINY_TOML = """\
name = "tiny"
num-rounds = 1
[data]
num-train-examples = 48
num-test-examples = 32
num-val-examples = 24
max-seq-len = 32
[partition]
num-partitions = 2
min-partition-size = 8
[participation]
model = "always"
[train]
local-steps = 1
batch-size = 8
"""

ROUNDS = [  # val_accuracy 0.5 -> 0.75 -> 0.625 (final); val_loss 0.7 -> 0.6 -> 0.65
    {"round": 0, "accuracy": None, "val_accuracy": 0.5, "val_loss": 0.7},
    {"round": 1, "accuracy": None, "val_accuracy": 0.75, "val_loss": 0.6},
    {"round": 2, "accuracy": 0.9, "val_accuracy": 0.625, "val_loss": 0.65},
]


@pytest.fixture
def tiny_toml(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


def test_a_runs_score_is_its_last_or_best_validation_value():
    assert run_value(ROUNDS, "val_accuracy", "final") == 0.625
    assert run_value(ROUNDS, "val_accuracy", "best") == 0.75
    assert run_value(ROUNDS, "val_loss", "best") == 0.6  # lower is better for a loss
    assert run_value([{"round": 0, "accuracy": 0.7}], "val_accuracy", "final") is None


def test_the_best_mean_over_seeds_wins_and_a_candidate_missing_a_seed_takes_no_part():
    scores = {"a": [0.70, 0.74], "b": [0.73, 0.73], "c": [0.90, None]}
    assert choose(scores, higher_is_better=True) == "b"  # means 0.72, 0.73; c is incomplete
    assert choose({"a": [0.3, 0.5], "b": [0.4, 0.4]}, higher_is_better=False) == "a"  # 0.4 = 0.4: the first wins
    assert choose({"a": [None]}, higher_is_better=True) is None


def test_seeds_0_to_4_and_test_metrics_are_refused_naming_the_fix():
    with pytest.raises(ConfigError, match=r"includes \[3, 4\].*e.g. --seeds 100-102"):
        check_seeds([3, 4, 100])
    assert parse_metric("val-accuracy") == "val_accuracy"
    with pytest.raises(ConfigError, match="not a validation metric.*never on test"):
        parse_metric("accuracy")


def test_cli_refuses_bad_input_before_any_run_starts(tiny_toml, tmp_path, capsys):
    out = tmp_path / "out"
    bad = (
        ["--seeds", "0-2"],
        ["--seeds", "100", "--select", "accuracy"],
        ["--seeds", "100", "--set", "data.num-val-examples=0"],
    )
    for extra in bad:
        assert main(["tune", str(tiny_toml), "--out", str(out), *extra]) == 2
        assert "fedpeft: error:" in capsys.readouterr().err
        assert not out.exists()


def test_finished_runs_are_not_rerun_and_the_choice_and_its_table_are_written(tiny_toml, tmp_path, capsys):
    out = tmp_path / "out"
    plan = plan_sweep([tiny_toml], [100, 101], parse_grid(["train.lr=0.001,0.01"]), [], out)
    finals = {(0.001, 100): 0.70, (0.001, 101): 0.74, (0.01, 100): 0.75, (0.01, 101): 0.69}
    for run in plan:  # as finished runs leave them: only the final validation value differs
        rounds = [dict(r) for r in ROUNDS]
        rounds[-1]["val_accuracy"] = finals[(run.cfg.train.lr, run.seed)]
        write_results(run.run_dir, {"status": "completed", "config": run.cfg.to_flat(), "rounds": rounds})
    argv = ["tune", str(tiny_toml), "--out", str(out), "--seeds", "100-101", "--grid", "train.lr=0.001,0.01"]
    assert main([*argv, "--jobs", "1"]) == 0
    tuned = json.loads((out / "tune.json").read_text())
    by_name = {c["candidate"]: c for c in tuned["candidates"]}
    assert by_name["tiny/train.lr=0.001"]["values"] == {"100": 0.70, "101": 0.74}
    assert by_name["tiny/train.lr=0.001"]["mean"] == pytest.approx(0.72)
    assert by_name["tiny/train.lr=0.01"]["mean"] == pytest.approx(0.72)  # a tie: the first in grid order wins
    assert tuned["choice"]["candidate"] == "tiny/train.lr=0.001"
    assert tuned["choice"]["settings"] == {"train.lr": "0.001"}
    md = (out / "tune.md").read_text()
    assert "| **tiny/train.lr=0.001** (chosen) | 0.7000 | 0.7400 | 0.7200 | 2 |" in md
    assert "| tiny/train.lr=0.01 | 0.7500 | 0.6900 | 0.7200 | 2 |" in md
    assert "0.9" not in md  # the test accuracy of the last round is not shown
    assert main([*argv, "--jobs", "1", "--by", "best"]) == 0  # best round: 0.75 for every run
    assert json.loads((out / "tune.json").read_text())["candidates"][1]["mean"] == pytest.approx(0.75)


@pytest.mark.slow
def test_tune_of_the_tiny_config_runs_the_grid_chooses_on_validation_and_resumes(tiny_toml, tmp_path):
    out = tmp_path / "out"
    argv = ["tune", str(tiny_toml), "--out", str(out), "--seeds", "100", "--grid", "train.lr=0.001,0.05"]
    assert main([*argv, "--jobs", "1"]) == 0
    files = sorted(out.rglob("results.json"))
    results = [json.loads(f.read_text()) for f in files]
    finals = [r["rounds"][-1]["val_accuracy"] for r in results]
    assert all(r["status"] == "completed" for r in results) and len(files) == 2
    tuned = json.loads((out / "tune.json").read_text())
    assert [c["values"]["100"] for c in tuned["candidates"]] == finals
    assert tuned["choice"]["values"]["100"] == max(finals)
    stamps = [f.stat().st_mtime_ns for f in files]
    assert main([*argv, "--jobs", "1"]) == 0  # the same command again runs nothing
    assert [f.stat().st_mtime_ns for f in files] == stamps
