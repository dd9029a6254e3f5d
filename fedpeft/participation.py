"""Who is online in round t: the environment's model, never shown to the strategy.

Each model is a pure, seeded function ``online(round_) -> sorted partition ids``;
``trace(models, rounds)`` precomputes the (rounds, clients) boolean matrix that is
saved with the run so every strategy in a comparison can replay the same trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpeft.config import ParticipationConfig
from fedpeft.rng import numpy_rng


@dataclass(frozen=True)
class Always:
    """Every client is online in every round."""

    num_clients: int

    def online(self, round_: int) -> list[int]:
        """All partition ids."""
        return list(range(self.num_clients))


@dataclass(frozen=True)
class Uniform:
    """A uniformly random ``fraction`` of clients (at least ``min_clients``) each round."""

    num_clients: int
    fraction: float
    min_clients: int
    seed: int

    def online(self, round_: int) -> list[int]:
        """Sorted sample without replacement, seeded by (seed, round)."""
        k = min(self.num_clients, max(self.min_clients, int(round(self.fraction * self.num_clients))))
        rng = numpy_rng(self.seed, "participation-uniform", round_)
        return sorted(int(i) for i in rng.choice(self.num_clients, size=k, replace=False))


def build_participation(cfg: ParticipationConfig, num_clients: int, seed: int):
    """The participation model named by ``participation.model``."""
    if cfg.model == "always":
        return Always(num_clients)
    if cfg.model == "uniform":
        return Uniform(num_clients, cfg.fraction, cfg.min_clients, seed)
    raise ValueError(f"unknown participation.model {cfg.model!r}")


def trace(model, num_rounds: int, num_clients: int) -> np.ndarray:
    """(rounds, clients) boolean matrix; row t-1 is round t."""
    matrix = np.zeros((num_rounds, num_clients), dtype=bool)
    for t in range(1, num_rounds + 1):
        matrix[t - 1, model.online(t)] = True
    return matrix
