"""Helpers shared by test modules (import from here, never from ``conftest``)."""

from __future__ import annotations

from fedpeft.config import ExperimentConfig


def tiny_config(**overrides) -> ExperimentConfig:
    """A small slice of the embedded default: 3 clients, 2 rounds, 96 train / 64 test snippets."""
    flat = {
        "name": "tiny",
        "num-rounds": 2,
        "data.num-train-examples": 96,
        "data.num-test-examples": 64,
        "partition.num-partitions": 3,
        "partition.min-partition-size": 8,
        "participation.model": "always",
        "train.local-steps": 2,
        "train.batch-size": 16,
        "simulation.node-wait-s": 60.0,
    }
    flat.update(overrides)
    return ExperimentConfig.from_flat(flat)


def faulty_config(**overrides) -> ExperimentConfig:
    """Many cheap clients (a linear head, one step of 4 x 16 tokens) of which half fail each round."""
    return tiny_config(
        **{
            "num-rounds": 28,
            "partition.num-partitions": 8,
            "partition.min-partition-size": 4,
            "partition.scheme": "iid",
            "peft.method": "head",
            "train.local-steps": 1,
            "train.batch-size": 4,
            "data.max-seq-len": 16,
            "data.num-test-examples": 32,
            "faults.rate": 0.5,
            "faults.slow-s": 0.05,
            "simulation.round-timeout-s": 2.0,
            **overrides,
        }
    )


class FreshTasks:
    """``load_task`` for tests that train the process's cached model: hands each task out at its
    initial adapter state in eval mode (as built) and, on :meth:`close`, puts every task it handed
    out back there.

    The model behind a task is cached per process (fedpeft/backbone.py), so a test that trains it
    and fails before resetting it would leak its trained adapter, or its train mode (dropout on:
    ``train_local`` raising mid-loop leaves it so), into the next test. The
    ``fresh_task`` fixture (tests/conftest.py) calls :meth:`close` in its teardown, which pytest
    runs whether the test passed or not.
    """

    def __init__(self) -> None:
        self._tasks: list = []

    def __call__(self, cfg: ExperimentConfig):
        from fedpeft.adapters import set_adapter_state
        from fedpeft.tasks import load_task

        task = load_task(cfg)
        set_adapter_state(task.model, task.initial_state)
        task.model.eval()
        self._tasks.append(task)
        return task

    def close(self) -> None:
        from fedpeft.adapters import set_adapter_state

        for task in self._tasks:
            set_adapter_state(task.model, task.initial_state)
            task.model.eval()
        self._tasks.clear()
