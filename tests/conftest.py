"""Shared fixtures: tiny configs over the real embedded model and data."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedpeft.config import ExperimentConfig  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run with one torch thread, like a simulated client."""
    torch.set_num_threads(1)


@pytest.fixture
def task_identity():
    """Flower's Message() needs a task identity; set a dummy one as run_simulation does."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
    yield


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


@pytest.fixture
def tiny():
    """The tiny config (see :func:`tiny_config`)."""
    return tiny_config()
