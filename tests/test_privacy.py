"""Differential privacy: DP-SGD on the real PEFT model (Opacus) and client-level DP-FedAvg."""

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord
from opacus.accountants import RDPAccountant

from fedpeft import privacy
from fedpeft.adapters import compute_delta, get_adapter_state, set_adapter_state
from fedpeft.config import ConfigError
from fedpeft.privacy_plan import plan_privacy
from fedpeft.records import record_to_state, state_to_record
from fedpeft.tasks import load_task
from fedpeft.train import build_optimizer, train_local
from strategies import FedAUWeights, Mean, PeftStrategy, UniformWeights
from strategies.base import StrategyContext
from strategies.dp import ClientLevelDP, SampleLevelDPReport, clip_delta, wrap_privacy
from tests.helpers import tiny_config
from tests.replies import RoundReports, fake_reply

GLOBAL = {"lora_A": np.zeros((2, 3), np.float32), "head.bias": np.zeros(2, np.float32)}


def _flat_norm(state):
    return math.sqrt(sum(float(np.sum(np.square(v.astype(np.float64)))) for v in state.values()))


def _client_dp(sigma, clip, num_clients=10, seed=0, **parts):
    """ClientLevelDP around a PeftStrategy of ``parts`` (uniform FedAvg by default); both report into
    ``strategy.reports``."""
    reports = RoundReports()
    parts = {"weighting": UniformWeights(), **parts}
    inner = PeftStrategy(partition_of=lambda node: node, report=reports, **parts)
    strategy = ClientLevelDP(
        strategy=inner,
        noise_multiplier=sigma,
        clip_norm=clip,
        num_clients=num_clients,
        delta=1e-5,
        seed=seed,
        report=reports,
    )
    strategy.reports = reports
    return strategy


def _dp_round(strategy, server_round, deltas, state=GLOBAL):
    nodes = list(range(len(deltas)))
    strategy.strategy.node_selector = lambda rnd, grid: nodes
    queries = strategy.configure_train(server_round, state_to_record(state), ConfigRecord(), grid=None)
    arrays, _ = strategy.aggregate_train(server_round, [fake_reply(q, d) for q, d in zip(queries, deltas, strict=True)])
    return record_to_state(arrays)


# ---- client-level DP (pure, no model) ------------------------------------------------------


def test_clip_delta_scales_a_norm_five_delta_down_to_the_clipping_norm():
    delta = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([4.0], np.float32)}  # norm 5
    clipped, norm = clip_delta(delta, 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [0.8], rtol=1e-6)
    same, _ = clip_delta(delta, 10.0)
    assert same is delta


def test_a_malicious_huge_delta_moves_the_global_by_at_most_clip_over_m(task_identity):
    # 4 clients, C = 0.5, no noise: three send zeros, one sends a delta of norm ~1e6.
    # The uniform mean of clipped deltas moves the global by exactly C / m = 0.125.
    strategy = _client_dp(sigma=0.0, clip=0.5)
    evil = {"lora_A": np.full((2, 3), 4e5, np.float32), "head.bias": np.full(2, 4e5, np.float32)}
    zero = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
    new = _dp_round(strategy, 1, [evil, zero, zero, zero])
    moved = _flat_norm(compute_delta(new, GLOBAL))
    assert moved == pytest.approx(0.5 / 4, rel=1e-5)
    assert strategy.reports.last["dp_clipped"] == 1


def test_noise_on_the_aggregate_has_std_sigma_times_clip_over_m(task_identity):
    # sigma = 1.5, C = 2, m = 4 -> std 0.75; 5 rounds x 20,000 entries of pure noise.
    strategy = _client_dp(sigma=1.5, clip=2.0)
    big = {"w": np.zeros(20_000, np.float32)}
    samples = [_dp_round(strategy, t, [big] * 4, state=big)["w"] for t in range(1, 6)]
    noise = np.concatenate(samples)
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(0.75, rel=0.01)
    assert strategy.reports.last["dp_noise_std"] == pytest.approx(0.75)
    assert not np.array_equal(samples[0], samples[1])  # fresh noise every round
    again = _client_dp(sigma=1.5, clip=2.0)
    np.testing.assert_array_equal(_dp_round(again, 1, [big] * 4, state=big)["w"], samples[0])  # seeded


def test_client_level_epsilon_equals_opacus_rdp_accountant_with_rate_m_over_n(task_identity):
    strategy = _client_dp(sigma=1.1, clip=1.0, num_clients=10)
    zero = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
    for t in (1, 2, 3):
        _dp_round(strategy, t, [zero] * 4)
    independent = RDPAccountant()
    independent.history = [(1.1, 0.4, 3)]
    assert strategy.reports.last["epsilon"] == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
    assert strategy.reports.last["dp_sample_rate"] == 0.4


def test_fedau_noise_is_calibrated_to_omega_max_over_n_and_omega_is_capped(task_identity):
    strategy = _client_dp(
        sigma=1.0, clip=1.0, weighting=FedAUWeights(k_cap=100000), aggregator=Mean(num_clients=10), max_weight=3.0
    )
    zero = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
    _dp_round(strategy, 1, [zero] * 2)  # first intervals: omega = 1 for both -> std 1 * 1 * 1 / 10
    assert strategy.reports.last["dp_noise_std"] == pytest.approx(0.1)
    strategy.strategy.node_selector = lambda rnd, grid: [0]
    for t in (9, 10):  # round 9 closes client 0's interval of 8; round 10 uses omega = mean(1, 8) = 4.5
        queries = strategy.configure_train(t, state_to_record(GLOBAL), ConfigRecord(), grid=None)
        strategy.aggregate_train(t, [fake_reply(queries[0], zero)])
    assert strategy.reports.last["omega"] == {"0": 3.0}  # capped by max_weight
    assert strategy.reports.last["dp_noise_std"] == pytest.approx(0.3)  # sigma * C * 3 / N


def test_client_dp_needs_uniform_weighting_and_an_impossible_target_fails_clearly():
    with pytest.raises(ConfigError, match="strategy.weighting=uniform"):
        tiny_config(**{"dp.mode": "client"})
    cfg = tiny_config(**{"dp.mode": "client", "strategy.weighting": "uniform", "dp.target-epsilon": 0.01})
    with pytest.raises(ConfigError, match="raise dp.target-epsilon or dp.delta, take fewer steps"):
        plan_privacy(cfg, [32, 32, 32], np.ones((cfg.num_rounds, 3), dtype=bool))


def test_an_impossible_sample_level_target_fails_when_the_plan_is_made_at_server_start_up():
    cfg = tiny_config(**{"dp.mode": "sample", "dp.target-epsilon": 0.02})
    with pytest.raises(ConfigError, match="dp.target-epsilon=0.02 at dp.delta=1e-05 cannot be reached"):
        plan_privacy(cfg, [32, 30, 34], np.ones((cfg.num_rounds, 3), dtype=bool))


def test_the_wrapper_takes_sigma_from_the_privacy_plan_and_refuses_to_run_without_one():
    cfg = tiny_config(**{"dp.mode": "client", "strategy.weighting": "uniform", "dp.target-epsilon": 4.0})
    online = np.zeros((cfg.num_rounds, 3), dtype=bool)
    online[:, :2] = True  # 2 of 3 clients online: planned rate 2/3
    plan = plan_privacy(cfg, [32, 32, 32], online)
    assert plan.client_rate == pytest.approx(2 / 3)
    expected = privacy.plan_noise_multiplier(target_epsilon=4.0, delta=1e-5, sample_rate=2 / 3, steps=cfg.num_rounds)
    ctx = StrategyContext(node_selector=None, partition_of=lambda n: n, num_clients=3, privacy_plan=plan)
    wrapped = wrap_privacy(PeftStrategy(weighting=UniformWeights()), cfg, ctx)
    assert wrapped.noise_multiplier == plan.client_sigma == expected
    assert "client-level, sigma" in plan.text()
    with pytest.raises(ValueError, match="needs the run's privacy plan"):
        wrap_privacy(PeftStrategy(weighting=UniformWeights()), cfg, StrategyContext(None, lambda n: n, 3))


def test_sample_level_clients_use_the_plans_own_sigma_for_their_partition_size():
    cfg = tiny_config(**{"dp.mode": "sample", "dp.target-epsilon": 6.0})
    plan = plan_privacy(cfg, [32, 30, 34], np.ones((cfg.num_rounds, 3), dtype=bool))
    assert plan.sample_sigmas == {n: privacy.sample_noise_multiplier(cfg, n) for n in (30, 32, 34)}
    assert len(set(plan.sample_sigmas.values())) > 1  # unequal sizes: unequal batches per round


def test_a_reachable_target_gives_a_sigma_that_spends_at_most_the_target():
    sigma = privacy.plan_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=0.25, steps=40)
    spent = privacy.epsilon_from_history([(sigma, 0.25, 40)], 1e-5)
    assert 2.95 < spent <= 3.0


def test_sample_level_report_gives_max_mean_and_worst_epsilon_so_far(task_identity):
    reports = RoundReports()
    inner = PeftStrategy(partition_of=lambda node: node, report=reports)
    strategy = SampleLevelDPReport(strategy=inner, delta=1e-5, report=reports)
    strategy.strategy.node_selector = lambda rnd, grid: [0, 1]
    zero = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
    q = strategy.configure_train(1, state_to_record(GLOBAL), ConfigRecord(), grid=None)
    strategy.aggregate_train(
        1,
        [fake_reply(q[0], zero, n=5, metrics={"epsilon": 2.0}), fake_reply(q[1], zero, n=5, metrics={"epsilon": 4.0})],
    )
    got = {k: reports.last[k] for k in ("delta", "epsilon_max", "epsilon_mean", "epsilon")}
    assert got == {"delta": 1e-5, "epsilon_max": 4.0, "epsilon_mean": 3.0, "epsilon": 4.0}
    strategy.strategy.node_selector = lambda rnd, grid: [0]
    q = strategy.configure_train(2, state_to_record(GLOBAL), ConfigRecord(), grid=None)
    strategy.aggregate_train(2, [fake_reply(q[0], zero, n=5, metrics={"epsilon": 3.0})])
    extra = reports.last
    assert (extra["epsilon_max"], extra["epsilon_mean"], extra["epsilon"]) == (3.0, 3.0, 4.0)


def test_accountant_history_survives_a_config_record_round_trip():
    history = [(1.2, 0.25, 8), (0.9, 0.5, 4)]
    record = ConfigRecord(privacy.history_to_lists(history))
    assert privacy.history_from_lists(record) == history
    assert privacy.history_from_lists(None) == []


# ---- DP-SGD on the real NF4 + LoRA model --------------------------------------------------


def _guard_task():
    # one client with 32 snippets, batches of 16: fixed full batches, so Opacus' division by
    # the expected batch size equals the plain mean; SGD so the update is the gradient itself
    cfg = tiny_config(
        **{
            "partition.num-partitions": 1,
            "data.num-train-examples": 32,
            "train.optimizer": "sgd",
            "train.lr": 0.5,
            "train.local-steps": 2,
        }
    )
    return cfg, load_task(cfg)


def _update(task, cfg, *, sigma=None, clip=1e6):
    set_adapter_state(task.model, task.initial_state)
    loader = task.train_loader(task.partition(0), 1, 0)
    if sigma is None:
        train_local(task.model, loader, cfg.train, dropout_seed=0)
    else:
        opt = build_optimizer(task.model, cfg.train)
        with privacy.dp_sgd(
            task.model,
            opt,
            loader,
            noise_multiplier=sigma,
            clip_norm=clip,
            noise_seed=1,
            sampling_seed=2,
            poisson=False,
        ) as session:
            train_local(task.model, session.loader, cfg.train, dropout_seed=0, optimizer=session.optimizer)
    delta = compute_delta(get_adapter_state(task.model), task.initial_state)
    set_adapter_state(task.model, task.initial_state)
    return np.concatenate([v.ravel() for v in delta.values()])


def test_dp_sgd_with_zero_noise_and_huge_clip_matches_plain_training_opacus_820_guard():
    cfg, task = _guard_task()
    plain = _update(task, cfg)
    private = _update(task, cfg, sigma=0.0)
    noisy = _update(task, cfg, sigma=1.0, clip=1.0)
    scale = np.linalg.norm(plain)
    assert scale > 1e-3
    assert np.linalg.norm(private - plain) < 1e-4 * scale  # measured ~1e-7 relative
    assert np.linalg.norm(noisy - plain) > 0.1 * scale


def test_dp_sgd_leaves_the_cached_model_as_it_found_it():
    cfg, task = _guard_task()
    before = _update(task, cfg)
    _update(task, cfg, sigma=1.0, clip=1.0)
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_forward_counter") for p in task.model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in task.model.modules())
    np.testing.assert_array_equal(_update(task, cfg), before)  # plain training is unchanged afterwards


def test_client_epsilon_over_two_rounds_equals_opacus_accountant_from_sigma_rate_and_steps(fresh_task):
    cfg = tiny_config(**{"dp.mode": "sample", "dp.noise-multiplier": 1.3, "train.local-steps": 2})
    task = fresh_task(cfg)
    n = len(task.partition(1))
    _, first = task.local_update(task.initial_state, 1, 1, dp_history=[])
    _, second = task.local_update(task.initial_state, 1, 2, dp_history=first.privacy["history"])
    rate = 1.0 / math.ceil(n / cfg.train.batch_size)
    independent = RDPAccountant()
    independent.history = [(1.3, rate, 4)]
    assert second.privacy["sample-rate"] == pytest.approx(rate)
    assert second.privacy["epsilon"] == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
    assert first.privacy["epsilon"] < second.privacy["epsilon"]


@pytest.mark.slow
def test_a_simulation_with_dp_sgd_reports_epsilon_every_round(tmp_path):
    from fedpeft.results import load_results
    from simulations.run import simulate

    cfg = tiny_config(**{"dp.mode": "sample", "dp.target-epsilon": 4.0})
    results = load_results(simulate(cfg, tmp_path / "dp", plot=False))
    rows = results["rounds"][1:]
    assert [r["round"] for r in rows] == [1, 2]
    eps = [r["epsilon"] for r in rows]
    assert 0 < eps[0] < eps[1] <= 4.0
    assert all(r["epsilon_max"] >= r["epsilon_mean"] > 0 and r["delta"] == 1e-5 for r in rows)
    assert all(c["dp-noise-multiplier"] > 0 for r in rows for c in r["clients"])  # per client, not averaged
