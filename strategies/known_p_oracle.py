"""ORACLE baseline: FedAvg with *known* participation probabilities, omega_n = 1/p_n.

The "known participation statistics" baseline of Wang & Ji, ICLR 2024 (arXiv
2306.03401): the update is FedAU's, x <- x + server_lr * (1/N) * sum_{n in A_t}
delta_n / p_n, but the weights come from the environment's true p_n. No real server
knows p_n; this strategy reads them from the participation model
(``StrategyContext.environment.probabilities``) and exists only as an upper reference
for FedAU, which has to estimate them.
"""

from __future__ import annotations

import numpy as np


class OracleWeights:
    """The oracle weighting part: ``omega_n = 1/p_n`` read from the environment.

    Pair it with the over-N mean, as FedAU.

    Parameters
    ----------
    probabilities : np.ndarray
        p_n of every partition id (all > 0).
    """

    name = "oracle"
    needs_examples = False

    def __init__(self, *, probabilities: np.ndarray) -> None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim != 1 or not np.all(probabilities > 0):
            raise ValueError(f"need probabilities > 0, one per partition, got {probabilities}")
        self.probabilities = probabilities

    def weights(self, server_round: int, participants: list[int], metrics: list[dict]) -> np.ndarray:
        """1/p_n for each accepted reply."""
        return np.array([float(1.0 / self.probabilities[pid]) for pid in participants], dtype=np.float64)

    def round_extras(self, participants: list[int], weights: np.ndarray) -> dict:
        """The omega each participant received (after any cap), as FedAU reports it."""
        return {"omega": {str(pid): float(w) for pid, w in zip(participants, weights, strict=True)}}

    def checkpoint_state(self) -> dict:
        """No state: p_n come from the config."""
        return {}

    def restore_state(self, meta: dict) -> None:
        """No state."""

    def state_for_results(self) -> dict:
        """The p_n used (the oracle's only state)."""
        return {"oracle": True, "probabilities": [float(p) for p in self.probabilities]}
