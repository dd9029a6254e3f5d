"""End to end on Flower's real simulation engine (Ray backend): tiny slice, 3 clients, 2 rounds."""

import json

import pytest
from flwr.app import Message

from fedpeft.results import load_results
from fedpeft.tasks import load_task
from simulations.inprocess import run_in_process
from simulations.run import main, simulate
from tests.helpers import tiny_config

pytestmark = pytest.mark.slow

ROUND_KEYS = {
    "round",
    "accuracy",
    "loss",
    "participants",
    "uplink_payload_bytes",
    "uplink_message_bytes",
    "downlink_payload_bytes",
    "downlink_message_bytes",
}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "a"
    return load_results(simulate(tiny_config(), out, plot=True)), out


def test_a_simulation_writes_results_adapter_and_plot(first_run):
    results, out = first_run
    assert results["status"] == "completed"
    assert {"config", "versions", "git_revision", "trainable_params", "backbone", "rounds", "adapter_dir"} <= set(
        results
    )
    assert results["backbone"]["quantization"] == "nf4"
    assert results["backbone"]["weight_bytes"] < 0.2 * results["backbone"]["fp32_weight_bytes"]
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    for row in results["rounds"][1:]:
        assert ROUND_KEYS <= set(row)
        assert row["participants"] == [0, 1, 2] and row["aggregated"] == [0, 1, 2]
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_only_peft_parameters_travel_and_uplink_bytes_are_exact(first_run):
    results, _ = first_run
    numel = results["trainable_params"]
    for row in results["rounds"][1:]:
        n = len(row["participants"])
        assert row["uplink_payload_bytes"] == n * numel * 4
        assert row["downlink_payload_bytes"] == n * numel * 4
        assert row["uplink_message_bytes"] > row["uplink_payload_bytes"]
    # the backbone never travels: the payload is the PEFT tensors alone
    assert numel * 4 < 0.05 * results["backbone"]["total_bytes"]
    assert numel == sum(v.size for v in load_task(tiny_config()).initial_state.values())


def test_the_same_seed_gives_identical_round_metrics_and_ledger_on_grouped_nodes(first_run, tmp_path):
    # Past simulation.max-nodes the launcher puts the clients on cohort nodes (3 clients, max 2 nodes: 2 nodes
    # of 2 clients); the seed still gives the same rounds, and the ledger the same rows, setup included.
    results, _ = first_run
    again = load_results(simulate(tiny_config(**{"simulation.max-nodes": 2}), tmp_path / "b", plot=False))
    keep = ("accuracy", "loss", "participants", "uplink_payload_bytes", "uplink_message_bytes")
    strip = lambda rs: [{k: r[k] for k in keep} for r in rs["rounds"]]  # noqa: E731
    assert strip(again) == strip(results)
    assert again["flower_nodes"] == {"nodes": 2, "clients_per_node": 2} and "flower_nodes" not in results
    assert again["config"]["simulation.cohort-size"] == 1  # the config as given; the layout is recorded apart
    assert again["config"]["simulation.max-nodes"] == 2
    rows = lambda rs: sorted(json.dumps(r, sort_keys=True) for r in rs["ledger"])  # noqa: E731
    assert rows(again) == rows(results)


def _fail_partition_one(msg: Message, context, call_next):
    if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 1:
        raise RuntimeError("simulated crash on partition 1")
    return call_next(msg, context)


def test_a_client_that_raises_does_not_end_the_run(tmp_path):
    results = load_results(simulate(tiny_config(), tmp_path / "c", plot=False, client_mods=[_fail_partition_one]))
    assert results["status"] == "completed"
    for row in results["rounds"][1:]:
        assert row["aggregated"] == [0, 2]
        assert [f["partition_id"] for f in row["failed"]] == [1]
        assert row["uplink_payload_bytes"] == 2 * results["trainable_params"] * 4


def test_the_cli_reports_config_typos_without_a_traceback(tmp_path, capsys):
    cfg = tmp_path / "typo.toml"
    cfg.write_text('name = "typo"\n[train]\nlrr = 0.1\n')
    assert main(["simulate", str(cfg)]) == 2
    assert "did you mean train.lr" in capsys.readouterr().err


def test_the_cli_plots_several_runs(first_run, tmp_path):
    _, out = first_run
    fig = tmp_path / "cmp.png"
    assert main(["plot", str(out), str(out / "results.json"), "--out", str(fig)]) == 0
    assert fig.stat().st_size > 10_000
    assert json.loads((out / "results.json").read_text())["status"] == "completed"


def test_the_in_process_runner_gives_the_same_round_metrics_as_flowers_engine(first_run, tmp_path):
    # One round loop (Strategy.start) over two grids: Flower's Ray engine and the in-memory grid.
    results, _ = first_run
    again = load_results(run_in_process(tiny_config(), tmp_path / "inproc"))
    keep = (
        "accuracy",
        "loss",
        "balanced_accuracy",
        "participants",
        "aggregated",
        "uplink_payload_bytes",
        "uplink_message_bytes",
        "downlink_payload_bytes",
        "downlink_message_bytes",
    )
    strip = lambda rs: [{k: r.get(k) for k in keep} for r in rs["rounds"]]  # noqa: E731
    assert strip(again) == strip(results)
    assert again["status"] == "completed"


def _fail_every_train(msg: Message, context, call_next):
    if msg.metadata.message_type == "train":
        raise FloatingPointError("local loss became nan at step 0; lower train.lr")
    return call_next(msg, context)


def test_a_run_where_no_update_is_ever_aggregated_ends_failed_with_the_clients_own_error(tmp_path):
    results = load_results(run_in_process(tiny_config(), tmp_path / "dead", client_mods=[_fail_every_train]))
    assert results["status"] == "failed"
    assert "FloatingPointError: local loss became nan at step 0; lower train.lr" in results["error"]
    assert all(len(row["failed"]) == 3 for row in results["rounds"][1:])
