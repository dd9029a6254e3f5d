"""FlexLoRA: average the clients' full LoRA updates, give each client the SVD at its rank.

Bai et al. 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources" (FlexLoRA). For every adapted matrix the server forms each
client's product ``B_k A_k`` (its factors after local training), averages them,

    G = G_old + server_lr * (sum_k c_k B_k A_k - G_old),      (server_lr = 1: the paper)

and keeps the rank-R truncated SVD of G split as ``B = U_R sqrt(S_R)``,
``A = sqrt(S_R) V_R^T``; client k receives its first r_k slices, which are exactly the
rank-r_k truncated SVD. The head is averaged as in FedAvg. The SVDs' wall time is
reported each round (``flex-svd-seconds``), with the share of G's energy the rank-R
truncation keeps (``flex-energy-kept``).

Sending, validation and rank bookkeeping are HetLoRA's (:class:`~strategies.hetlora.RankSlices`);
only the aggregation differs. Because it re-factorises every round, FlexLoRA is its own server
step: a stateful server optimizer (momentum, Adam moments over A and B) would mean nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedpeft.state import State
from strategies.aggregators import Aggregate
from strategies.hetlora import RankSlices
from strategies.lora_hetero import flex_average, normalised


class FlexSVD(RankSlices):
    """FlexLoRA's aggregator: the rank-R truncated SVD of the averaged products, the head averaged.

    Parameters
    ----------
    ranks, max_rank
        As :class:`~strategies.hetlora.RankSlices`.
    server_lr : float
        ``G = G_old + server_lr (sum_k c_k B_k A_k - G_old)`` (1: the paper).
    coefficients : callable, optional
        Coefficients of the weights; default ``w / sum w``.
    """

    name = "flex-svd"
    refactorises = True

    def __init__(
        self,
        *,
        ranks: list[int],
        max_rank: int | None = None,
        server_lr: float = 1.0,
        coefficients: Callable[[list[float]], list[float]] = normalised,
    ) -> None:
        super().__init__(ranks=ranks, max_rank=max_rank)
        self.server_lr = server_lr
        self.coefficients = coefficients

    def aggregate(self, current: State, participants: list[int], deltas: list[State], weights: np.ndarray) -> Aggregate:
        """The new rank-R global state; SVD wall time and energy kept in the stats."""
        w = [float(x) for x in weights]
        state, stats = flex_average(
            current, deltas, w, self.max_rank, server_lr=self.server_lr, coefficients=self.coefficients
        )
        return Aggregate(update=None, state=state, coefficients=self.coefficients(w), max_coefficient=None, stats=stats)
