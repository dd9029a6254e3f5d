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

from fedpeft.state import State
from strategies.fedau import FedAU


class KnownPOracle(FedAU):
    """FedAU's update with omega_n = 1/p_n read from the environment (an oracle).

    Parameters
    ----------
    probabilities : np.ndarray
        p_n of every partition id (all > 0).
    num_clients, server_lr, node_selector, partition_of
        As for :class:`~strategies.fedau.FedAU`.
    """

    def __init__(self, *, probabilities: np.ndarray, num_clients: int, **kwargs) -> None:
        super().__init__(num_clients=num_clients, **kwargs)
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.shape != (num_clients,) or not np.all(probabilities > 0):
            raise ValueError(f"need {num_clients} probabilities > 0, got {probabilities}")
        self.probabilities = probabilities

    @classmethod
    def from_config(cls, cfg, ctx) -> KnownPOracle:
        """Build from the config; p_n come from ``ctx.environment.probabilities``."""
        probabilities = getattr(ctx.environment, "probabilities", None)
        if probabilities is None:
            raise ValueError("strategy 'known_p_oracle' needs a participation model that exposes .probabilities")
        return cls(
            probabilities=probabilities,
            num_clients=ctx.num_clients,
            server_lr=cfg.strategy.server_lr,
            node_selector=ctx.node_selector,
            partition_of=ctx.partition_of,
            report=ctx.report,
            max_weight=(cfg.dp.max_weight or None) if cfg.dp.mode == "client" else None,
        )

    def aggregation_weights(self, server_round: int, accepted: list[tuple[int, State, dict]]) -> list[float]:
        """1/p_n for each accepted reply."""
        return [float(1.0 / self.probabilities[pid]) for pid, _, _ in accepted]

    def state_for_results(self) -> dict:
        """The p_n used (the oracle's only state)."""
        return {"oracle": True, "probabilities": [float(p) for p in self.probabilities]}
