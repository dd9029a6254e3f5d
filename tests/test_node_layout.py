"""How many Flower nodes a run registers on Flower's engine (simulations/node_layout.py); pure, no Ray."""

import pytest

from fedpeft.config import ConfigError
from simulations.inprocess import num_nodes
from simulations.node_layout import engine_config, flower_nodes
from tests.helpers import tiny_config


def test_ten_thousand_clients_run_on_one_hundred_nodes_of_one_hundred_trained_one_after_another():
    cfg = tiny_config(**{"partition.num-partitions": 10_000, "data.num-train-examples": 10_000})
    grouped = engine_config(cfg)
    assert (grouped.simulation.cohort_size, grouped.simulation.cohort_batched) == (100, False)
    assert num_nodes(grouped) == 100 and flower_nodes(grouped) == {"nodes": 100, "clients_per_node": 100}
    # everything but the layout is the config as given
    differ = {k for k, v in grouped.to_flat().items() if cfg.to_flat()[k] != v}
    assert differ == {"simulation.cohort-size", "simulation.cohort-batched"}


def test_a_population_that_does_not_divide_evenly_gets_the_smallest_cohort_that_fits_the_cap():
    cfg = tiny_config(**{"partition.num-partitions": 250, "data.num-train-examples": 2_000})
    grouped = engine_config(cfg)  # ceil(250 / 100) = 3 clients a node: 84 nodes, the last one holds 1
    assert grouped.simulation.cohort_size == 3 and num_nodes(grouped) == 84


def test_up_to_the_cap_with_no_cap_or_with_cohorts_chosen_the_config_is_returned_unchanged():
    at_cap = tiny_config(**{"partition.num-partitions": 100, "data.num-train-examples": 800})
    assert engine_config(at_cap) is at_cap and num_nodes(at_cap) == 100
    no_cap = tiny_config(
        **{"partition.num-partitions": 300, "data.num-train-examples": 2_400, "simulation.max-nodes": 0}
    )
    assert engine_config(no_cap) is no_cap and num_nodes(no_cap) == 300
    chosen = tiny_config(
        **{"partition.num-partitions": 300, "data.num-train-examples": 2_400, "simulation.cohort-size": 150}
    )
    assert engine_config(chosen) is chosen and num_nodes(chosen) == 2


def test_fault_injection_is_grouped_too_since_faults_work_inside_cohorts():
    # The cohort mod (simulations/cohort_worker.py) calls each client's handler, fault mod included.
    cfg = tiny_config(**{"partition.num-partitions": 8, "simulation.max-nodes": 4, "faults.rate": 0.2})
    grouped = engine_config(cfg)
    assert grouped.simulation.cohort_size == 2 and not grouped.simulation.cohort_batched
    assert grouped.faults.rate == 0.2


def test_a_negative_cap_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="simulation.max-nodes.*>= 0"):
        tiny_config(**{"simulation.max-nodes": -1})
