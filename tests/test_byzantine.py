"""Byzantine clients: a seeded set of partitions sends scaled, sign-flipped or noise deltas (simulations/faults.py)."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedpeft.config import FAULT_KINDS, ConfigError
from fedpeft.results import load_results
from fedpeft.rng import numpy_rng
from simulations.faults import byzantine_delta, byzantine_partitions, planned_fault
from simulations.inprocess import run_in_process
from simulations.resume import read_checkpoint
from tests.helpers import tiny_config


def _record() -> ArrayRecord:
    return ArrayRecord({"a": Array(np.array([1.0, -2.0], np.float32)), "b": Array(np.array([[3.0]], np.float32))})


def _arrays(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


def test_byzantine_partitions_are_a_seeded_fixed_share_of_the_clients():
    cfg = tiny_config(**{"partition.num-partitions": 10, "faults.byzantine-fraction": 0.3})
    chosen = byzantine_partitions(cfg)
    assert len(chosen) == 3 and chosen == byzantine_partitions(cfg)
    assert all(0 <= p < 10 for p in chosen)
    for round_ in (1, 2, 7):  # the same partitions attack every round, with the configured kind
        assert {p for p in range(10) if planned_fault(cfg, round_, p) == "sign-flip"} == set(chosen)
    assert byzantine_partitions(tiny_config(**{"partition.num-partitions": 10})) == frozenset()


def test_scaled_and_sign_flipped_deltas_by_hand():
    rng = np.random.default_rng(0)
    scaled = _arrays(byzantine_delta(_record(), "scaled", 2.5, rng))
    flipped = _arrays(byzantine_delta(_record(), "sign-flip", 2.0, rng))
    np.testing.assert_array_equal(scaled["a"], [2.5, -5.0])
    np.testing.assert_array_equal(scaled["b"], [[7.5]])
    np.testing.assert_array_equal(flipped["a"], [-2.0, 4.0])
    np.testing.assert_array_equal(flipped["b"], [[-6.0]])


def test_noise_deltas_are_seeded_and_scaled_to_the_honest_rms():
    honest = ArrayRecord({"w": Array(np.full(20000, 0.5, np.float32))})  # RMS 0.5
    first = _arrays(byzantine_delta(honest, "noise", 3.0, numpy_rng(0, "byzantine-noise", 1, 2)))["w"]
    again = _arrays(byzantine_delta(honest, "noise", 3.0, numpy_rng(0, "byzantine-noise", 1, 2)))["w"]
    np.testing.assert_array_equal(first, again)
    assert abs(float(first.std()) - 1.5) < 0.03 and abs(float(first.mean())) < 0.03


def test_byzantine_settings_are_checked():
    with pytest.raises(ConfigError, match="faults.byzantine-fraction"):
        tiny_config(**{"faults.byzantine-fraction": 1.0})
    with pytest.raises(ConfigError, match="faults.byzantine-kind"):
        tiny_config(**{"faults.byzantine-kind": "flip"})
    with pytest.raises(ConfigError, match="faults.byzantine-scale"):
        tiny_config(**{"faults.byzantine-scale": 0.0})
    # allowed inside cohorts: the cohort mod calls each client's handler, fault mod included
    assert (
        tiny_config(**{"faults.byzantine-fraction": 0.3, "simulation.cohort-size": 2}).faults.byzantine_fraction == 0.3
    )


def _one_round(tmp_path, name, **overrides):
    cfg = tiny_config(
        **{
            "name": name,
            "num-rounds": 1,
            "peft.method": "head",
            "strategy.weighting": "uniform",
            "data.num-test-examples": 16,
            "data.max-seq-len": 16,
            **overrides,
        }
    )
    run_dir = tmp_path / name
    results = load_results(run_in_process(cfg, run_dir))
    return cfg, results, read_checkpoint(run_dir)[1]


def test_a_sign_flipping_client_is_recorded_and_moves_the_global_state_by_its_flipped_share(tmp_path):
    # Round 1 starts every client from the same state, so honest deltas d_i are the same in every run.
    # Uniform weights over 3 clients: flip (scale 1) sends -d_b, scaled (scale 3) sends 3 d_b; then
    # flip - honest = -2 d_b / 3 = -(scaled - honest): flip + scaled = 2 honest, to fp32 rounding.
    _, _, honest = _one_round(tmp_path, "honest")
    byz = {"faults.byzantine-fraction": 0.34}  # round(0.34 x 3) = 1 attacker
    cfg, results, flip = _one_round(tmp_path, "flip", **byz)
    _, _, scaled = _one_round(
        tmp_path, "scaled", **byz, **{"faults.byzantine-kind": "scaled", "faults.byzantine-scale": 3.0}
    )
    (attacker,) = byzantine_partitions(cfg)
    row = results["rounds"][1]
    assert sorted(row["aggregated"]) == [0, 1, 2] and not row["rejected"]
    codes = {c["partition_id"]: c.get("injected-fault") for c in row["clients"]}
    assert codes == {p: (FAULT_KINDS.index("sign-flip") + 1 if p == attacker else None) for p in range(3)}
    moved = False
    for key in honest:
        np.testing.assert_allclose(flip[key] + scaled[key], 2 * honest[key], atol=1e-6)
        moved |= not np.allclose(flip[key], honest[key])
    assert moved


def test_check_warns_when_byzantine_clients_meet_a_non_robust_aggregator():
    from fedpeft.check import byzantine_warnings

    attacked = {"partition.num-partitions": 10, "faults.byzantine-fraction": 0.2}
    (warning,) = byzantine_warnings(tiny_config(**attacked))
    assert "strategy.aggregator='mean'" in warning and "median" in warning
    robust = {"strategy.aggregator": "median", "strategy.weighting": "uniform"}
    assert byzantine_warnings(tiny_config(**attacked, **robust)) == []
    assert byzantine_warnings(tiny_config(**{"partition.num-partitions": 10})) == []
