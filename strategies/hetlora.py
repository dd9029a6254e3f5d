"""HetLoRA-style zero padding: clients of unequal LoRA rank share one global adapter.

Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models". The server keeps rank-R factors (R = ``peft.lora-rank``); client k, of rank
r_k (``clients.rank-profile``), receives their first r_k slices (rows of A, columns of B)
and the head, trains them, and returns its delta. The server embeds each delta in rank R
with zeros and averages rank slice j over the clients that have it:

    theta_j <- theta_j + server_lr * sum_{k: r_k > j} c_k^{(j)} delta_{k,j},

``c^{(j)}`` being the strategy's normalised weights over those clients only
(strategies/lora_hetero.py); the head averages over all clients. Every rank uses the
scaling ``lora_alpha / R`` (fedpeft/adapters.py ``use_rank``), so a slice means the same
on every client. Each message carries only its client's arrays, so the byte ledger sees
every client's own rank.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np

from fedpeft.state import State
from strategies.aggregators import Aggregate, StatelessAggregator
from strategies.lora_hetero import normalised, slice_coefficients, slice_rank, state_rank, zero_pad_average


class RankSlices(StatelessAggregator):
    """Every partition's LoRA rank and the slice of the rank-R global adapter it is sent.

    Parameters
    ----------
    ranks : list of int
        LoRA rank of every partition, indexed by partition id (fedpeft/ranks.py).
    max_rank : int, optional
        The global adapter's rank R (``peft.lora-rank``); default ``max(ranks)``.
    """

    bounded = False  # per-rank-slice coefficients: no client-level DP calibration (the config refuses it)

    def __init__(self, *, ranks: list[int], max_rank: int | None = None) -> None:
        self.ranks = [int(r) for r in ranks]
        self.max_rank = int(max_rank or max(self.ranks))
        if min(self.ranks) <= 0 or max(self.ranks) > self.max_rank:
            raise ValueError(f"client ranks {self.ranks} must lie in 1..{self.max_rank} (the global rank)")

    def rank_of(self, partition_id: int) -> int:
        """The LoRA rank of a partition."""
        if not 0 <= partition_id < len(self.ranks):
            raise ValueError(f"partition {partition_id} has no rank; ranks are known for 0..{len(self.ranks) - 1}")
        return self.ranks[partition_id]

    def view_key(self, partition_id: int) -> Hashable:
        """Clients of one rank share a view."""
        return self.rank_of(partition_id)

    def view(self, current: State, partition_id: int) -> State:
        """The partition's rank slice (rows of A, columns of B) and the head."""
        return slice_rank(current, self.rank_of(partition_id))

    def client_fields(self, partition_id: int) -> dict:
        """The partition's rank, in its row of the round report."""
        return {"lora-rank": self.rank_of(partition_id)}

    def refusal(self, num_clients: int) -> str:
        """Never refuses."""
        return ""

    def round_extras(self) -> dict:
        """Every partition's LoRA rank."""
        return {"client-ranks": list(self.ranks)}


class ZeroPad(RankSlices):
    """HetLoRA's aggregator: zero-padded, per-rank-slice weighted mean of the deltas.

    Parameters
    ----------
    ranks, max_rank
        As :class:`RankSlices`.
    coefficients : callable, optional
        Coefficients of a subset of the weights (a rank slice's clients); default ``w / sum w``.
    """

    name = "zero-pad"
    refactorises = False

    def __init__(
        self,
        *,
        ranks: list[int],
        max_rank: int | None = None,
        coefficients: Callable[[list[float]], list[float]] = normalised,
    ) -> None:
        super().__init__(ranks=ranks, max_rank=max_rank)
        self.coefficients = coefficients

    def aggregate(self, current: State, participants: list[int], deltas: list[State], weights: np.ndarray) -> Aggregate:
        """Slice j averages over the clients whose rank exceeds j; the largest slice coefficient is reported."""
        w = [float(x) for x in weights]
        update = zero_pad_average(deltas, w, self.max_rank, coefficients=self.coefficients)
        table = slice_coefficients([state_rank(d) for d in deltas], w, self.max_rank, self.coefficients)
        return Aggregate(
            update=update,
            coefficients=self.coefficients(w),
            max_coefficient=None,
            stats={"max-slice-coefficient": float(table.max())},
        )
