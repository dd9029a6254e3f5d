"""MIFA and FedVarp keep each client's latest update: hand-computed over 3 clients and 3 rounds."""

import numpy as np
import pytest

from strategies.memory import (
    fedvarp_update,
    memory_bytes,
    memory_from_arrays,
    memory_to_arrays,
    mifa_update,
)

# (participants, their deltas) per round; N = 3, one tensor "w" = [x, -x]
ROUNDS = [([0, 1], [1.0, 2.0]), ([1, 2], [4.0, 3.0]), ([0], [-2.0])]


def _state(x: float) -> dict:
    return {"w": np.array([x, -x], dtype=np.float32)}


def _run(update_fn) -> list[float]:
    memory, out = {}, []
    for participants, values in ROUNDS:
        update, memory = update_fn(memory, participants, [_state(v) for v in values], 3)
        np.testing.assert_allclose(update["w"][1], -update["w"][0], rtol=1e-6)
        out.append(float(update["w"][0]))
    return out, memory


def test_mifa_averages_every_stored_update_over_all_clients():
    # memory after each round: {0: 1, 1: 2}, {0: 1, 1: 4, 2: 3}, {0: -2, 1: 4, 2: 3}; divided by N = 3
    updates, memory = _run(mifa_update)
    np.testing.assert_allclose(updates, [3 / 3, 8 / 3, 5 / 3], rtol=1e-6)
    assert sorted(memory) == [0, 1, 2] and float(memory[0]["w"][0]) == -2.0


def test_fedvarp_uses_the_stored_updates_as_a_control_variate():
    # round 1: 0 + ((1 - 0) + (2 - 0)) / 2 = 1.5
    # round 2: (1 + 2 + 0) / 3 + ((4 - 2) + (3 - 0)) / 2 = 3.5
    # round 3: (1 + 4 + 3) / 3 + (-2 - 1) / 1 = -1/3
    updates, memory = _run(fedvarp_update)
    np.testing.assert_allclose(updates, [1.5, 3.5, -1 / 3], rtol=1e-6)
    assert float(memory[1]["w"][0]) == 4.0


def test_fedvarp_with_every_client_every_round_is_the_plain_mean():
    memory = {0: _state(5.0), 1: _state(-7.0)}
    update, _ = fedvarp_update(memory, [0, 1], [_state(1.0), _state(2.0)], 2)
    np.testing.assert_allclose(update["w"], [1.5, -1.5], rtol=1e-6)


def test_memory_is_counted_in_bytes_and_survives_a_checkpoint_round_trip():
    _, memory = _run(mifa_update)
    assert memory_bytes(memory) == 3 * 2 * 4  # three clients, two float32 each
    back = memory_from_arrays(memory_to_arrays(memory))
    assert sorted(back) == sorted(memory)
    assert all(np.array_equal(back[p]["w"], memory[p]["w"]) for p in memory)


def test_memory_stores_copies_not_the_callers_arrays():
    delta = _state(1.0)
    _, memory = mifa_update({}, [0], [delta], 1)
    delta["w"][0] = 99.0
    assert float(memory[0]["w"][0]) == 1.0
    with pytest.raises(ValueError):
        mifa_update({}, [0, 1], [delta], 2)


# --- as aggregator parts of PeftStrategy, under Flower's own round loop ---------------------

ONLINE = {1: [0, 1], 2: [1, 2], 3: [0]}  # partitions online per round


def _memory_strategy(aggregator, reports=None):
    from strategies import PeftStrategy, UniformWeights

    return PeftStrategy(
        weighting=UniformWeights(),
        aggregator=aggregator,
        node_selector=lambda rnd, grid: [1000 + p for p in ONLINE[rnd]],
        partition_of=lambda node: node - 1000,
        report=reports,
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        # client p always sends p + 1. MIFA: (1+2)/3 = 1; (1+2+3)/3 = 2; 2 -> the global is 1, 3, 5.
        ("mifa", [0.0, 1.0, 3.0, 5.0]),
        # FedVarp: 0 + (1+2)/2 = 1.5; (1+2)/3 + ((2-2) + (3-0))/2 = 2.5; (1+2+3)/3 + (1-1) = 2 -> 1.5, 4, 6.
        ("fedvarp", [0.0, 1.5, 4.0, 6.0]),
    ],
)
def test_memory_aggregators_under_strategy_start_by_hand(name, expected):
    from strategies.memory import MIFA, FedVarp
    from tests.replies import RoundReports, numpy_clients
    from tests.replies import run_rounds as run

    reports = RoundReports()
    aggregator = (MIFA if name == "mifa" else FedVarp)(num_clients=3)
    grid = numpy_clients(lambda pid, state: {"w": np.full(2, pid + 1.0, np.float32)}, num_clients=3)
    states, _ = run(_memory_strategy(aggregator, reports), grid, {"w": np.zeros(2, np.float32)}, num_rounds=3)
    np.testing.assert_allclose([s["w"][0] for s in states], expected, rtol=1e-6)
    assert [reports[r]["memory_clients"] for r in (1, 2, 3)] == [2, 3, 3]
    assert reports[3]["memory_bytes"] == 3 * 2 * 4


def test_memory_resumes_bit_identically_from_a_checkpoint():
    from simulations.resume import Resumed
    from strategies.memory import FedVarp
    from tests.replies import numpy_clients
    from tests.replies import run_rounds as run

    clients = lambda pid, state: {"w": (state["w"] * 0.5 + pid + 1.0).astype(np.float32)}  # noqa: E731
    full, _ = run(
        _memory_strategy(FedVarp(num_clients=3)),
        numpy_clients(clients, num_clients=3),
        {"w": np.zeros(2, np.float32)},
        3,
    )
    first = _memory_strategy(FedVarp(num_clients=3))
    part, _ = run(first, numpy_clients(clients, num_clients=3), {"w": np.zeros(2, np.float32)}, 2)
    meta, arrays = first.checkpoint_state()
    assert sorted(meta["aggregator"]["clients"]) == [0, 1, 2]
    second = _memory_strategy(FedVarp(num_clients=3))
    second.restore_state(meta, arrays)

    rest, _ = run(Resumed(strategy=second, offset=2), numpy_clients(clients, num_clients=3), part[-1], 1)
    assert np.array_equal(rest[-1]["w"], full[-1]["w"])


def test_memory_aggregators_are_refused_where_they_are_undefined():
    from fedpeft.config import ConfigError
    from tests.helpers import tiny_config

    uniform = {"strategy.weighting": "uniform"}
    with pytest.raises(ConfigError, match="subsampling amplification"):
        tiny_config(**uniform, **{"strategy.aggregator": "fedvarp", "dp.mode": "client"})
    with pytest.raises(ConfigError, match="strategy.weighting"):
        tiny_config(**{"strategy.aggregator": "mifa"})
    with pytest.raises(ConfigError, match="strategy.name"):
        tiny_config(**uniform, **{"strategy.aggregator": "mifa", "strategy.name": "fedau"})
    assert tiny_config(**uniform, **{"strategy.aggregator": "mifa"}).strategy.aggregator == "mifa"
