"""Strategies built from parts under Flower's round loop: server optimizers, robust aggregators, DP placement,
checkpointed moments, and the combinations that are refused."""

import json
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedpeft.config import ConfigError
from fedpeft.records import record_to_state, state_to_record
from fedpeft.rng import numpy_rng
from simulations.resume import Resumed, read_checkpoint, write_checkpoint
from strategies import (
    Adaptive,
    ClientLevelDP,
    FlexSVD,
    Krum,
    Median,
    Momentum,
    PeftStrategy,
    Step,
    StrategyContext,
    TrimmedMean,
    UniformWeights,
    build_strategy,
)
from strategies import aggregate as agg
from strategies.dp import add_noise
from strategies.server_update import build_server_update
from tests.helpers import tiny_config
from tests.replies import RoundReports, fake_reply, numpy_clients, run_rounds


def _strategy(**parts) -> PeftStrategy:
    return PeftStrategy(weighting=UniformWeights(), partition_of=lambda node: node - 1000, **parts)


def _constant(values, size=2):
    """Partition p sends ``values[p] * ones(size)`` every round."""
    return lambda pid, state: {"w": np.full(size, values[pid], np.float32)}


def test_fedavgm_under_strategy_start_accumulates_the_velocity_as_worked_by_hand():
    # clients send 1 and 2: Delta = 1.5, g = -1.5; lr 1, beta 0.5
    # round 1: v = -1.5, x = 1.5; round 2: v = 0.5 * -1.5 - 1.5 = -2.25, x = 1.5 + 2.25 = 3.75
    strategy = _strategy(server_update=Momentum(lr=1.0, beta=0.5))
    states, _ = run_rounds(strategy, numpy_clients(_constant([1.0, 2.0]), num_clients=2), {"w": np.zeros(2)}, 2)
    np.testing.assert_allclose([s["w"][0] for s in states], [0.0, 1.5, 3.75])


def test_fedadam_under_strategy_start_follows_reddi_algorithm_2_as_worked_by_hand():
    # one client sends Delta = 0.5 (g = -0.5); lr 0.1, b1 0.9, b2 0.99, tau 0.1, v_{-1} = tau^2 = 0.01
    # round 1: m = -0.05, v = 0.99 * 0.01 + 0.01 * 0.25 = 0.0124
    # round 2: m = 0.9 * -0.05 - 0.05 = -0.095, v = 0.99 * 0.0124 + 0.0025 = 0.014776
    strategy = _strategy(server_update=Adaptive(rule="adam", lr=0.1, beta1=0.9, beta2=0.99, tau=0.1))
    states, _ = run_rounds(strategy, numpy_clients(_constant([0.5]), num_clients=1), {"w": np.zeros(2)}, 2)
    x1 = 0.1 * 0.05 / (math.sqrt(0.0124) + 0.1)
    x2 = x1 + 0.1 * 0.095 / (math.sqrt(0.014776) + 0.1)
    np.testing.assert_allclose([s["w"][0] for s in states], [0.0, x1, x2], rtol=1e-6)


def _drifting(pid, state):
    """A delta that depends on the global state, so a wrong restore shows in later rounds."""
    return {"w": (-0.3 * state["w"] + 0.1 * (pid + 1)).astype(np.float32)}


@pytest.mark.parametrize("optimizer", ["momentum", "adam", "yogi", "adagrad"])
def test_a_resumed_run_with_server_optimizer_moments_ends_bit_identical(tmp_path, optimizer):
    initial = {"w": np.linspace(-1, 1, 5).astype(np.float32)}

    def fresh():
        return _strategy(server_update=build_server_update(optimizer, lr=0.05, tau=1e-3))

    straight, _ = run_rounds(fresh(), numpy_clients(_drifting, num_clients=3), initial, 4)
    first = fresh()
    halfway, _ = run_rounds(first, numpy_clients(_drifting, num_clients=3), initial, 2)
    write_checkpoint(tmp_path, 2, halfway[-1], first, [])  # the ServerApp's own writer: npz + JSON
    meta, state, extra = read_checkpoint(tmp_path)
    second = fresh()
    second.restore_state(json.loads(json.dumps(meta["strategy"])), extra)
    resumed, _ = run_rounds(Resumed(strategy=second, offset=2), numpy_clients(_drifting, num_clients=3), state, 2)
    assert np.array_equal(resumed[-1]["w"], straight[-1]["w"])
    assert not np.array_equal(straight[-1]["w"], halfway[-1]["w"])
    if optimizer != "momentum":  # without its moments the resumed run would differ
        third = fresh()
        lost, _ = run_rounds(Resumed(strategy=third, offset=2), numpy_clients(_drifting, num_clients=3), state, 2)
        assert not np.array_equal(lost[-1]["w"], straight[-1]["w"])


def test_client_level_dp_noise_enters_before_the_adam_step():
    # 4 clients send zeros: the clipped mean is exactly 0, so the optimizer must step on the noise alone,
    # std = sigma * C / m = 1 * 1 / 4, drawn from numpy_rng(seed, "dp-client-noise", round 1)
    initial = {"w": np.zeros(6, np.float32)}
    adam = {"rule": "adam", "lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    inner = _strategy(server_update=Adaptive(**adam))
    dp = ClientLevelDP(strategy=inner, noise_multiplier=1.0, clip_norm=1.0, num_clients=4, delta=1e-5, seed=7)
    states, _ = run_rounds(dp, numpy_clients(_constant([0.0] * 4, size=6), num_clients=4), initial, 1)
    noised_mean = add_noise({"w": np.zeros(6, np.float32)}, 0.25, numpy_rng(7, "dp-client-noise", 1))
    want, _, _ = agg.adaptive_step(initial, noised_mean, agg.zeros_like(initial), agg.zeros_like(initial, 1e-6), **adam)
    assert np.array_equal(states[1]["w"], want["w"])
    # noising the stepped state instead (right only for a linear step) releases something else
    stepped, _, _ = agg.adaptive_step(
        initial, {"w": np.zeros(6, np.float32)}, agg.zeros_like(initial), agg.zeros_like(initial, 1e-6), **adam
    )
    after = add_noise(stepped, 0.1 * 0.25, numpy_rng(7, "dp-client-noise", 1))
    assert not np.allclose(states[1]["w"], after["w"])


def test_the_median_and_the_trimmed_mean_ignore_a_far_outlier(task_identity):
    # 5 clients: 0, 1, 2, 3, 1e4. median 2; trimmed mean (beta 0.2: one from each end) mean(1, 2, 3) = 2
    for aggregator in (Median(), TrimmedMean(beta=0.2)):
        reports = RoundReports()
        strategy = PeftStrategy(weighting=UniformWeights(), aggregator=aggregator, report=reports)
        strategy.node_selector = lambda rnd, grid: [0, 1, 2, 3, 4]
        queries = list(strategy.configure_train(1, state_to_record({"w": np.zeros(2)}), ConfigRecord(), grid=None))
        values = [0.0, 1.0, 2.0, 3.0, 1e4]
        replies = [fake_reply(q, {"w": np.full(2, v, np.float32)}) for q, v in zip(queries, values, strict=True)]
        arrays, _ = strategy.aggregate_train(1, replies)
        np.testing.assert_array_equal(record_to_state(arrays)["w"], [2.0, 2.0])
        assert reports.last["aggregated"] == [0, 1, 2, 3, 4]


def test_multi_krum_keeps_the_lowest_scores_and_reports_which_clients_it_kept(task_identity):
    # values 0, 1, 2, 3, 1e4 with f = 1 (two nearest others): scores 5, 2, 2, 5, ~3e8; m = 3 keeps 1, 2 and
    # (tie 0 / 3 at 5) the lower index 0: the mean of 0, 1, 2 is 1
    reports = RoundReports()
    strategy = PeftStrategy(weighting=UniformWeights(), aggregator=Krum(f=1, m=3), report=reports)
    strategy.node_selector = lambda rnd, grid: [0, 1, 2, 3, 4]
    queries = list(strategy.configure_train(1, state_to_record({"w": np.zeros(2)}), ConfigRecord(), grid=None))
    values = [0.0, 1.0, 2.0, 3.0, 1e4]
    replies = [fake_reply(q, {"w": np.full(2, v, np.float32)}) for q, v in zip(queries, values, strict=True)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(record_to_state(arrays)["w"], [1.0, 1.0])
    assert reports.last["krum_selected"] == [0, 1, 2]
    assert metrics["max-coefficient"] == pytest.approx(1 / 3)


def test_a_krum_round_with_fewer_than_2f_plus_3_replies_is_refused_and_reported(task_identity):
    # Bernoulli participation can put only 3 clients online; Krum with f = 1 needs 5
    reports = RoundReports()
    strategy = PeftStrategy(weighting=UniformWeights(), aggregator=Krum(f=1, m=1), report=reports)
    strategy.node_selector = lambda rnd, grid: [0, 1, 2]
    queries = list(strategy.configure_train(4, state_to_record({"w": np.zeros(2)}), ConfigRecord(), grid=None))
    arrays, metrics = strategy.aggregate_train(4, [fake_reply(q, {"w": np.ones(2, np.float32)}) for q in queries])
    assert arrays is None and metrics is None  # Flower keeps the global adapter as it is
    assert "needs >= 2f + 3 = 5 replies, got 3" in reports[4]["refused"]
    assert reports[4]["aggregated"] == []


def test_client_level_dp_refuses_an_aggregator_without_a_sensitivity_bound():
    for aggregator in (Median(), TrimmedMean(beta=0.1), Krum(f=1, m=1)):
        with pytest.raises(ConfigError, match="has no bound"):
            ClientLevelDP(
                strategy=_strategy(aggregator=aggregator),
                noise_multiplier=1.0, clip_norm=1.0, num_clients=5, delta=1e-5, seed=0,
            )  # fmt: skip


def test_flexlora_refuses_a_server_optimizer_with_moments():
    with pytest.raises(ConfigError, match="re-factorises"):
        _strategy(aggregator=FlexSVD(ranks=[1, 2]), server_update=Momentum(lr=1.0, beta=0.9))
    _strategy(aggregator=FlexSVD(ranks=[1, 2]), server_update=Step(lr=0.5))  # the plain step is defined


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy.server-momentum": 1.0}, "'strategy.server-momentum' must be in \\[0, 1\\)"),
        ({"strategy.beta2": -0.1}, "'strategy.beta2' must be in \\[0, 1\\)"),
        ({"strategy.tau": 0.0}, "'strategy.tau' must be > 0"),
        ({"strategy.server-optimizer": "nadam"}, "valid choices: sgd, momentum, adam, yogi, adagrad"),
        ({"strategy.aggregator": "krum", "strategy.weighting": "uniform"}, "Krum needs n >= 2f \\+ 3"),
        (
            {"strategy.aggregator": "krum", "partition.num-partitions": 5, "strategy.krum-f": 1, "strategy.krum-m": 5},
            "'strategy.krum-m' must be <= n - f = 4",
        ),
        ({"strategy.aggregator": "trimmed-mean", "strategy.trim-fraction": 0.5}, "leave no client"),
        ({"strategy.aggregator": "median"}, "set strategy.weighting=uniform"),
        ({"strategy.name": "fedau", "strategy.aggregator": "median"}, "FedAU's omega / N weights"),
        (
            {"strategy.name": "flexlora", "clients.rank-profile": "2,4,8", "strategy.server-optimizer": "adam"},
            "moments over its factors mean nothing",
        ),
        (
            {"dp.mode": "client", "strategy.weighting": "uniform", "strategy.aggregator": "median"},
            "client-level DP calibrates its noise",
        ),
    ],
)
def test_undefined_or_out_of_range_strategy_settings_are_refused_before_anything_runs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_build_strategy_wires_the_configured_parts():
    ctx = StrategyContext(node_selector=lambda r, g: [], partition_of=lambda n: n, num_clients=5)
    cfg = tiny_config(
        **{"strategy.server-optimizer": "yogi", "strategy.beta1": 0.5, "strategy.tau": 0.01, "strategy.server-lr": 0.2}
    )
    update = build_strategy(cfg, ctx).server_update
    assert isinstance(update, Adaptive) and (update.name, update.lr, update.beta1, update.tau) == (
        "yogi",
        0.2,
        0.5,
        0.01,
    )
    krum = tiny_config(
        **{
            "partition.num-partitions": 6,
            "strategy.aggregator": "krum",
            "strategy.krum-m": 2,
            "strategy.weighting": "uniform",
        }
    )
    part = build_strategy(krum, ctx).aggregator
    assert isinstance(part, Krum) and (part.f, part.m) == (1, 2)


@pytest.mark.slow
def test_fedadam_in_process_moves_exactly_fedavgs_bytes_and_learns_differently(tmp_path):
    from simulations.inprocess import run_in_process

    runs = {}
    for name, overrides in {
        "fedavg": {},
        "fedadam": {"strategy.server-optimizer": "adam", "strategy.server-lr": 0.01},
    }.items():
        runs[name] = json.loads(
            run_in_process(tiny_config(**{"num-rounds": 1, **overrides}), tmp_path / name).read_text()
        )
    fedavg, fedadam = runs["fedavg"], runs["fedadam"]
    assert fedadam["status"] == "completed"
    assert [r["message_bytes"] for r in fedadam["ledger"]] == [r["message_bytes"] for r in fedavg["ledger"]]
    assert [r["payload_bytes"] for r in fedadam["ledger"]] == [r["payload_bytes"] for r in fedavg["ledger"]]
    assert fedadam["rounds"][0]["loss"] == fedavg["rounds"][0]["loss"]  # round 0: the same initial adapter
    assert fedadam["rounds"][-1]["loss"] != fedavg["rounds"][-1]["loss"]


def test_fedpeft_check_warns_about_planned_rounds_krum_would_refuse():
    from fedpeft.check_plan import krum_round_warnings

    cfg = tiny_config(
        **{"partition.num-partitions": 6, "participation.model": "bernoulli", "participation.p-mean": 0.5,
           "strategy.aggregator": "krum", "strategy.weighting": "uniform"}
    )  # fmt: skip
    online = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=bool)  # 5 then 4 online; f = 1 needs 5
    (warning,) = krum_round_warnings(cfg, online)
    assert "1 of 2 planned rounds have fewer online" in warning
    assert krum_round_warnings(cfg, online[:1]) == []
