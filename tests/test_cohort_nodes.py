"""Cohort nodes: one Flower node trains several simulated clients; nothing else may notice."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.choices import FAULT_KINDS
from fedpeft.results import load_results
from simulations.cohort import cohort_partitions, num_workers, pack, unpack
from simulations.inprocess import run_in_process
from tests.helpers import faulty_config, tiny_config
from tests.same_numbers import drop_timings


def test_workers_own_contiguous_blocks_that_cover_every_partition_once():
    blocks = [cohort_partitions(w, 10, 4) for w in range(num_workers(10, 4))]
    assert blocks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="worker 3 outside 0..2"):
        cohort_partitions(3, 10, 4)


def test_packing_round_trips_every_clients_records_and_stores_a_shared_array_record_once():
    shared = ArrayRecord({"w": Array(np.arange(4.0, dtype=np.float32))})
    own = ArrayRecord({"w": Array(np.ones(4, dtype=np.float32))})
    contents = {
        3: RecordDict({"arrays": shared, "config": ConfigRecord({"server-round": 2, "mode": "first-order"})}),
        5: RecordDict({"arrays": shared, "config": ConfigRecord({"server-round": 2, "mode": "first-order"})}),
        7: RecordDict({"arrays": own, "metrics": MetricRecord({"num-examples": 8})}),
    }
    packed = pack(contents)
    assert len(packed.array_records) == 2  # the shared global adapter travels once
    back = unpack(packed)
    assert list(back) == [3, 5, 7]
    for pid, content in contents.items():
        assert set(back[pid]) == set(content)
        for name, record in content.items():
            if isinstance(record, ArrayRecord):
                np.testing.assert_array_equal(back[pid][name]["w"].numpy(), record["w"].numpy())
            else:
                assert dict(back[pid][name]) == dict(record)


@pytest.mark.slow
def test_a_cohort_run_has_the_round_metrics_and_the_ledger_of_the_one_client_per_node_run(tmp_path):
    cfg = tiny_config(**{"participation.model": "uniform", "participation.fraction": 0.67})
    single = load_results(run_in_process(cfg, tmp_path / "single"))
    # clients one after another inside the worker: bit-equal to one client per node (batched cohorts equal
    # it only in distribution while MiniLM's own dropout is on; tests/test_cohort.py checks them with it off)
    one_by_one = {"simulation.cohort-size": 2, "simulation.cohort-batched": False}
    cohort = load_results(run_in_process(cfg.replace(one_by_one), tmp_path / "cohort"))
    keep = ("accuracy", "loss", "participants", "aggregated", "failed")
    strip = lambda rs: [{k: r.get(k) for k in keep} for r in rs["rounds"]]  # noqa: E731
    assert strip(cohort) == strip(single)

    def untimed(rs: dict) -> list:  # every client metric but its CPU time
        return [
            [{k: v for k, v in c.items() if k != "train-cpu-s"} for c in r.get("clients", [])] for r in rs["rounds"]
        ]

    assert untimed(cohort) == untimed(single)
    # every client's own logical message, as if sent alone (replies may arrive in another order)
    order = lambda rows: sorted(rows, key=lambda r: (r["round"], r["direction"], r["partition_id"], r["kind"]))  # noqa: E731
    assert order(cohort["ledger"]) == order(single["ledger"])


@pytest.mark.slow
def test_a_batched_cohort_run_trains_every_client_and_meters_each_as_if_alone(tmp_path):
    cfg = tiny_config(**{"simulation.cohort-size": 3})  # one worker trains all three clients in one batch
    results = load_results(run_in_process(cfg, tmp_path / "batched"))
    single = load_results(run_in_process(tiny_config(), tmp_path / "single"))
    assert results["status"] == "completed"
    assert [r["aggregated"] for r in results["rounds"][1:]] == [[0, 1, 2], [0, 1, 2]]
    order = lambda rows: sorted(rows, key=lambda r: (r["round"], r["direction"], r["partition_id"], r["kind"]))  # noqa: E731
    assert order(results["ledger"]) == order(single["ledger"])
    # each client did its own number of steps on its own data, as alone
    steps = lambda rs: [[c["num-steps"] for c in r["clients"]] for r in rs["rounds"][1:]]  # noqa: E731
    assert steps(results) == steps(single)


@pytest.mark.slow
def test_faults_inside_a_cohort_are_recorded_exactly_as_on_one_client_nodes(tmp_path):
    # seed 2's plan (simulations/faults.py planned_fault), partition by partition:
    # round 1: 1 crash, 2 hang; round 2: 0 and 2 sign-flip; round 3: 1 sign-flip, 2 metrics; round 4: 1 slow, 4 metrics, 5 nan
    cfg = faulty_config(
        **{
            "seed": 2,
            "num-rounds": 4,
            "partition.num-partitions": 6,
            "faults.kinds": "crash,hang,nan,metrics,slow,sign-flip",
            "simulation.round-timeout-s": 3.0,
        }
    )
    alone = load_results(run_in_process(cfg, tmp_path / "alone"))
    # two workers of three clients: the cohort mod calls the fault mod once per client
    cohort = load_results(run_in_process(cfg.replace({"simulation.cohort-size": 3}), tmp_path / "cohort"))
    rows = lambda rs: [  # noqa: E731 (a failure list is sorted: a hang is listed after the replies outside a cohort)
        {**r, "failed": sorted(r.get("failed", []), key=lambda f: f["partition_id"])}
        for r in drop_timings(rs["rounds"])
    ]
    assert rows(cohort) == rows(alone)
    first = cohort["rounds"][1]
    assert first["failed"] == [
        {"partition_id": 1, "reason": "RuntimeError: injected fault: crash (round 1, partition 1)"},
        {"partition_id": 2, "reason": "no reply within simulation.round-timeout-s"},
    ]
    assert [f["partition_id"] for f in cohort["rounds"][4]["rejected"]] == [4, 5]
    sign_flip = FAULT_KINDS.index("sign-flip") + 1
    assert [c["partition_id"] for c in cohort["rounds"][2]["clients"] if c.get("injected-fault") == sign_flip] == [0, 2]
    order = lambda rows: sorted(rows, key=lambda r: (r["round"], r["direction"], r["partition_id"], r["kind"]))  # noqa: E731
    assert order(cohort["ledger"]) == order(alone["ledger"])
