"""DPZero for SPSA clients: clip each example's projected gradient, add Gaussian noise, then encode."""

import numpy as np
import pytest
import torch

from fedpeft import privacy, zo
from fedpeft.config import ConfigError
from strategies import StrategyContext, build_strategy
from tests.helpers import tiny_config


def test_one_huge_example_moves_the_released_scalar_by_at_most_clip_over_batch():
    rng = lambda: np.random.default_rng(0)  # noqa: E731 - same noise draw for both batches
    honest = np.array([0.2, -0.1, 0.3, 0.0])
    attacked = honest.copy()
    attacked[2] = 1e9
    clip, sigma = 0.5, 0.0
    moved = zo.privatize_scalar(attacked, clip, sigma, rng()) - zo.privatize_scalar(honest, clip, sigma, rng())
    assert moved == pytest.approx((0.5 - 0.3) / 4)  # hand-computed: 0.3 -> clipped 0.5, over B = 4
    assert abs(moved) <= clip / len(honest)


def test_the_noise_has_std_sigma_times_clip_over_batch():
    per_example = np.zeros(8)
    rng = np.random.default_rng(1)
    draws = np.array([zo.privatize_scalar(per_example, 2.0, 1.5, rng) for _ in range(40_000)])
    assert draws.std() == pytest.approx(1.5 * 2.0 / 8, rel=0.02)
    assert abs(draws.mean()) < 0.01


def test_dpzero_steps_are_seeded_and_differ_from_plain_spsa():
    target = torch.tensor([1.0, -2.0, 0.5])
    master = {"w": torch.zeros(3)}

    def run(dp_clip):
        m = {k: v.clone() for k, v in master.items()}
        params = {k: v.clone() for k, v in m.items()}
        per_example = lambda _b: ((params["w"] - target) ** 2).unsqueeze(0).repeat(4, 1).sum(1)  # noqa: E731
        mean_loss = lambda _b: ((params["w"] - target) ** 2).sum()  # noqa: E731
        return zo.run_local_steps(
            params, m, [None], per_example if dp_clip else mean_loss, run_seed=3, round_=1, partition_id=0,
            num_steps=6, eps=1e-3, lr=0.05, scale=4.0, codec="int8", dp_clip=dp_clip, dp_sigma=1.0,
        )  # fmt: skip

    a, b, plain = run(1.0), run(1.0), run(0.0)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, plain.codes)
    assert np.all(np.abs(a.g) <= 1.0 + 4 * 1.0 * 1.0 / 4 * 6)  # clipped mean plus a few noise stds


def test_reported_epsilon_is_opacus_for_the_spsa_step_history():
    from opacus.accountants import RDPAccountant

    history = [(1.2, 0.1, 5), (1.2, 0.1, 5)]
    acc = RDPAccountant()
    for _ in range(10):
        acc.step(noise_multiplier=1.2, sample_rate=0.1)
    assert privacy.epsilon_from_history(history, 1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5))


def _ctx(cfg):
    """The ServerApp's context for ``cfg`` (3 clients always online): initial adapter and privacy plan."""
    from fedpeft.privacy_plan import plan_privacy
    from fedpeft.task import partitions
    from fedpeft.tasks import load_task

    plan = None
    if cfg is not None:
        online = np.ones((cfg.num_rounds, cfg.partition.num_partitions), dtype=bool)
        plan = plan_privacy(cfg, [len(rows) for rows in partitions(cfg)], online)
    return StrategyContext(
        node_selector=lambda r, g: [],
        partition_of=lambda n: n,
        num_clients=3,
        initial_state=load_task(tiny_config()).initial_state,
        privacy_plan=plan,
    )


def test_spsa_accepts_sample_level_dp_and_rejects_client_level_dp():
    base = {"strategy.name": "spsa", "strategy.weighting": "uniform", "dp.noise-multiplier": 1.0}
    sample = tiny_config(**base, **{"dp.mode": "sample"})
    build_strategy(sample, _ctx(sample))
    with pytest.raises(ConfigError, match="use dp.mode='sample' with strategy.name='spsa'"):
        build_strategy(tiny_config(**base, **{"dp.mode": "client"}), _ctx(None))


def test_an_unreachable_dpzero_target_names_the_fix():
    cfg = tiny_config(
        **{"strategy.name": "spsa", "dp.mode": "sample", "dp.target-epsilon": 1e-4, "spsa.local-steps": 50}
    )
    with pytest.raises(ConfigError, match="raise dp.target-epsilon"):
        build_strategy(cfg, _ctx(cfg))


@pytest.mark.slow
def test_a_flower_run_of_spsa_with_dpzero_reports_epsilon_and_still_sends_k_bytes(tmp_path):
    from fedpeft.results import load_results
    from simulations.run import simulate

    cfg = tiny_config(
        **{"strategy.name": "spsa", "strategy.weighting": "uniform", "dp.mode": "sample", "dp.noise-multiplier": 1.0,
           "spsa.local-steps": 3, "spsa.batch-size": 8, "data.max-seq-len": 16}
    )  # fmt: skip
    results = load_results(simulate(cfg, tmp_path / "dpzero", plot=False))
    rows = results["rounds"][1:]
    assert all(r["uplink_payload_bytes"] == 3 * len(r["aggregated"]) for r in rows)
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"]  # spent grows with the steps
    assert rows[1]["epsilon_max"] == pytest.approx(rows[1]["epsilon"])
