"""Tracking sinks: TensorBoard event files and an MLflow store hold the same numbers as results.json."""

import socket
from pathlib import Path

import pytest

from fedpeft.check import check_settings
from fedpeft.config import ConfigError, ExperimentConfig
from fedpeft.results import load_results
from fedpeft.tracking import check_tracking, row_metrics, run_name
from simulations.experiments.plan import plan_sweep
from simulations.run import simulate
from tests.helpers import tiny_config


def test_row_metrics_are_the_rows_numbers_client_counts_and_cumulative_bytes():
    bytes0 = {
        "uplink_payload_bytes": 0,
        "uplink_message_bytes": 0,
        "downlink_payload_bytes": 5,
        "downlink_message_bytes": 7,
    }
    row0 = {"round": 0, "accuracy": 0.5, "loss": 0.7, "participants": [], **bytes0}
    row1 = {
        "round": 1,
        "accuracy": 0.75,
        "loss": None,  # not evaluated: left out, not logged as 0
        "participants": [0, 1, 2],
        "aggregated": [0, 2],
        "failed": [{"partition": 1, "reason": "crash"}],
        "rejected": [],
        "per_class_accuracy": {"neg": 0.5, "pos": 1.0},
        "epsilon": 2.5,
        "uplink_payload_bytes": 100,
        "uplink_message_bytes": 120,
        "downlink_payload_bytes": 300,
        "downlink_message_bytes": 330,
        "note": "text is not a metric",
        "converged": True,  # booleans are not numbers here
    }
    assert row_metrics(row1, [row0, row1]) == {
        "accuracy": 0.75,
        "num_participants": 3.0,
        "num_aggregated": 2.0,
        "num_failed": 1.0,
        "num_rejected": 0.0,
        "per_class_accuracy/neg": 0.5,
        "per_class_accuracy/pos": 1.0,
        "epsilon": 2.5,
        "uplink_payload_bytes": 100.0,
        "uplink_message_bytes": 120.0,
        "downlink_payload_bytes": 300.0,
        "downlink_message_bytes": 330.0,
        "cumulative_uplink_payload_bytes": 100.0,
        "cumulative_uplink_message_bytes": 120.0,
        "cumulative_downlink_payload_bytes": 305.0,
        "cumulative_downlink_message_bytes": 337.0,
        "cumulative_total_payload_bytes": 405.0,
    }


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_tracking_settings_are_refused_with_the_fix_before_anything_starts():
    with pytest.raises(ConfigError, match="valid choices: none, tensorboard, mlflow"):
        ExperimentConfig.from_flat({"tracking.backend": "wandb"})
    unreachable = ExperimentConfig.from_flat(
        {"tracking.backend": "mlflow", "tracking.uri": f"http://127.0.0.1:{_closed_port()}"}
    )
    with pytest.raises(ConfigError, match="unreachable .*start the server.*tracking.uri=''"):
        check_tracking(unreachable, timeout_s=2)
    with pytest.raises(ConfigError, match="sqlite:///PATH/mlflow.db"):
        check_tracking(ExperimentConfig.from_flat({"tracking.backend": "mlflow", "tracking.uri": "mlruns"}))
    dead = ExperimentConfig.from_flat({"tracking.uri": "sqlite:///x.db"})  # backend none: the URI does nothing
    with pytest.raises(ConfigError, match="tracking.uri='sqlite:///x.db' has no effect because tracking.backend"):
        check_settings(dead, _sources_from_file({"tracking.uri": "sqlite:///x.db"}))
    assert check_tracking(ExperimentConfig()) is None


def _sources_from_file(file):
    from fedpeft.check import Sources

    return Sources(file=file, known=True)


def test_mlflow_run_names_follow_the_run_folder_under_runs_and_sweeps():
    cfg = tiny_config()
    assert run_name(cfg, Path("runs/tiny/seed-0")) == "tiny/seed-0"
    assert run_name(cfg, Path("/s/out/tiny/train.lr=0.01/seed-0")) == "tiny/train.lr=0.01/seed-0"
    assert run_name(cfg, Path("/tmp/anywhere")) == "tiny/seed-0"


def test_a_sweep_names_one_mlflow_experiment_for_all_its_runs(tmp_path):
    config = tmp_path / "t.toml"
    config.write_text('name = "t"\n[tracking]\nbackend = "mlflow"\n')
    plan = plan_sweep([config], [0, 1], {"train.lr": [0.01, 0.1]}, [], tmp_path / "my-sweep")
    assert {run.cfg.tracking.experiment for run in plan} == {"sweep my-sweep"}
    assert len(plan) == 4


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_rounds_of_results_json(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(**{"tracking.backend": "tensorboard"})
    results = load_results(simulate(cfg, tmp_path / "run", in_process=True))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    rows = results["rounds"]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("accuracy")] == [
        (r["round"], r["accuracy"]) for r in rows
    ]
    uplink = [e.value for e in events.Scalars("cumulative_uplink_payload_bytes")]
    assert uplink == [sum(r["uplink_payload_bytes"] for r in rows[: i + 1]) for i in range(len(rows))]
    assert uplink[-1] > 0
    by_bytes = events.Scalars("accuracy_by_total_bytes")
    total = [sum(r["uplink_payload_bytes"] + r["downlink_payload_bytes"] for r in rows[: i + 1]) for i in range(3)]
    assert [e.step for e in by_bytes] == total
    assert [e.value for e in events.Scalars("num_participants")] == [0.0, 3.0, 3.0]
    assert "accuracy" in events.Tags()["images"]  # the figure written after the run
    assert results["tracking"] == {"backend": "tensorboard", "logdir": str(tmp_path / "run" / "tensorboard")}


@pytest.mark.slow
def test_the_mlflow_store_holds_metrics_params_artifacts_and_status_of_the_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(**{"tracking.backend": "mlflow", "tracking.uri": uri})
    results = load_results(simulate(cfg, tmp_path / "run", in_process=True))
    client = MlflowClient(tracking_uri=uri)
    info = results["tracking"]
    run = client.get_run(info["run_id"])
    assert info["experiment"] == "tiny" and client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny/seed-0"
    rows = results["rounds"]
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert sorted((m.step, m.value) for m in history) == [(r["round"], pytest.approx(r["accuracy"])) for r in rows]
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert loss == {r["round"]: pytest.approx(r["loss"]) for r in rows}
    down = client.get_metric_history(run.info.run_id, "cumulative_downlink_payload_bytes")
    assert sorted(m.value for m in down)[-1] == sum(r["downlink_payload_bytes"] for r in rows)
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["name"] == '"tiny"'
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "adapter", "figures"} <= names
    assert (tmp_path / "mlflow-artifacts").is_dir()  # beside the store, not in ./mlruns


@pytest.mark.slow
def test_a_resumed_run_logs_into_the_same_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from fedpeft.results import write_results
    from fedpeft.tracking import build_sink

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(**{"tracking.backend": "mlflow", "tracking.uri": uri})
    run_dir = tmp_path / "runs" / "tiny" / "seed-0"
    rows = [{"round": r, "accuracy": 0.5 + r / 10, "uplink_payload_bytes": 10} for r in range(3)]
    first = build_sink(cfg, run_dir)
    first.log_round(rows[0], rows[:1])
    first.log_round(rows[1], rows[:2])
    write_results(
        run_dir, {"status": "interrupted", "config": cfg.to_flat(), "rounds": rows[:2], "tracking": first.info}
    )
    first.close({"status": "interrupted"}, run_dir)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first.run_id).info.status == "KILLED"
    resumed = build_sink(cfg, run_dir)  # the folder's results.json names the MLflow run
    assert resumed.run_id == first.run_id and client.get_run(first.run_id).info.status == "RUNNING"
    resumed.log_round(rows[2], rows)
    history = client.get_metric_history(first.run_id, "accuracy")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.6), (2, 0.7)]
    cumulative = sorted(m.value for m in client.get_metric_history(first.run_id, "cumulative_uplink_payload_bytes"))
    assert cumulative == [10.0, 20.0, 30.0]
    assert client.get_run(first.run_id).info.run_name == "tiny/seed-0"
