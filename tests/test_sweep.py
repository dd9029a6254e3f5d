"""``fedpeft sweep``: seed and grid parsing, the plan and its folders, resume, refusals, failures."""

import json
from pathlib import Path

import pytest

from fedpeft.config import ConfigError
from fedpeft.results import write_results
from simulations.experiments.plan import grid_label, parse_grid, parse_seeds, plan_sweep
from simulations.experiments.sweep import run_sweep
from simulations.run import main

TINY_TOML = """\
name = "tiny"
num-rounds = 1
[data]
num-train-examples = 48
num-test-examples = 32
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


@pytest.fixture
def tiny_toml(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


def test_seed_ranges_and_lists_expand_in_order():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("3") == [3]
    assert parse_seeds("0-2, 7") == [0, 1, 2, 7]


@pytest.mark.parametrize(
    ("text", "message"),
    [("5-2", "runs backwards; write 2-5"), ("abc", "not a seed or range"), ("-1", "not a seed"), ("0-2,2", "more")],
)
def test_bad_seed_lists_are_refused_with_the_fix(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_seeds(text)


def test_grid_values_are_read_as_toml_in_the_order_given():
    grid = parse_grid(
        ["train.lr=0.01,1e-3", "strategy.name=fedavg,fedau", 'peft.target-modules=["query,value", "value"]']
    )
    assert list(grid) == ["train.lr", "strategy.name", "peft.target-modules"]
    assert grid["train.lr"] == [0.01, 0.001]
    assert grid["strategy.name"] == ["fedavg", "fedau"]
    assert grid["peft.target-modules"] == ["query,value", "value"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.lr=", "empty value"),
        ("train.lr=0.1,,0.2", "empty value"),
        ("train.lr=[]", "no values"),
        ("train.l=0.1,0.2", "did you mean train.lr"),
        ("seed=1,2", "use --seeds"),
        ("train.lr", "key=v1,v2"),
        ("train.lr=0.1,0.1", "twice"),
    ],
)
def test_bad_grids_are_refused_with_the_fix(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid([item])


def test_grid_labels_are_readable_and_unsafe_values_get_a_hash():
    assert grid_label({"strategy.name": "fedau", "train.lr": 0.01}) == "strategy.name=fedau,train.lr=0.01"
    assert grid_label({"peft.train-head": False}) == "peft.train-head=false"
    a, b = grid_label({"data.dataset": "a/b"}), grid_label({"data.dataset": "a-b"})
    assert a.startswith("data.dataset=a-b-") and b == "data.dataset=a-b" and a != b
    assert grid_label({}) == ""


def test_plan_is_configs_times_grid_times_seeds_with_one_folder_each(tiny_toml, tmp_path):
    grid = parse_grid(["train.lr=0.01,0.1", "strategy.weighting=examples,uniform"])
    plan = plan_sweep([tiny_toml], [0, 1], grid, ["num-rounds=2"], tmp_path / "out")
    assert len(plan) == 2 * 2 * 2
    first = plan[0]
    assert first.run_dir == tmp_path / "out" / "tiny" / "train.lr=0.01,strategy.weighting=examples" / "seed-0"
    assert (first.cfg.train.lr, first.cfg.strategy.weighting, first.cfg.seed, first.cfg.num_rounds) == (
        0.01,
        "examples",
        0,
        2,
    )
    assert [r.seed for r in plan[:2]] == [0, 1]
    assert len({r.run_dir for r in plan}) == 8
    no_grid = plan_sweep([tiny_toml], [3], {}, [], tmp_path / "out")
    assert no_grid[0].run_dir == tmp_path / "out" / "tiny" / "seed-3"


def test_plan_refuses_an_invalid_grid_point_and_two_configs_sharing_a_name(tiny_toml, tmp_path):
    with pytest.raises(ConfigError, match=r"train.lr=-1.0, seed 0: .*train.lr"):
        plan_sweep([tiny_toml], [0], parse_grid(["train.lr=0.1,-1.0"]), [], tmp_path)
    other = tmp_path / "other.toml"
    other.write_text(TINY_TOML.replace("num-rounds = 1", "num-rounds = 3"))
    with pytest.raises(ConfigError, match=r"both write .* differ in num-rounds"):
        plan_sweep([tiny_toml, other], [0], {}, [], tmp_path)
    with pytest.raises(ConfigError, match="both --set and --grid"):
        plan_sweep([tiny_toml], [0], parse_grid(["train.lr=0.1,0.2"]), ["train.lr=0.3"], tmp_path)


def test_plan_refuses_a_files_setting_of_a_switched_off_mode_and_warns_when_the_grid_switched_it_off(
    tiny_toml, tmp_path, caplog
):
    dp = tmp_path / "dp.toml"
    dp.write_text(TINY_TOML + '[dp]\nmode = "sample"\nclip-norm = 2.0\n')
    plan = plan_sweep([dp], [0, 1], parse_grid(["dp.mode=sample,none"]), [], tmp_path / "out")
    assert [r.cfg.dp.mode for r in plan] == ["sample", "sample", "none", "none"] and plan[0].cfg.dp.clip_norm == 2.0
    warned = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert len(warned) == 1 and "dp.clip-norm=2.0 has no effect because dp.mode='none'" in warned[0]
    dead = tmp_path / "dead.toml"
    dead.write_text(TINY_TOML + "[dp]\nclip-norm = 2.0\n")
    with pytest.raises(ConfigError, match=r"dead.toml with no grid, seed 0: dp.clip-norm=2.0 has no effect"):
        plan_sweep([dead], [0], {}, [], tmp_path / "out")
    with pytest.raises(ConfigError, match=r"both write .* differ in dp.clip-norm, dp.mode"):  # keys of two modes
        plan_sweep([tiny_toml, dp], [0], {}, [], tmp_path / "out")


def test_completed_runs_are_skipped_without_running_anything(tiny_toml, tmp_path):
    out = tmp_path / "out"
    plan = plan_sweep([tiny_toml], [0, 1], {}, [], out)
    for run in plan:  # as a finished run leaves them
        write_results(run.run_dir, {"status": "completed", "config": run.cfg.to_flat(), "rounds": []})
    entries = run_sweep(plan, out, jobs=1, engine="inprocess")
    assert [e["status"] for e in entries] == ["completed", "completed"]
    manifest = json.loads((out / "sweep.json").read_text())
    assert [(r["seed"], r["status"]) for r in manifest["runs"]] == [(0, "completed"), (1, "completed")]


def test_a_folder_holding_another_configs_run_is_refused_naming_both_and_the_keys(tiny_toml, tmp_path):
    out = tmp_path / "out"
    plan = plan_sweep([tiny_toml], [0], {}, [], out)
    theirs = plan[0].cfg.replace({"train.lr": 0.5}).to_flat()
    write_results(plan[0].run_dir, {"status": "completed", "config": theirs, "rounds": []})
    with pytest.raises(ConfigError, match=r"seed-0.*holds a run of a different config than .*tiny.toml.*train.lr: 0.5"):
        run_sweep(plan, out, jobs=1)


def test_cli_refuses_bad_input_before_any_run_starts(tiny_toml, tmp_path, capsys):
    out = tmp_path / "out"
    for extra in (["--seeds", "5-2"], ["--grid", "train.lr="], ["--grid", "trian.lr=0.1"], ["--jobs", "0"]):
        assert main(["sweep", str(tiny_toml), "--out", str(out), *extra]) == 2
        assert "fedpeft: error:" in capsys.readouterr().err
        assert not (out / "tiny").exists()


BAD_PROMPTS = "good=a good movie; bad=a bad movie"  # not the data's labels: fails only once the run loads them


def test_a_run_that_crashes_is_recorded_as_failed_and_the_sweep_goes_on_and_the_report_says_so(tiny_toml, tmp_path):
    out = tmp_path / "out"
    argv = ["sweep", str(tiny_toml), "--out", str(out), "--jobs", "1", "--seeds", "0-1"]
    argv += [
        "--set",
        "model.pooling=mean",
        "--set",
        "model.head-init=prompts",
        "--set",
        f"model.label-prompts={BAD_PROMPTS}",
    ]
    assert main(argv) == 1  # some run failed
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(r["seed"], r["status"]) for r in runs] == [(0, "failed"), (1, "failed")]  # seed 1 ran after seed 0 crashed
    assert all("model.label-prompts" in r["error"] for r in runs)
    failed = json.loads((Path(runs[1]["dir"]) / "results.json").read_text())
    assert failed["status"] == "failed" and "model.label-prompts" in failed["error"]
    assert failed["config"]["model.label-prompts"] == BAD_PROMPTS and failed["config"]["seed"] == 1
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| tiny | 0 of 2 (n < seeds) |" in md and "- tiny, seed 1: failed" in md


@pytest.mark.slow
def test_sweep_of_the_tiny_config_skips_finished_runs_resumes_a_killed_one_then_reports(tiny_toml, tmp_path):
    pytest.importorskip("simulations.inprocess")
    out, report = tmp_path / "out", tmp_path / "report"
    argv = [
        "sweep",
        str(tiny_toml),
        "--out",
        str(out),
        "--jobs",
        "1",
        "--seeds",
        "0-1",
        "--grid",
        "train.lr=0.001,0.01",
    ]
    assert main(argv) == 0
    files = sorted(out.rglob("results.json"))
    assert len(files) == 4
    assert all(json.loads(f.read_text())["status"] == "completed" for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    assert main(argv) == 0  # the same command again: every run is already completed
    assert [f.stat().st_mtime_ns for f in files] == stamps
    killed = json.loads(files[3].read_text())  # as if killed after its checkpoint, before the final write
    files[3].write_text(json.dumps({**killed, "status": "running"}))
    assert main(argv) == 0
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r.get("resumed") for r in runs] == [None, None, None, True]  # only that one ran, from its checkpoint
    assert json.loads(files[3].read_text())["status"] == "completed"
    assert [f.stat().st_mtime_ns for f in files[:3]] == stamps[:3]
    assert main(["report", str(out), "--out", str(report), "--target", "0.5"]) == 0
    data = json.loads((report / "report.json").read_text())
    assert [(g["label"], g["n"]) for g in data["groups"]] == [("tiny: train.lr=0.001", 2), ("tiny: train.lr=0.01", 2)]
    accs = [json.loads(f.read_text())["rounds"][-1]["accuracy"] for f in files[:2]]
    assert data["groups"][0]["metrics"]["final_accuracy"]["values"] == accs
    assert (report / "accuracy.png").stat().st_size > 10_000
    assert "| tiny: train.lr=0.01 | 2 |" in (report / "report.md").read_text()
