"""``fedpeft report`` on hand-written results files (a unit test of the report, no training).

The fixture is 2 groups x 2 seeds of real ``results.json`` files written by
:func:`write_run`: group ``lr=0.01`` completed both seeds, group ``lr=0.1`` lost seed 1
to a crash. Expected numbers are computed by hand in the comments.
"""

import json

import pytest

from fedpeft.config import ExperimentConfig
from fedpeft.report import (
    class_weight_shares,
    load_runs,
    paired_differences,
    parse_baseline,
    rare_class,
    render_paired,
    run_metrics,
    summarize,
    write_report,
)
from fedpeft.results import experiment_config, group_by_experiment, group_labels

T_975_1 = 12.706205  # t_{0.975, 1}: two seeds


def write_run(folder, *, lr, seed, accs, status="completed", up=100, down=300, wall_s=10.0, per_class=None):
    """A results.json as the ServerApp writes it: config, one row per round (round 0 = before training)."""
    config = ExperimentConfig().replace({"name": "tiny", "seed": seed, "train.lr": lr}).to_flat()
    rows = []
    for rnd, acc in enumerate(accs):
        row = {"round": rnd, "accuracy": acc, "loss": 1 - acc}
        row["uplink_payload_bytes"] = up if rnd else 0
        row["downlink_payload_bytes"] = down if rnd else 0
        if per_class is not None:
            row["per_class_accuracy"] = per_class[rnd]
            row["balanced_accuracy"] = sum(per_class[rnd]) / len(per_class[rnd])
        rows.append(row)
    results = {"status": status, "config": config, "rounds": rows, "wall_s": wall_s}
    results["label_histograms"] = [[10, 2], [10, 8]]  # class 1 lives mostly on client 1
    results["participation_probabilities"] = [0.9, 0.1]  # ... which is rarely online: class 1 is rare
    if status != "completed":
        results["error"] = "RuntimeError: boom"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    pc = [[0.5, 0.5], [0.8, 0.4], [0.9, 0.5]]
    write_run(root / "lr-0.01" / "seed-0", lr=0.01, seed=0, accs=[0.5, 0.6, 0.70], per_class=pc, wall_s=10.0)
    pc1 = [[0.5, 0.5], [0.8, 0.4], [0.9, 0.7]]
    write_run(root / "lr-0.01" / "seed-1", lr=0.01, seed=1, accs=[0.5, 0.65, 0.74], per_class=pc1, wall_s=14.0)
    write_run(root / "lr-0.1" / "seed-0", lr=0.1, seed=0, accs=[0.5, 0.55, 0.58], per_class=pc, up=200)
    write_run(root / "lr-0.1" / "seed-1", lr=0.1, seed=1, accs=[0.5, 0.52], per_class=pc[:2], status="failed")
    return root


def test_runs_that_differ_only_in_seed_and_out_dir_form_one_group():
    a = ExperimentConfig().replace({"seed": 0}).to_flat()
    b = ExperimentConfig().replace({"seed": 3, "out-dir": "elsewhere", "simulation.torch-threads": 2}).to_flat()
    c = ExperimentConfig().replace({"seed": 0, "train.lr": 0.5}).to_flat()
    assert group_by_experiment([{"config": a}, {"config": c}, {"config": b}]) == [[0, 2], [1]]
    labels = group_labels([experiment_config(a), experiment_config(c)])
    assert labels == ["quickstart: train.lr=0.001", "quickstart: train.lr=0.5"]
    other = {**experiment_config(c), "name": "other", "num-rounds": 9}
    assert group_labels([experiment_config(a), experiment_config(c), other]) == [*labels, "other"]


def test_rare_class_is_the_class_with_the_lowest_expected_participation_share():
    # class 0: (0.9*10 + 0.1*10) / 20 = 0.5; class 1: (0.9*2 + 0.1*8) / 10 = 0.26
    hist = {"label_histograms": [[10, 2], [10, 8]], "participation_probabilities": [0.9, 0.1]}
    assert rare_class(hist) == 1
    assert rare_class({"class_participation": [0.2, 0.7]}) == 0
    assert rare_class({**hist, "participation_probabilities": [0.5, 0.5], "test_label_counts": [30, 70]}) == 0
    assert rare_class({"participation_probabilities": [0.5, 0.5]}) is None


def test_class_weight_share_sums_each_clients_coefficients_over_rounds_by_strategy():
    # Client 0 holds only class 0, client 1 is half/half, client 2 only class 1: target share of
    # class 1 = (0 + 0.5 + 1) / 3 = 0.5.
    hist = [[10, 0], [5, 5], [0, 30]]
    rounds = [
        {"round": 0, "aggregated": []},
        {"round": 1, "aggregated": [0, 2], "omega": {"0": 1.0, "2": 3.0},
         "clients": [{"partition_id": 0, "num-examples": 10}, {"partition_id": 2, "num-examples": 30}]},
        {"round": 2, "aggregated": [0, 1], "omega": {"0": 2.0, "1": 1.0},
         "clients": [{"partition_id": 0, "num-examples": 10}, {"partition_id": 1, "num-examples": 10}]},
    ]  # fmt: skip
    results = {"label_histograms": hist, "rounds": rounds, "config": {"strategy.name": "fedau"}}
    # FedAU: masses omega/N = (1+2)/3, 1/3, 3/3 -> class-1 share (0*1 + 0.5*1/3 + 1*1) / (1 + 1/3 + 1) = 0.5
    share, target = class_weight_shares(results)
    assert share[1] == pytest.approx((0.5 / 3 + 1.0) / (7 / 3)) and target[1] == pytest.approx(0.5)
    # FedAvg by examples: round 1 -> 10/40, 30/40; round 2 -> 1/2, 1/2: masses 0.75, 0.5, 0.75
    without_omega = [{k: v for k, v in r.items() if k != "omega"} for r in rounds]
    examples = {
        **results,
        "rounds": without_omega,
        "config": {"strategy.name": "fedavg", "strategy.weighting": "examples"},
    }
    share, _ = class_weight_shares(examples)
    assert share[1] == pytest.approx((0.5 * 0.5 + 0.75) / 2.0)
    # FedAvg uniform: 1/2 each round: masses 1, 0.5, 0.5 -> (0.25 + 0.5) / 2
    uniform = {**examples, "config": {"strategy.name": "fedavg", "strategy.weighting": "uniform"}}
    share, _ = class_weight_shares(uniform)
    assert share[1] == pytest.approx((0.5 * 0.5 + 0.5) / 2.0)
    assert class_weight_shares({"rounds": rounds}) is None


def test_the_gain_is_the_final_accuracy_minus_the_round_0_evaluation():
    rounds = [{"round": 0, "accuracy": 0.669}, {"round": 1, "accuracy": None}, {"round": 2, "accuracy": 0.70}]
    assert run_metrics({"rounds": rounds})["accuracy_gain"] == pytest.approx(0.031)
    assert run_metrics({"rounds": rounds[1:]})["accuracy_gain"] is None  # no round-0 evaluation: no gain


def _group(label, config, seeds, acc):
    return {"label": label, "config": config, "seeds": seeds, "metrics": {"final_accuracy": {"values": acc}}}


def test_paired_differences_pair_each_group_with_its_baseline_seed_by_seed():
    fedau = {"name": "bern", "strategy.name": "fedau", "train.lr": 0.01}
    summary = {
        "groups": [
            _group("fedau", fedau, [0, 1, 2], [0.70, 0.66, 0.71]),
            _group("fedavg", {**fedau, "strategy.name": "fedavg"}, [2, 1, 0], [0.65, 0.64, 0.60]),
            _group("other lr", {**fedau, "train.lr": 0.1}, [0, 1], [0.5, 0.5]),  # no fedavg at lr 0.1: skipped
        ]
    }
    (row,) = paired_differences(summary, parse_baseline(["strategy.name=fedavg"]))
    m = row["metrics"]["final_accuracy"]
    # seed 0: 0.70 - 0.60, seed 1: 0.66 - 0.64, seed 2: 0.71 - 0.65 -> 0.10, 0.02, 0.06
    assert row["baseline"] == "fedavg" and m["seeds"] == [0, 1, 2] and m["n"] == 3
    assert m["values"] == pytest.approx([0.10, 0.02, 0.06]) and m["mean"] == pytest.approx(0.06)
    # sd 0.04, t(0.975, 2) = 4.302653 -> half-width 4.302653 * 0.04 / sqrt(3)
    assert m["half_width"] == pytest.approx(4.302653 * 0.04 / 3**0.5, rel=1e-5)
    # 0 lies inside the interval: no star
    assert "| fedau | fedavg | +0.0600 ± 0.0994 (n=3) | - | - |" in render_paired([row], 0.95)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_baseline(["strategy.name"])
    with pytest.raises(ValueError, match="no run has the key"):
        paired_differences(summary, {"strategy.nmae": "fedavg"})


def test_a_private_group_pairs_with_the_no_dp_baseline_whose_config_has_no_dp_keys():
    none = {"name": "dp", "train.lr": 0.01, "dp.mode": "none"}
    sample = {**none, "dp.mode": "sample", "dp.clip-norm": 1.0, "dp.delta": 1e-5}
    summary = {
        "groups": [
            _group("sample", sample, [0, 1], [0.60, 0.62]),
            _group("sample lr 0.1", {**sample, "train.lr": 0.1}, [0, 1], [0.5, 0.5]),  # no baseline at lr 0.1
            _group("none", none, [0, 1], [0.70, 0.70]),
        ]
    }
    (row,) = paired_differences(summary, parse_baseline(["dp.mode=none"]))
    assert row["baseline"] == "none" and row["metrics"]["final_accuracy"]["values"] == pytest.approx([-0.10, -0.08])
    assert group_labels([g["config"] for g in summary["groups"]]) == [
        "dp: dp.mode=sample, train.lr=0.01",
        "dp: dp.mode=sample, train.lr=0.1",
        "dp: dp.mode=none, train.lr=0.01",
    ]


def test_summary_gives_mean_and_t_interval_over_seeds_and_counts_the_failed_seed(sweep):
    summary = summarize(load_runs(sweep), target=0.7)
    good, bad = summary["groups"]
    assert good["label"] == "tiny: train.lr=0.01" and bad["label"] == "tiny: train.lr=0.1"
    acc = good["metrics"]["final_accuracy"]
    # 0.70, 0.74: mean 0.72, s / sqrt(2) = 0.02
    assert acc["mean"] == pytest.approx(0.72) and acc["n"] == 2
    assert acc["half_width"] == pytest.approx(T_975_1 * 0.02, rel=1e-6)
    # balanced: 0.7 and 0.8; rare class 1: 0.5 and 0.7
    assert good["metrics"]["balanced_accuracy"]["mean"] == pytest.approx(0.75)
    assert good["rare_class"] == 1 and good["metrics"]["rare_class_accuracy"]["mean"] == pytest.approx(0.6)
    assert [c["mean"] for c in good["metrics"]["per_class_accuracy"]] == pytest.approx([0.9, 0.6])
    assert good["metrics"]["uplink_payload_bytes"]["mean"] == 200  # 2 rounds x 100
    assert good["metrics"]["total_payload_bytes"]["mean"] == 800
    assert good["metrics"]["wall_s"]["mean"] == pytest.approx(12.0)
    # target 0.7: seed 0 at round 2 (200 B up), seed 1 at round 2 too
    assert good["metrics"]["uplink_bytes_to_target"]["values"] == [200, 200]
    assert (bad["n"], bad["planned"]) == (1, 2)
    assert bad["not_completed"][0]["status"] == "failed" and bad["not_completed"][0]["error"] == "RuntimeError: boom"
    assert bad["metrics"]["uplink_bytes_to_target"]["n"] == 0  # 0.58 never reaches 0.7


def test_report_writes_table_json_and_figures(sweep, tmp_path):
    out = tmp_path / "report"
    write_report(sweep, out, target=0.7)
    md = (out / "report.md").read_text()
    assert "mean ± 95% CI half-width, Student-t over seeds" in md
    row = next(line for line in md.splitlines() if line.startswith("| tiny: train.lr=0.01 |"))
    assert "| 2 | 0.7200 ± 0.2541 | +0.2200 ± 0.2541 | 0.7500 ±" in row
    bad = next(line for line in md.splitlines() if line.startswith("| tiny: train.lr=0.1 |"))
    assert "1 of 2 (n < seeds)" in bad and "0.5800 (n=1, no CI)" in bad and "(0/1 reached)" in bad
    assert "- tiny: train.lr=0.1, seed 1: failed" in md and "RuntimeError: boom" in md
    data = json.loads((out / "report.json").read_text())  # strict JSON: NaN written as null
    assert data["groups"][1]["metrics"]["final_accuracy"]["half_width"] is None
    assert data["groups"][0]["metrics"]["final_accuracy"]["values"] == [0.70, 0.74]
    for name in ("accuracy.png", "balanced_accuracy.png"):
        assert (out / name).stat().st_size > 10_000 and f"![{name}]({name})" in md


def test_report_of_a_folder_without_results_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json under"):
        load_runs(tmp_path)


def test_fedpeft_plot_draws_a_band_for_seeds_of_one_group_and_a_line_for_a_single_run(sweep, tmp_path):
    from fedpeft.plot import plot_runs

    paths = [sweep / "lr-0.01" / "seed-0", sweep / "lr-0.01" / "seed-1", sweep / "lr-0.1" / "seed-0"]
    out = plot_runs(paths, tmp_path / "bands.png", total_bytes=True, target=0.7)
    assert out.stat().st_size > 10_000
    assert plot_runs(paths, tmp_path / "balanced.png", metric="balanced_accuracy").stat().st_size > 10_000
