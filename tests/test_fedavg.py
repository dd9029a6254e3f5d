import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType

from fedpeft.records import record_to_state, state_to_record
from strategies import PeftStrategy, Step, UniformWeights
from strategies.aggregate import combine, mean_normalisation
from strategies.base import ContractError
from tests.replies import RoundReports, fake_reply

GLOBAL = {"lora_A": np.array([[1.0, 2.0]], np.float32), "head.bias": np.array([0.5, -0.5], np.float32)}


def _deltas():
    return [
        {"lora_A": np.array([[1.0, 0.0]], np.float32), "head.bias": np.array([0.0, 3.0], np.float32)},
        {"lora_A": np.array([[0.0, 2.0]], np.float32), "head.bias": np.array([3.0, 0.0], np.float32)},
        {"lora_A": np.array([[4.0, 4.0]], np.float32), "head.bias": np.array([-3.0, 3.0], np.float32)},
    ]


def test_weighted_average_of_three_deltas_matches_the_hand_computation():
    # weights 1, 2, 1 (sum 4): lora_A = (1*[1,0] + 2*[0,2] + 1*[4,4]) / 4 = [1.25, 2.0]
    #                          bias   = (1*[0,3] + 2*[3,0] + 1*[-3,3]) / 4 = [0.75, 1.5]
    weights = np.array([1.0, 2.0, 1.0])
    scale, divisor = mean_normalisation(weights)
    avg = combine(_deltas(), weights, scale=scale, divisor=divisor)
    np.testing.assert_array_equal(avg["lora_A"], np.array([[1.25, 2.0]], np.float32))
    np.testing.assert_array_equal(avg["head.bias"], np.array([0.75, 1.5], np.float32))


def _round(strategy: PeftStrategy, nodes: list[int]):
    strategy.node_selector = lambda rnd, grid: nodes
    return list(strategy.configure_train(1, state_to_record(GLOBAL), ConfigRecord(), grid=None))


def test_strategy_applies_server_lr_times_the_example_weighted_delta(task_identity):
    reports = RoundReports()
    strategy = PeftStrategy(server_update=Step(lr=0.5), partition_of=lambda node: node - 100, report=reports)
    queries = _round(strategy, [100, 101])
    assert [q.metadata.dst_node_id for q in queries] == [100, 101]
    assert queries[0].metadata.message_type == MessageType.TRAIN
    d = _deltas()
    replies = [fake_reply(queries[0], d[0], n=30), fake_reply(queries[1], d[1], n=10)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    new = record_to_state(arrays)
    # avg = (30*[1,0] + 10*[0,2]) / 40 = [0.75, 0.5]; new = [1,2] + 0.5*avg = [1.375, 2.25]
    np.testing.assert_allclose(new["lora_A"], [[1.375, 2.25]], rtol=0, atol=1e-7)
    # bias avg = (30*[0,3] + 10*[3,0]) / 40 = [0.75, 2.25]; new = [0.5,-0.5] + 0.5*avg
    np.testing.assert_allclose(new["head.bias"], [0.875, 0.625], rtol=0, atol=1e-7)
    assert metrics["num-examples"] == 40
    assert reports.last["aggregated"] == [0, 1]


def test_uniform_weighting_ignores_example_counts(task_identity):
    strategy = PeftStrategy(weighting=UniformWeights())
    queries = _round(strategy, [1, 2])
    d = _deltas()
    arrays, _ = strategy.aggregate_train(1, [fake_reply(queries[0], d[0], n=30), fake_reply(queries[1], d[1], n=10)])
    np.testing.assert_allclose(record_to_state(arrays)["lora_A"], [[1.5, 3.0]])


@pytest.mark.parametrize(
    "bad,reason",
    [
        ({"lora_A": np.array([[np.nan, 0.0]], np.float32), "head.bias": np.zeros(2, np.float32)}, "NaN or Inf"),
        ({"lora_A": np.array([[np.inf, 0.0]], np.float32), "head.bias": np.zeros(2, np.float32)}, "NaN or Inf"),
        ({"lora_A": np.zeros((2, 1), np.float32), "head.bias": np.zeros(2, np.float32)}, "shape"),
        ({"lora_A": np.zeros((1, 2), np.float32)}, "keys differ"),
    ],
)
def test_bad_deltas_are_rejected_and_never_reach_the_global_state(task_identity, bad, reason):
    reports = RoundReports()
    strategy = PeftStrategy(partition_of=lambda node: node, report=reports)
    queries = _round(strategy, [1, 2])
    good = _deltas()[0]
    arrays, _ = strategy.aggregate_train(1, [fake_reply(queries[0], good, n=5), fake_reply(queries[1], bad, n=5)])
    np.testing.assert_array_equal(record_to_state(arrays)["lora_A"], GLOBAL["lora_A"] + good["lora_A"])
    assert reports.last["aggregated"] == [1]
    assert len(reports.last["rejected"]) == 1 and reason in reports.last["rejected"][0]["reason"]


def test_failed_replies_are_recorded_and_the_rest_aggregated(task_identity):
    reports = RoundReports()
    strategy = PeftStrategy(partition_of=lambda node: node, report=reports)
    queries = _round(strategy, [1, 2])
    good = _deltas()[1]
    replies = [fake_reply(queries[0], error="client raised RuntimeError"), fake_reply(queries[1], good, n=3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(record_to_state(arrays)["head.bias"], GLOBAL["head.bias"] + good["head.bias"])
    assert reports.last["failed"] == [{"partition_id": 1, "reason": "client raised RuntimeError"}]


def test_a_round_where_every_reply_is_bad_leaves_the_global_state_alone(task_identity):
    strategy = PeftStrategy(partition_of=lambda node: node)
    queries = _round(strategy, [1])
    arrays, metrics = strategy.aggregate_train(1, [fake_reply(queries[0], error="boom")])
    assert arrays is None and metrics is None


@pytest.mark.parametrize("count", [float("inf"), float("nan"), 0, -3, 1e13])
def test_an_absurd_example_count_is_rejected_and_never_reaches_the_global_state(task_identity, count):
    reports = RoundReports()
    strategy = PeftStrategy(partition_of=lambda node: node, report=reports)
    queries = _round(strategy, [1, 2])
    good = _deltas()[0]
    arrays, _ = strategy.aggregate_train(1, [fake_reply(queries[0], good, n=5), fake_reply(queries[1], good, n=count)])
    np.testing.assert_array_equal(record_to_state(arrays)["lora_A"], GLOBAL["lora_A"] + good["lora_A"])
    assert [r["partition_id"] for r in reports.last["rejected"]] == [2]
    assert "num-examples" in reports.last["rejected"][0]["reason"]


def test_full_weights_are_refused_with_a_message_naming_the_contract(task_identity):
    strategy = PeftStrategy(partition_of=lambda node: node)
    queries = _round(strategy, [1, 2])
    weights = {k: v + 1 for k, v in GLOBAL.items()}
    replies = [fake_reply(queries[0], weights, n=5, kind="arrays"), fake_reply(queries[1], weights, n=5, kind=None)]
    with pytest.raises(ContractError, match="message contract.*'delta'"):
        strategy.aggregate_train(1, replies)


def test_one_reply_breaking_the_contract_is_rejected_and_the_others_aggregated(task_identity):
    reports = RoundReports()
    strategy = PeftStrategy(partition_of=lambda node: node, report=reports)
    queries = _round(strategy, [1, 2])
    good = _deltas()[0]
    arrays, _ = strategy.aggregate_train(1, [fake_reply(queries[0], good), fake_reply(queries[1], good, kind="arrays")])
    np.testing.assert_array_equal(record_to_state(arrays)["lora_A"], GLOBAL["lora_A"] + good["lora_A"])
    assert "message contract" in reports.last["rejected"][0]["reason"]


def test_a_partition_that_never_answers_is_reported_as_failed(task_identity):
    reports = RoundReports()
    strategy = PeftStrategy(partition_of=lambda node: node, report=reports)
    queries = _round(strategy, [1, 2])
    strategy.aggregate_train(1, [fake_reply(queries[0], _deltas()[0])])
    assert reports.last["aggregated"] == [1]
    assert reports.last["failed"] == [{"partition_id": 2, "reason": "no reply within simulation.round-timeout-s"}]


def test_train_metrics_are_aggregated_meaningfully_and_per_client_rows_kept(task_identity):
    reports = RoundReports()
    strategy = PeftStrategy(partition_of=lambda node: node, report=reports)
    queries = _round(strategy, [1, 2])
    d = _deltas()
    m1 = {"train-loss": 1.0, "num-steps": 3, "partition-id": 1}
    m2 = {"train-loss": 4.0, "num-steps": 5, "partition-id": 2}
    _, metrics = strategy.aggregate_train(
        1, [fake_reply(queries[0], d[0], n=30, metrics=m1), fake_reply(queries[1], d[1], n=10, metrics=m2)]
    )
    assert metrics["train-loss"] == pytest.approx((30 * 1.0 + 10 * 4.0) / 40)
    assert metrics["num-examples"] == 40 and metrics["num-clients"] == 2
    assert metrics["max-coefficient"] == pytest.approx(0.75)
    assert "partition-id" not in metrics and "num-steps" not in metrics
    assert reports.last["clients"] == [
        {"partition_id": 1, "num-examples": 30, "train-loss": 1.0, "num-steps": 3},
        {"partition_id": 2, "num-examples": 10, "train-loss": 4.0, "num-steps": 5},
    ]
