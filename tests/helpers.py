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
