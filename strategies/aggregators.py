"""Aggregator parts: how the accepted deltas and their weights become one update.

An aggregator also says what each client is sent (its view of the global adapter: all of
it here, a rank slice for the unequal-rank parts of strategies/hetlora.py and
strategies/flexlora.py), which shapes its delta must have, and whether a round of ``n``
clients can be aggregated at all. Its :class:`Aggregate` reports the coefficients and,
when one exists, the sensitivity bound client-level DP calibrates its noise from: the
largest ``c_i`` of ``update = sum_i c_i clip(delta_i)``. The robust aggregators have no
such bound (one client moves a median by up to the clip norm whatever ``n`` is), so
client-level DP refuses them. The math is in strategies/aggregate.py.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

import strategies.aggregate as agg
from fedpeft.state import State


@dataclass(frozen=True)
class Aggregate:
    """One round's aggregate.

    Attributes
    ----------
    update : dict, optional
        The aggregated delta ``Delta`` (the server update steps along it).
    state : dict, optional
        A new global state the aggregator computed itself (FlexLoRA re-factorises; its
        server step is inside), instead of ``update``.
    coefficients : list of float
        ``c_i`` of each accepted client (nominal for the robust aggregators).
    max_coefficient : float or None
        Sensitivity per unit of clip norm; ``None`` when there is no bound.
    stats : dict
        Extra round statistics (reported and added to the train metrics).
    """

    update: State | None
    coefficients: list[float]
    max_coefficient: float | None
    state: State | None = None
    stats: dict[str, float] = field(default_factory=dict)


class Aggregator(Protocol):
    """What an aggregator part provides (see the module docstring)."""

    #: the config's name for it
    name: str
    #: has a sensitivity bound (client-level DP can calibrate its noise)
    bounded: bool
    #: returns a new state rather than an update (only the plain server step applies)
    refactorises: bool

    def view_key(self, partition_id: int) -> Hashable:
        """Clients with equal keys get the same view (``None``: the whole global adapter)."""

    def view(self, current: State, partition_id: int) -> State:
        """What ``partition_id`` trains from (its delta has these shapes)."""

    def client_fields(self, partition_id: int) -> dict:
        """Fields added to a client's row of the round report (e.g. its LoRA rank)."""

    def refusal(self, num_clients: int) -> str:
        """Why a round with ``num_clients`` accepted replies cannot be aggregated; ``""`` if it can."""

    def aggregate(self, current: State, participants: list[int], deltas: list[State], weights: np.ndarray) -> Aggregate:
        """The round's aggregate of the accepted deltas (sorted partition ids) and their weights."""

    def round_extras(self) -> dict:
        """Fields for the round report."""

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """JSON fields and named arrays a resumed run needs (MIFA / FedVarp's memory); ``({}, {})``: none."""

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Undo :meth:`checkpoint_state`."""


class StatelessAggregator:
    """Aggregators that keep nothing across rounds: nothing to checkpoint."""

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """No state."""
        return {}, {}

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """No state."""


class WholeAdapter(StatelessAggregator):
    """Every client trains the whole global adapter; any ``n >= 1`` can be aggregated.

    Stateless; an aggregator that keeps something (strategies/memory.py) overrides the checkpoint hooks.
    """

    def view_key(self, partition_id: int) -> Hashable:
        """One view for all."""
        return None

    def view(self, current: State, partition_id: int) -> State:
        """The global adapter."""
        return current

    def client_fields(self, partition_id: int) -> dict:
        """Nothing to add to a client's row of the round report."""
        return {}

    def refusal(self, num_clients: int) -> str:
        """Never refuses."""
        return ""

    def round_extras(self) -> dict:
        """No extra fields."""
        return {}


class Mean(WholeAdapter):
    """``sum_i w_i d_i / sum_i w_i`` (FedAvg) or, with ``num_clients``, ``sum_i w_i d_i / N`` (FedAU's over-N).

    Parameters
    ----------
    num_clients : int, optional
        N: divide by the total client count instead of the weight sum (FedAU, the oracle).
    """

    bounded = True
    refactorises = False

    def __init__(self, *, num_clients: int | None = None) -> None:
        if num_clients is not None and num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self.name = "mean" if num_clients is None else "over-n"

    def normalisation(self, weights: np.ndarray) -> tuple[float, float]:
        """``(scale, divisor)`` of the coefficients ``c_i = w_i scale / divisor``."""
        if self.num_clients is None:
            return agg.mean_normalisation(weights)
        return agg.over_n_normalisation(self.num_clients)

    def coefficients(self, weights: list[float]) -> list[float]:
        """``c_i`` of a list of weights (the unequal-rank parts apply it per rank slice)."""
        w = np.asarray(weights, dtype=np.float64)
        return [float(c) for c in agg.coefficients(w, *self.normalisation(w))]

    def aggregate(self, current: State, participants: list[int], deltas: list[State], weights: np.ndarray) -> Aggregate:
        """The weighted combination."""
        scale, divisor = self.normalisation(weights)
        coefs = [float(c) for c in agg.coefficients(weights, scale, divisor)]
        update = agg.combine(deltas, weights, scale=scale, divisor=divisor)
        return Aggregate(update=update, coefficients=coefs, max_coefficient=max(coefs))


class Median(WholeAdapter):
    """The coordinate-wise median of the deltas (weights are not used)."""

    name = "median"
    bounded = False
    refactorises = False

    def aggregate(self, current: State, participants: list[int], deltas: list[State], weights: np.ndarray) -> Aggregate:
        """Coordinate-wise median."""
        n = len(deltas)
        return Aggregate(update=agg.coordinate_median(deltas), coefficients=[1.0 / n] * n, max_coefficient=None)


class TrimmedMean(WholeAdapter):
    """Per coordinate, the mean after dropping the ``floor(beta n)`` largest and smallest values.

    Parameters
    ----------
    beta : float
        Fraction trimmed from each end, in ``[0, 0.5)``.
    """

    name = "trimmed-mean"
    bounded = False
    refactorises = False

    def __init__(self, *, beta: float) -> None:
        agg.trim_count(1, beta)  # validates beta
        self.beta = beta

    def aggregate(self, current: State, participants: list[int], deltas: list[State], weights: np.ndarray) -> Aggregate:
        """Coordinate-wise trimmed mean; ``trimmed`` (values dropped per end) goes in the stats."""
        n = len(deltas)
        return Aggregate(
            update=agg.trimmed_mean(deltas, self.beta),
            coefficients=[1.0 / n] * n,
            max_coefficient=None,
            stats={"trimmed-per-end": float(agg.trim_count(n, self.beta))},
        )


class Krum(WholeAdapter):
    """Multi-Krum: the weighted mean of the ``m`` deltas with the lowest Krum scores.

    Parameters
    ----------
    f : int
        Byzantine clients tolerated; a round needs ``n >= 2f + 3`` replies.
    m : int
        Deltas kept (1: Krum); a round needs ``m <= n - f``.
    """

    name = "krum"
    bounded = False
    refactorises = False

    def __init__(self, *, f: int, m: int) -> None:
        if f < 0 or m < 1:
            raise ValueError(f"Krum needs f >= 0 and m >= 1, got f={f}, m={m}")
        self.f, self.m = f, m
        self.selected: list[int] = []

    def refusal(self, num_clients: int) -> str:
        """Krum's condition ``n >= 2f + 3`` and ``m <= n - f``."""
        if num_clients < 2 * self.f + 3:
            return f"Krum with strategy.krum-f={self.f} needs >= 2f + 3 = {2 * self.f + 3} replies, got {num_clients}"
        if self.m > num_clients - self.f:
            return f"multi-Krum keeps strategy.krum-m={self.m} > n - f = {num_clients - self.f} replies"
        return ""

    def aggregate(self, current: State, participants: list[int], deltas: list[State], weights: np.ndarray) -> Aggregate:
        """Select by Krum score, then the weighted mean of the kept deltas."""
        kept = agg.multi_krum(deltas, self.f, self.m)
        self.selected = [participants[i] for i in kept]
        w = np.asarray(weights, dtype=np.float64)[kept]
        scale, divisor = agg.mean_normalisation(w)
        coefs = np.zeros(len(deltas))
        coefs[kept] = agg.coefficients(w, scale, divisor)
        update = agg.combine([deltas[i] for i in kept], w, scale=scale, divisor=divisor)
        return Aggregate(update=update, coefficients=[float(c) for c in coefs], max_coefficient=None)

    def round_extras(self) -> dict:
        """The partitions Krum kept this round."""
        return {"krum_selected": list(self.selected)}
