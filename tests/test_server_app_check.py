"""The ServerApp's own process: a config check before the first message under ``flwr run .``, and its threads."""

import pytest

from fedpeft.config import ConfigError
from simulations.server_app import start_experiment


class UntouchableGrid:
    """Fails the test if the ServerApp sends or asks anything before its config is checked."""

    def __getattr__(self, name):
        raise AssertionError(f"the grid was used ({name}) before the config was checked")


def test_flwr_run_refuses_a_module_typo_before_the_grid_is_touched(tmp_path):
    run_config = {"num-rounds": 1, "peft.target-modules": "qeury"}  # a typo for "query"
    with pytest.raises(ConfigError, match="'qeury'.*match no module.*fix the spelling"):
        start_experiment(UntouchableGrid(), run_config, {}, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_launcher_s_already_checked_config_is_not_checked_twice(tmp_path):
    # fedpeft simulate checked it already (checked=True): the run starts at once and reaches the grid
    with pytest.raises(AssertionError, match="the grid was used"):
        start_experiment(UntouchableGrid(), {"num-rounds": 1}, {}, tmp_path / "run", checked=True)


def test_a_server_in_its_own_process_evaluates_with_every_core_unless_told_otherwise():
    import os

    from fedpeft.config import ExperimentConfig
    from simulations.server_app import server_threads

    cores = len(os.sched_getaffinity(0))
    default = ExperimentConfig.from_flat({"simulation.torch-threads": 1})
    assert server_threads(default, own_process=True) == cores  # Flower's engine: the clients wait while it evaluates
    assert server_threads(default, own_process=False) == 1  # in-process: the clients share its torch-threads
    pinned = ExperimentConfig.from_flat({"simulation.server-threads": 3})
    assert server_threads(pinned, own_process=True) == server_threads(pinned, own_process=False) == 3
    with pytest.raises(ConfigError, match="simulation.server-threads"):
        ExperimentConfig.from_flat({"simulation.server-threads": -1})
