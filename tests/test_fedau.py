"""FedAU weights (hand-worked), the lazy state vs the round-by-round trace, and the strategy."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedpeft.records import record_to_state, state_to_record
from strategies import Mean, OracleWeights, PeftStrategy, Step, StrategyContext, build_strategy
from strategies.fedau import FedAUWeights, IntervalState, advance_interval, fedau_weight_trace
from tests.helpers import tiny_config
from tests.replies import RoundReports, fake_reply

GLOBAL = {"lora_A": np.array([[1.0, 2.0]], np.float32), "head.bias": np.array([0.5, -0.5], np.float32)}
DELTAS = [
    {"lora_A": np.array([[1.0, 0.0]], np.float32), "head.bias": np.array([0.0, 3.0], np.float32)},
    {"lora_A": np.array([[0.0, 2.0]], np.float32), "head.bias": np.array([3.0, 0.0], np.float32)},
    {"lora_A": np.array([[4.0, 4.0]], np.float32), "head.bias": np.array([-3.0, 3.0], np.float32)},
]


def test_omega_is_one_at_first_then_the_mean_of_closed_intervals():
    # client 0 joins rounds 1, 4, 6: omega 1 (none closed), 1 (interval [1]), (1 + 3) / 2 = 2
    # client 1 first joins in round 3: omega 1, even though its first interval is 3 long
    part = np.array([[1, 0], [0, 0], [0, 1], [1, 0], [0, 0], [1, 0]], dtype=bool)
    expected = np.array([[1, 0], [0, 0], [0, 1], [1, 0], [0, 0], [2, 0]], dtype=float)
    np.testing.assert_array_equal(fedau_weight_trace(part, k_cap=100), expected)


def test_a_client_absent_k_or_more_rounds_before_its_first_participation_gets_omega_k():
    # K = 2, absent rounds 1-5: cut-off intervals close at rounds 2 and 4, so omega = (2 + 2) / 2 = 2
    part = np.array([[0], [0], [0], [0], [0], [1]], dtype=bool)
    np.testing.assert_array_equal(fedau_weight_trace(part, k_cap=2)[:, 0], [0, 0, 0, 0, 0, 2])
    # absent only K - 1 = 1 round: no interval closed yet, omega = 1
    np.testing.assert_array_equal(fedau_weight_trace(part[-2:], k_cap=2)[:, 0], [0, 1])


def test_the_cutoff_bounds_each_interval_at_k():
    # K = 2, rounds 1, 5, 6: r1 omega 1 (closes 1); absent r2-r4 closes a cut-off 2 at r3, then 1 more
    # absent round; r5 omega (1 + 2) / 2 = 1.5 and closes 1 + 1 = 2; r6 omega (1 + 2 + 2) / 3
    part = np.array([[1], [0], [0], [0], [1], [1]], dtype=bool)
    np.testing.assert_allclose(fedau_weight_trace(part, k_cap=2)[:, 0], [1, 0, 0, 0, 1.5, 5 / 3])
    # with no cutoff the r5 interval is 4: r5 omega 1, r6 omega (1 + 4) / 2
    np.testing.assert_allclose(fedau_weight_trace(part, k_cap=1000)[:, 0], [1, 0, 0, 0, 1, 2.5])


def test_omega_is_one_everywhere_when_every_client_always_participates_or_k_is_one():
    np.testing.assert_array_equal(fedau_weight_trace(np.ones((7, 3), bool), k_cap=50), np.ones((7, 3)))
    rng = np.random.default_rng(0)
    part = rng.random((40, 5)) < 0.3
    np.testing.assert_array_equal(fedau_weight_trace(part, k_cap=1), part.astype(float))


def test_the_lazy_interval_update_matches_the_hand_worked_k_cap_example():
    omega, state = advance_interval(IntervalState(), 6, k_cap=2)
    assert omega == 2.0 and state == IntervalState(last_round=6, total=6, count=3)
    omega, state = advance_interval(state, 7, k_cap=2)
    assert omega == 2.0 and state == IntervalState(last_round=7, total=7, count=4)
    with pytest.raises(ValueError, match="not after"):
        advance_interval(state, 7, k_cap=2)


@pytest.mark.parametrize("k_cap", [1, 2, 3, 7, 50, 10**9])
def test_the_incremental_state_equals_fedau_weight_trace_on_random_traces(k_cap):
    rng = np.random.default_rng(k_cap)
    part = rng.random((300, 12)) < rng.uniform(0.02, 0.9, size=12)
    estimator = FedAUWeights(k_cap=k_cap)
    got = np.zeros(part.shape)
    for t, row in enumerate(part, start=1):
        pids = [int(i) for i in np.flatnonzero(row)]
        got[t - 1, pids] = estimator.weights(t, pids)
    np.testing.assert_allclose(got, fedau_weight_trace(part, k_cap))


def _drive(strategy: PeftStrategy, server_round: int, nodes: list[int], deltas=None, errors=None):
    """One round with fake replies; node id = partition id + 100. Returns the new global state."""
    strategy.node_selector = lambda rnd, grid: nodes
    queries = list(strategy.configure_train(server_round, state_to_record(GLOBAL), ConfigRecord(), grid=None))
    errors = errors or {}
    replies = [
        fake_reply(q, error=errors[n]) if n in errors else fake_reply(q, (deltas or {}).get(n, DELTAS[0]), n=8)
        for q, n in zip(queries, nodes, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies) if replies else (None, None)
    return None if arrays is None else record_to_state(arrays)


def _fedau(num_clients=3, k_cap=100000, server_lr=1.0):
    """FedAU as parts: FedAU weights x the over-N mean x the plain step."""
    reports = RoundReports()
    strategy = PeftStrategy(
        weighting=FedAUWeights(k_cap=k_cap),
        aggregator=Mean(num_clients=num_clients),
        server_update=Step(lr=server_lr),
        partition_of=lambda node: node - 100,
        report=reports,
    )
    return strategy, reports


def test_fedau_with_full_participation_applies_one_over_n_times_the_sum_of_deltas(task_identity):
    strategy, reports = _fedau(server_lr=1.0)
    nodes = [100, 101, 102]
    for t in (1, 2):
        new = _drive(strategy, t, nodes, deltas=dict(zip(nodes, DELTAS, strict=True)))
        assert reports.last["omega"] == {"0": 1.0, "1": 1.0, "2": 1.0}
    # (1/3) * ([1,0] + [0,2] + [4,4]) = [5/3, 2]; bias (1/3) * ([0,3] + [3,0] + [-3,3]) = [0, 2]
    np.testing.assert_allclose(new["lora_A"], [[1 + 5 / 3, 4.0]], atol=1e-6)
    np.testing.assert_allclose(new["head.bias"], [0.5, 1.5], atol=1e-6)


def test_fedau_aggregation_of_two_clients_matches_the_hand_computation(task_identity):
    # rounds: 1 {0}, 2 nobody, 3 {0, 1}, 4 {0, 1}; N = 3, server_lr = 0.5
    # round 4: client 0 closed intervals 1 and 2 -> omega 1.5; client 1 closed 3 -> omega 3
    # new = g + 0.5 * (1.5 d0 + 3 d1) / 3 = g + 0.25 d0 + 0.5 d1
    strategy, reports = _fedau(server_lr=0.5)
    deltas = {100: DELTAS[0], 101: DELTAS[1]}
    _drive(strategy, 1, [100], deltas)
    assert _drive(strategy, 2, []) is None
    _drive(strategy, 3, [100, 101], deltas)
    new = _drive(strategy, 4, [100, 101], deltas)
    assert reports.last["omega"] == {"0": 1.5, "1": 3.0}
    np.testing.assert_allclose(new["lora_A"], [[1.25, 3.0]], atol=1e-6)
    np.testing.assert_allclose(new["head.bias"], [2.0, 0.25], atol=1e-6)


def test_the_strategy_state_equals_fedau_weight_trace_when_driven_by_replies(task_identity):
    rng = np.random.default_rng(3)
    part = rng.random((25, 4)) < np.array([0.1, 0.3, 0.6, 0.9])
    strategy, reports = _fedau(num_clients=4, k_cap=4)
    got = np.zeros(part.shape)
    for t, row in enumerate(part, start=1):
        nodes = [100 + int(i) for i in np.flatnonzero(row)]
        _drive(strategy, t, nodes)
        for pid, omega in reports.last["omega"].items() if nodes else []:
            got[t - 1, int(pid)] = omega
    np.testing.assert_allclose(got, fedau_weight_trace(part, k_cap=4))
    state = json.loads(json.dumps(strategy.state_for_results()))
    assert state["k_cap"] == 4 and set(state["clients"]) <= {"0", "1", "2", "3"}


@pytest.mark.parametrize("bad", ["error", "nan"])
def test_a_failed_or_rejected_reply_counts_as_absence(task_identity, bad):
    # client 0 is online in rounds 1-4 but its round-2 reply fails: to FedAU it was absent,
    # so its omegas are those of the trace [1, 0, 1, 1]: 1, 1, (1 + 2) / 2 = 1.5
    strategy, reports = _fedau(num_clients=1)
    _drive(strategy, 1, [100])
    if bad == "error":
        assert _drive(strategy, 2, [100], errors={100: "client raised"}) is None
    else:
        nan = {"lora_A": np.array([[np.nan, 0.0]], np.float32), "head.bias": np.zeros(2, np.float32)}
        assert _drive(strategy, 2, [100], deltas={100: nan}) is None
    omegas = []
    for t in (3, 4):
        _drive(strategy, t, [100])
        omegas.append(reports.last["omega"]["0"])
    expected = fedau_weight_trace(np.array([[1], [0], [1], [1]], bool), k_cap=100000)[2:, 0]
    assert omegas == list(expected) == [1.0, 1.5]


def test_the_known_p_oracle_weights_by_one_over_p_and_divides_by_n(task_identity):
    # N = 2, p = (0.25, 0.5): new = g + (4 d0 + 2 d1) / 2 = g + 2 d0 + d1
    strategy = PeftStrategy(
        weighting=OracleWeights(probabilities=np.array([0.25, 0.5])),
        aggregator=Mean(num_clients=2),
        partition_of=lambda n: n - 100,
    )
    new = _drive(strategy, 1, [100, 101], {100: DELTAS[0], 101: DELTAS[1]})
    np.testing.assert_allclose(new["lora_A"], [[3.0, 4.0]], atol=1e-6)
    np.testing.assert_allclose(new["head.bias"], [3.5, 5.5], atol=1e-6)


def test_fedau_and_the_oracle_are_built_from_the_config_as_parts():
    class Env:
        probabilities = np.array([0.2, 0.4, 0.8])

    ctx = StrategyContext(node_selector=lambda r, g: [], partition_of=lambda n: n, num_clients=3, environment=Env())
    fedau = build_strategy(tiny_config(**{"strategy.name": "fedau", "strategy.k-cap": 9}), ctx)
    assert isinstance(fedau.weighting, FedAUWeights) and fedau.weighting.k_cap == 9
    assert fedau.aggregator.num_clients == 3
    oracle = build_strategy(tiny_config(**{"strategy.name": "known_p_oracle"}), ctx)
    np.testing.assert_allclose(oracle.weighting.probabilities, [0.2, 0.4, 0.8])
    assert oracle.aggregator.num_clients == 3
    with pytest.raises(ValueError, match="probabilities"):
        build_strategy(
            tiny_config(**{"strategy.name": "known_p_oracle"}), StrategyContext(ctx.node_selector, ctx.partition_of, 3)
        )


def test_peft_layers_are_parsed_to_a_list_of_layer_indices_or_none_for_all():
    from fedpeft.adapters import parse_layers

    assert parse_layers("4, 5") == [4, 5]
    assert parse_layers("") is None


def test_peft_layers_rejects_anything_but_comma_separated_indices():
    from fedpeft.config import ConfigError

    with pytest.raises(ConfigError, match="peft.layers"):
        tiny_config(**{"peft.layers": "top2"})
    assert tiny_config(**{"peft.layers": "4,5"}).peft.layers == "4,5"


def test_lora_on_the_top_layer_only_adds_adapters_to_that_layer_alone():
    from fedpeft.tasks import load_task

    task = load_task(tiny_config(**{"peft.layers": "5", "peft.target-modules": "query,value"}))
    lora = [name for name in task.initial_state if "lora_" in name]
    assert lora and all(".layer.5." in name for name in lora)
