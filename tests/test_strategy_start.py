"""Every strategy and wrapper under Flower's own round loop, ``Strategy.start``.

The grid is :class:`simulations.grids.InMemoryGrid` (the ClientApp's handlers called in this
process); the clients are real Flower ``ClientApp`` objects that send fixed numpy deltas, so
the server-side math can be checked by hand.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Context
from flwr.serverapp.strategy import Strategy
from opacus.accountants import RDPAccountant

from simulations.grids import InMemoryGrid
from strategies import FedAUWeights, Mean, PeftStrategy, UniformWeights
from strategies.dp import ClientLevelDP, SampleLevelDPReport
from tests.replies import RoundReports, numpy_clients
from tests.replies import run_rounds as run


def node_to_partition(node: int) -> int:
    return node - 1000


def fedau(num_clients: int, **kwargs) -> PeftStrategy:
    """FedAU as parts: its weights and the over-N mean."""
    return PeftStrategy(
        weighting=FedAUWeights(k_cap=100000),
        aggregator=Mean(num_clients=num_clients),
        partition_of=node_to_partition,
        **kwargs,
    )


def test_the_client_dp_wrapper_clips_a_malicious_delta_under_strategy_start():
    # 4 clients, C = 0.5, no noise: three send zeros, partition 0 sends a delta of norm ~1e6 every
    # round. Under Flower's own loop the uniform mean of clipped deltas moves the global by C / m.
    initial = {"w": np.zeros(6, np.float32)}
    evil = lambda pid, state: {"w": np.full(6, 4e5 if pid == 0 else 0.0, np.float32)}  # noqa: E731
    inner = PeftStrategy(weighting=UniformWeights(), partition_of=node_to_partition)
    dp = ClientLevelDP(strategy=inner, noise_multiplier=0.0, clip_norm=0.5, num_clients=4, delta=1e-5, seed=0)
    states, _ = run(dp, numpy_clients(evil, num_clients=4), initial, num_rounds=2)
    for before, after in zip(states, states[1:], strict=False):
        assert math.dist(before["w"], after["w"]) == pytest.approx(0.5 / 4, rel=1e-5)


def test_the_client_dp_wrapper_adds_noise_of_the_right_std_and_reports_epsilon_under_strategy_start():
    # sigma = 1.5, C = 2, m = 4 -> std 0.75 per entry per round; every client sends zeros.
    initial = {"w": np.zeros(20_000, np.float32)}
    zeros = lambda pid, state: {"w": np.zeros(20_000, np.float32)}  # noqa: E731
    reports = RoundReports()
    inner = PeftStrategy(weighting=UniformWeights(), partition_of=node_to_partition, report=reports)
    dp = ClientLevelDP(
        strategy=inner, noise_multiplier=1.5, clip_norm=2.0, num_clients=8, delta=1e-5, seed=0, report=reports
    )
    states, result = run(dp, numpy_clients(zeros, num_clients=4), initial, num_rounds=3)
    noise = np.concatenate([after["w"] - before["w"] for before, after in zip(states, states[1:], strict=False)])
    assert noise.std() == pytest.approx(0.75, rel=0.02) and abs(noise.mean()) < 0.01
    accountant = RDPAccountant()
    accountant.history = [(1.5, 0.5, 3)]  # q = m / N = 4 / 8 in each of 3 rounds
    assert result.train_metrics_clientapp[3]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert reports[3]["epsilon"] == result.train_metrics_clientapp[3]["epsilon"]
    assert reports[3]["dp_noise_std"] == pytest.approx(0.75) and reports[3]["aggregated"] == [0, 1, 2, 3]


def test_wrappers_are_strategies_that_delegate_explicitly_and_leave_the_inner_strategy_alone():
    inner = fedau(4)
    dp = ClientLevelDP(strategy=inner, noise_multiplier=1.0, clip_norm=1.0, num_clients=4, delta=1e-5, seed=0)
    report = SampleLevelDPReport(strategy=PeftStrategy(), delta=1e-5)
    for wrapper in (dp, report):
        assert isinstance(wrapper, Strategy)
        assert not hasattr(type(wrapper), "__getattr__")
        assert type(wrapper).start is Strategy.start  # Flower's loop, calling the wrapper's hooks
    assert "aggregate_round" not in vars(inner) and "aggregate_train" not in vars(inner)  # no method patched


def test_fedau_under_strategy_start_applies_omega_over_n_as_worked_by_hand():
    # N = 3, all online in rounds 1 and 2: omega = 1 (no closed interval yet), then 1 again.
    # Partition p sends (p + 1) * ones: update = (1 + 2 + 3) / 3 = 2 per round.
    initial = {"w": np.zeros(2, np.float32)}
    ramp = lambda pid, state: {"w": np.full(2, pid + 1.0, np.float32)}  # noqa: E731
    reports = RoundReports()
    states, _ = run(fedau(3, report=reports), numpy_clients(ramp, num_clients=3), initial, num_rounds=2)
    np.testing.assert_allclose([s["w"][0] for s in states], [0.0, 2.0, 4.0])
    assert reports[2]["omega"] == {"0": 1.0, "1": 1.0, "2": 1.0}


def test_sample_level_dp_report_under_strategy_start_reports_the_worst_client_epsilon():
    initial = {"w": np.zeros(2, np.float32)}
    zeros = lambda pid, state: {"w": np.zeros(2, np.float32)}  # noqa: E731
    reports = RoundReports()
    wrapper = SampleLevelDPReport(
        strategy=PeftStrategy(partition_of=node_to_partition, report=reports), delta=1e-5, report=reports
    )
    _, result = run(wrapper, numpy_clients(zeros, num_clients=3, epsilon=0.5), initial, num_rounds=1)
    assert reports[1]["epsilon"] == 1.5 and reports[1]["epsilon_mean"] == pytest.approx(1.0)
    assert result.train_metrics_clientapp[1]["epsilon"] == 1.5


def test_importing_the_strategies_does_not_import_torch():
    code = (
        "import sys, strategies, strategies.peft_strategy, strategies.fedau, strategies.spsa, strategies.dp, "
        "strategies.build, strategies.aggregate; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_readmes_own_serverapp_example_runs_with_fedpeft_clients(capsys):
    from pathlib import Path

    from flwr.app import RecordDict as Records

    from simulations.client_app import build_client_app
    from tests.helpers import tiny_config

    readme = Path(__file__).resolve().parent.parent / "README.md"
    code = readme.read_text().split("<!-- own-serverapp -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 25
    namespace: dict = {}
    exec(compile(code, str(readme), "exec"), namespace)
    cfg = tiny_config(**{"num-rounds": 1, "strategy.weighting": "uniform"})
    configs = [{"partition-id": p, "num-partitions": 3} for p in range(3)]
    grid = InMemoryGrid(build_client_app(), run_config=cfg.to_flat(), node_configs=configs)
    context = Context(run_id=1, node_id=0, node_config={}, state=Records(), run_config=cfg.to_flat())
    namespace["main"](grid, context)
    epsilon = float(capsys.readouterr().out.split("epsilon", 1)[1].split()[0])
    accountant = RDPAccountant()
    accountant.history = [(1.0, 1.0, 1)]
    assert epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
