"""One front door: every command refuses bad input with the fix and exit 2, never a traceback or an empty figure."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.check import Sources, check_settings
from fedpeft.config import ConfigError, ExperimentConfig, load_config
from fedpeft.results import write_results
from simulations.deploy.certs import make_deployment_certs
from simulations.front_door import RunFailed, run_main
from simulations.run import main

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"name": "x", "seed": 0, "strategy.name": "fedavg", "peft.method": "lora", "model.quantization": "nf4"}


def _raise(err):
    raise err


@pytest.mark.parametrize(
    ("err", "status", "text"),
    [
        (ConfigError("bad key; use another"), 2, "fedpeft: error: bad key; use another"),
        (FileNotFoundError("x.toml not found"), 2, "fedpeft: error: x.toml not found"),
        (KeyboardInterrupt(), 130, "fedpeft: interrupted"),
        (RunFailed("no update aggregated"), 1, "fedpeft: error: no update aggregated"),
    ],
)
def test_errors_become_one_line_and_an_exit_status(err, status, text, capsys):
    assert run_main(_raise, err) == status
    assert capsys.readouterr().err.strip() == text


def test_a_bug_is_not_hidden_behind_the_front_door():
    with pytest.raises(RuntimeError, match="a bug"):
        run_main(_raise, RuntimeError("a bug"))


def test_plot_refuses_a_results_file_of_another_layout_and_writes_no_figure(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"history": [0.5, 0.6]}))
    assert main(["plot", str(other), "--out", str(tmp_path / "fig.png")]) == 2
    assert "is not a fedpeft results file" in capsys.readouterr().err
    assert not (tmp_path / "fig.png").exists()


def test_plot_refuses_a_metric_named_differently_naming_what_the_rows_have(tmp_path, capsys):
    rows = [{"round": r, "acc": 0.5 + r / 10, "uplink_payload_bytes": 10 * r} for r in range(3)]
    write_results(tmp_path / "run", {"status": "completed", "config": CONFIG, "rounds": rows})
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "fig.png")]) == 2
    err = capsys.readouterr().err
    assert "no 'accuracy' in any round (its rows have: acc, uplink_payload_bytes)" in err
    assert "rename the column to 'accuracy'" in err and "Traceback" not in err
    assert not (tmp_path / "fig.png").exists()


def test_report_refuses_a_folder_without_a_completed_run_and_a_completed_run_without_the_metric(tmp_path, capsys):
    write_results(tmp_path / "a" / "x" / "seed-0", {"status": "running", "config": CONFIG, "rounds": []})
    assert main(["report", str(tmp_path / "a"), "--out", str(tmp_path / "rep")]) == 2
    assert "none of the 1 runs" in capsys.readouterr().err and not (tmp_path / "rep").exists()
    rows = [{"round": 0, "acc": 0.5}]
    write_results(tmp_path / "b" / "x" / "seed-0", {"status": "completed", "config": CONFIG, "rounds": rows})
    assert main(["report", str(tmp_path / "b"), "--out", str(tmp_path / "rep")]) == 2
    assert "no 'accuracy' in any round" in capsys.readouterr().err


@pytest.mark.parametrize("nodes", ["0", "-2", "two"])
def test_deploy_certs_refuses_an_invalid_node_count(nodes, tmp_path, capsys):
    assert main(["deploy", "certs", str(tmp_path / "certs"), "--nodes", nodes]) == 2
    assert "--nodes" in capsys.readouterr().err
    assert not (tmp_path / "certs").exists()


def test_deploy_helpers_refuse_bad_configs_and_folders_without_a_traceback(tmp_path, capsys):
    with pytest.raises(ValueError, match="at least one SuperNode"):
        make_deployment_certs(tmp_path / "c", num_nodes=0)
    not_toml = tmp_path / "results.json"
    not_toml.write_text("{}")
    for argv in (
        ["deploy", "memory", str(tmp_path / "missing.toml")],
        ["deploy", "loopback", str(not_toml)],
        ["deploy", "certs", str(not_toml)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fedpeft: error: ") and "Traceback" not in err, err


def test_a_bench_script_refuses_bad_input_with_exit_2_and_no_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "simulations.bench.scale", "--clients", "abc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--clients" in done.stderr and "Traceback" not in done.stderr


def test_a_key_given_both_flat_and_in_a_table_is_refused(tmp_path):
    path = tmp_path / "twice.toml"
    path.write_text('"train.lr" = 0.1\n[train]\nlr = 0.2\n')
    with pytest.raises(ConfigError, match=r"'train.lr' is given twice .*0.1 and 0.2\); keep one"):
        load_config(path)


def test_a_trace_file_while_participation_is_not_a_trace_is_refused():
    file = {"participation.model": "uniform", "participation.trace-file": "t.csv"}
    cfg = ExperimentConfig.from_flat(file)
    assert not hasattr(cfg.participation, "trace_file")  # the uniform variant has no field for it
    sources = Sources(file=file, known=True)
    with pytest.raises(ConfigError, match="participation.trace-file='t.csv' has no effect because participation.model"):
        check_settings(cfg, sources)
