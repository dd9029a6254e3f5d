"""FedProx, SCAFFOLD and per-client evaluation end to end: the real ClientApp and strategy, in process."""

import numpy as np

from fedpeft.holdout import holdout_count
from fedpeft.results import load_results
from fedpeft.tasks import load_task
from simulations.inprocess import run_in_process
from simulations.resume import read_checkpoint
from strategies.client_eval import evaluation_partitions
from tests.helpers import tiny_config

BASE = {
    "peft.method": "head",
    "strategy.weighting": "uniform",
    "train.optimizer": "sgd",
    "train.lr": 0.05,
    "train.local-steps": 3,
    "data.num-test-examples": 16,
    "data.max-seq-len": 16,
}


def _run(tmp_path, name, rounds=2, mods=None, **overrides):
    cfg = tiny_config(**{"name": name, "num-rounds": rounds, **BASE, **overrides})
    run_dir = tmp_path / name
    results = load_results(run_in_process(cfg, run_dir, client_mods=mods))
    return cfg, results, read_checkpoint(run_dir)


def _bytes(results, direction):
    return [r[f"{direction}_payload_bytes"] for r in results["rounds"][1:]]


def test_scaffold_doubles_both_directions_and_its_control_is_the_negated_mean_step(tmp_path):
    _, plain, _ = _run(tmp_path, "plain")
    cfg, scaffold, (_, x1, extra) = _run(tmp_path, "scaffold", rounds=1, **{"strategy.control-variates": "scaffold"})
    _, scaffold2, _ = _run(tmp_path, "scaffold2", **{"strategy.control-variates": "scaffold"})
    # c and delta c_i have the adapter's shapes: exactly twice the adapter payload each way
    assert _bytes(scaffold2, "uplink") == [2 * b for b in _bytes(plain, "uplink")]
    assert _bytes(scaffold2, "downlink") == [2 * b for b in _bytes(plain, "downlink")]
    # Round 1 by hand: c = c_i = 0, so c_i+ = -delta_i / (K lr) and c = (1/N) sum_i c_i+; all N = 3
    # clients train and weigh 1/3, so x1 - x0 = (1/3) sum_i delta_i and c = -(x1 - x0) / (K lr).
    x0 = load_task(cfg).initial_state
    c = {k.removeprefix("client_drift/scaffold-c/"): v for k, v in extra.items()}
    assert sorted(c) == sorted(x0)
    for key in x0:
        np.testing.assert_allclose(c[key], -(x1[key] - x0[key]) / (3 * 0.05), rtol=1e-4, atol=1e-6)
    assert scaffold["rounds"][1]["scaffold_c_norm"] > 0
    # round 2 trains with the correction: it moves differently from plain FedAvg
    assert scaffold2["rounds"][2]["loss"] != plain["rounds"][2]["loss"]


def test_fedprox_mu_travels_in_every_train_message_and_holds_clients_near_the_global_state(tmp_path):
    seen = []

    def spy(msg, context, call_next):
        if msg.metadata.message_type.startswith("train"):
            seen.append(msg.content["config"].get("prox-mu"))
        return call_next(msg, context)

    _, plain, (_, plain_x, _) = _run(tmp_path, "plain", rounds=1, **{"train.lr": 0.5})
    cfg, prox, (_, prox_x, _) = _run(tmp_path, "prox", rounds=1, mods=[spy], **{"train.lr": 0.5, "train.prox-mu": 1.5})
    assert seen == [1.5, 1.5, 1.5]
    assert _bytes(prox, "uplink") == _bytes(plain, "uplink")
    x0 = load_task(cfg).initial_state
    step = lambda x: np.sqrt(sum(np.sum((x[k] - x0[k]).astype(np.float64) ** 2) for k in x0))  # noqa: E731
    assert step(prox_x) < 0.8 * step(plain_x), (step(prox_x), step(plain_x))


def test_per_client_evaluation_scores_drawn_clients_on_their_own_held_out_rows(tmp_path):
    _, plain, _ = _run(tmp_path, "plain")
    cfg, results, _ = _run(tmp_path, "eval", **{"evaluate.fraction-clients": 0.67})
    task = load_task(cfg)
    for row in results["rounds"][1:]:
        clients = row["client_eval"]
        assert [c["partition_id"] for c in clients] == evaluation_partitions(3, 0.67, seed=0, server_round=row["round"])
        for c in clients:
            assert c["num_examples"] == holdout_count(len(task.partition(c["partition_id"])), 0.2)
        accs = sorted(c["accuracy"] for c in clients)
        assert row["client_accuracy_mean"] == np.mean(accs) and row["client_accuracy_worst10"] == accs[0]
        assert row["accuracy"] is not None  # beside the global test accuracy
    # evaluation messages are in the ledger, not on the training byte axis
    assert _bytes(results, "downlink") == _bytes(plain, "downlink")
    assert any(r["kind"] == "evaluate" for r in results["ledger"])
    # training leaves each client's held-out rows out (and keeps all of them when evaluation is off)
    for p in range(3):
        size = len(task.partition(p))
        assert len(task.client_rows(p)) == size - holdout_count(size, 0.2)
        assert len(task.client_rows(p)) + len(task.client_holdout(p)) == size
    assert len(load_task(tiny_config(**BASE)).client_rows(0)) == len(task.partition(0))


def test_mifa_from_the_config_reports_its_memory_in_every_row(tmp_path):
    cfg, results, (meta, _, extra) = _run(tmp_path, "mifa", **{"strategy.aggregator": "mifa"})
    adapter_bytes = sum(v.nbytes for v in load_task(cfg).initial_state.values())
    assert [r["memory_bytes"] for r in results["rounds"][1:]] == [3 * adapter_bytes] * 2  # all 3 clients online
    assert sorted(meta["strategy"]["aggregator"]["clients"]) == [0, 1, 2]
    assert len([k for k in extra if k.startswith("aggregator/")]) == 3 * len(load_task(cfg).initial_state)


def test_scaffold_in_a_cohort_node_keeps_each_clients_c_i_and_matches_one_client_per_node(tmp_path):
    scaffold = {"strategy.control-variates": "scaffold", "train.prox-mu": 0.1}
    _, alone, (_, x_alone, c_alone) = _run(tmp_path, "alone", **scaffold)
    _, cohort, (_, x_cohort, c_cohort) = _run(tmp_path, "cohort", **scaffold, **{"simulation.cohort-size": 3})
    assert _bytes(cohort, "uplink") == _bytes(alone, "uplink")
    for key in x_alone:
        np.testing.assert_allclose(x_cohort[key], x_alone[key], rtol=1e-6, atol=1e-7)
    for key in c_alone:
        np.testing.assert_allclose(c_cohort[key], c_alone[key], rtol=1e-6, atol=1e-7)


def test_per_client_evaluation_through_a_cohort_node_scores_every_client_as_alone(tmp_path):
    every = {"evaluate.fraction-clients": 1.0}
    _, alone, _ = _run(tmp_path, "alone", rounds=1, **every)
    _, cohort, _ = _run(tmp_path, "cohort", rounds=1, **every, **{"simulation.cohort-size": 3})
    assert [c["partition_id"] for c in cohort["rounds"][1]["client_eval"]] == [0, 1, 2]
    for a, c in zip(alone["rounds"][1]["client_eval"], cohort["rounds"][1]["client_eval"], strict=True):
        assert a["num_examples"] == c["num_examples"] and abs(a["accuracy"] - c["accuracy"]) < 1e-9
