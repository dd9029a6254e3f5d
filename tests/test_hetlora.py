"""Server strategies for FFA-LoRA (plain FedAvg over B) and unequal LoRA ranks (HetLoRA, FlexLoRA)."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message

from fedpeft.comm import payload_bytes
from fedpeft.records import record_to_state, state_to_record
from strategies import FlexSVD, PeftStrategy, UniformWeights, ZeroPad
from strategies.lora_hetero import factor_bytes, slice_rank
from tests.helpers import tiny_config
from tests.replies import RoundReports, fake_reply

A = "m.lora_A.default.weight"
B = "m.lora_B.default.weight"
HEAD = "classifier.modules_to_save.default.bias"


def _send(strategy, state: dict, nodes: list[int]) -> list[Message]:
    strategy.node_selector = lambda rnd, grid: nodes
    return list(strategy.configure_train(1, state_to_record(state), ConfigRecord(), grid=None))


def test_ffa_fedavg_over_b_applies_exactly_the_mean_of_the_clients_b_times_a(task_identity):
    a = np.array([[1.0, 2.0]], np.float32)  # frozen, identical on both clients, never sent
    state = {B: np.zeros((2, 1), np.float32), HEAD: np.zeros(2, np.float32)}
    strategy = PeftStrategy(weighting=UniformWeights(), partition_of=lambda node: node)
    queries = _send(strategy, state, [0, 1])
    assert all(set(q.content["arrays"].keys()) == {B, HEAD} for q in queries)
    b1, b2 = np.array([[1.0], [2.0]], np.float32), np.array([[3.0], [4.0]], np.float32)
    replies = [
        fake_reply(queries[0], {B: b1, HEAD: np.ones(2, np.float32)}),
        fake_reply(queries[1], {B: b2, HEAD: np.ones(2, np.float32)}),
    ]
    new = record_to_state(strategy.aggregate_train(1, replies)[0])
    # mean(B) x A = [[2], [3]] x [[1, 2]] = [[2, 4], [3, 6]] = ([[1, 2], [2, 4]] + [[3, 6], [4, 8]]) / 2
    np.testing.assert_array_equal(new[B] @ a, [[2.0, 4.0], [3.0, 6.0]])
    np.testing.assert_array_equal(new[B] @ a, (b1 @ a + b2 @ a) / 2)


def _het_state() -> dict[str, np.ndarray]:
    return {A: np.zeros((2, 2), np.float32), B: np.zeros((2, 2), np.float32), HEAD: np.zeros(1, np.float32)}


def test_hetlora_sends_each_client_its_ranks_slice_and_averages_each_slice_over_its_owners(task_identity):
    reports = RoundReports()
    strategy = PeftStrategy(aggregator=ZeroPad(ranks=[1, 2]), partition_of=lambda node: node - 10, report=reports)
    queries = _send(strategy, _het_state(), [10, 11])
    assert record_to_state(queries[0].content["arrays"])[A].shape == (1, 2)
    assert record_to_state(queries[0].content["arrays"])[B].shape == (2, 1)
    assert record_to_state(queries[1].content["arrays"])[A].shape == (2, 2)
    assert payload_bytes(queries[0].content) == (2 + 2 + 1) * 4 and payload_bytes(queries[1].content) == (4 + 4 + 1) * 4
    one = {A: np.array([[1, 2]], np.float32), B: np.array([[3], [4]], np.float32), HEAD: np.array([1.0], np.float32)}
    two = {
        A: np.array([[5, 6], [7, 8]], np.float32),
        B: np.array([[1, 2], [3, 4]], np.float32),
        HEAD: np.array([5.0], np.float32),
    }
    arrays, metrics = strategy.aggregate_train(
        1, [fake_reply(queries[1], two, n=30), fake_reply(queries[0], one, n=10)]
    )
    new = record_to_state(arrays)
    # slice 0: weights 10, 30 -> 1/4, 3/4; slice 1: client 1 alone; head: 1/4, 3/4 (hand-worked)
    np.testing.assert_allclose(new[A], [[4, 5], [7, 8]])
    np.testing.assert_allclose(new[B], [[1.5, 2], [3.25, 4]])
    np.testing.assert_allclose(new[HEAD], [4.0])
    assert metrics["max-slice-coefficient"] == 1.0 and metrics["max-coefficient"] == 0.75
    assert reports.last["client-ranks"] == [1, 2]
    assert [c["lora-rank"] for c in reports.last["clients"]] == [1, 2]


def test_hetlora_rejects_a_reply_whose_rank_is_not_its_clients(task_identity):
    strategy = PeftStrategy(aggregator=ZeroPad(ranks=[1, 2]), partition_of=lambda node: node)
    queries = _send(strategy, _het_state(), [0, 1])
    wrong = {A: np.ones((2, 2), np.float32), B: np.ones((2, 2), np.float32), HEAD: np.ones(1, np.float32)}
    good = {A: np.ones((2, 2), np.float32), B: np.ones((2, 2), np.float32), HEAD: np.ones(1, np.float32)}
    strategy.aggregate_train(1, [fake_reply(queries[0], wrong), fake_reply(queries[1], good)])
    assert [r["partition_id"] for r in strategy.screen.outcome["rejected"]] == [0]
    assert "shape" in strategy.screen.outcome["rejected"][0]["reason"]


def test_flexlora_global_product_is_the_average_of_the_clients_products_at_full_rank(task_identity):
    strategy = PeftStrategy(
        weighting=UniformWeights(), aggregator=FlexSVD(ranks=[1, 2]), partition_of=lambda node: node
    )
    start = {
        A: np.array([[1, 0], [0, 1]], np.float32),
        B: np.array([[1, 0], [0, 1]], np.float32),
        HEAD: np.zeros(1, np.float32),
    }
    queries = _send(strategy, start, [0, 1])
    one = {A: np.array([[1, 1]], np.float32), B: np.array([[0], [1]], np.float32), HEAD: np.array([2.0], np.float32)}
    two = {A: np.zeros((2, 2), np.float32), B: np.array([[1, 0], [0, 0]], np.float32), HEAD: np.zeros(1, np.float32)}
    arrays, metrics = strategy.aggregate_train(1, [fake_reply(queries[0], one), fake_reply(queries[1], two)])
    new = record_to_state(arrays)
    # client 0 (rank 1): B=[[1],[1]], A=[[2,1]] -> [[2,1],[2,1]]; client 1: B=[[2,0],[0,1]], A=I -> [[2,0],[0,1]]
    np.testing.assert_allclose(new[B].astype(np.float64) @ new[A], [[2.0, 0.5], [1.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(new[HEAD], [1.0])
    assert metrics["flex-svd-matrices"] == 1.0 and metrics["flex-energy-kept"] == pytest.approx(1.0)
    later = _send(strategy, new, [0, 1])
    assert record_to_state(later[0].content["arrays"])[A].shape == (1, 2)
    assert record_to_state(later[1].content["arrays"])[B].shape == (2, 2)


@pytest.mark.slow
def test_a_three_rank_run_records_every_rank_and_each_clients_bytes_are_its_factor_sizes_times_four(tmp_path):
    # FlexLoRA shares HetLoRA's sending and validation, and adds the SVD over the real model's keys.
    from fedpeft.tasks import load_task
    from simulations.inprocess import run_in_process

    cfg = tiny_config(**{"strategy.name": "flexlora", "clients.rank-profile": "2,4,8", "num-rounds": 1})
    results = json.loads(run_in_process(cfg, tmp_path).read_text())
    assert results["status"] == "completed" and results["client_ranks"] == [2, 4, 8]
    assert results["rounds"][-1]["client-ranks"] == [2, 4, 8]
    initial = load_task(cfg).initial_state
    train_rows = [r for r in results["ledger"] if r["kind"] == "train"]
    for pid, rank in enumerate([2, 4, 8]):
        expected = factor_bytes(slice_rank(initial, rank))
        rows = [r for r in train_rows if r["partition_id"] == pid]
        assert sorted(r["direction"] for r in rows) == ["down", "up"]
        assert all(r["payload_bytes"] == expected for r in rows)
    assert results["rounds"][-1]["accuracy"] > 0
