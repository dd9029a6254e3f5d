"""Fault injection: >= 100 injected client faults, every one recorded in its round, no corrupted global state."""

import math

import numpy as np
import pytest

from fedpeft.config import ConfigError
from fedpeft.results import load_results
from simulations.faults import planned_fault
from simulations.inprocess import run_in_process
from simulations.resume import read_checkpoint
from tests.helpers import faulty_config

FAILED = {"crash", "hang"}
REJECTED = {"nan", "inf", "shape", "metrics"}


def test_planned_faults_are_seeded_and_follow_the_rate_and_kinds():
    cfg = faulty_config()
    plan = [planned_fault(cfg, r, p) for r in range(1, 201) for p in range(8)]
    assert plan == [planned_fault(cfg, r, p) for r in range(1, 201) for p in range(8)]
    share = sum(k is not None for k in plan) / len(plan)
    assert 0.45 < share < 0.55
    assert {k for k in plan if k} == FAILED | REJECTED | {"slow"}
    assert all(planned_fault(faulty_config(**{"faults.rate": 0.0}), r, 0) is None for r in range(1, 50))


def test_fault_settings_are_checked():
    with pytest.raises(ConfigError, match="faults.kinds"):
        faulty_config(**{"faults.kinds": "crash,explode"})
    with pytest.raises(ConfigError, match="faults.rate"):
        faulty_config(**{"faults.rate": 1.5})


@pytest.mark.slow
def test_over_a_hundred_injected_faults_are_each_recorded_and_never_corrupt_the_global_state(tmp_path):
    cfg = faulty_config()
    results = load_results(run_in_process(cfg, tmp_path / "faults"))
    assert results["status"] == "completed"
    injected = 0
    for row in results["rounds"][1:]:
        failed = {f["partition_id"]: f["reason"] for f in row["failed"]}
        rejected = {f["partition_id"]: f["reason"] for f in row["rejected"]}
        slow = {c["partition_id"] for c in row.get("clients", []) if c.get("injected-fault") == 7}
        for pid in row["participants"]:
            kind = planned_fault(cfg, row["round"], pid)
            injected += kind is not None
            if kind in FAILED:
                assert pid in failed, (row["round"], pid, kind)
                expected = "injected fault: crash" if kind == "crash" else "no reply within"
                assert expected in failed[pid]
            elif kind in REJECTED:
                assert pid in rejected, (row["round"], pid, kind)
            elif kind == "slow":
                assert pid in slow and pid in row["aggregated"]
            else:
                assert pid in row["aggregated"], (row["round"], pid)
        assert math.isfinite(row["loss"]) and math.isfinite(row["accuracy"])
    assert injected >= 100
    _, state, _ = read_checkpoint(tmp_path / "faults")
    assert all(np.isfinite(v).all() for v in state.values())
