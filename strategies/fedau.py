"""FedAU: adaptive aggregation weights under unknown participation.

Shiqiang Wang and Mingyue Ji, "A Lightweight Method for Tackling Unknown Participation
Statistics in Federated Averaging", ICLR 2024, arXiv 2306.03401 (reference code:
IBM/fedau, read for semantics only).

With heterogeneous participation probabilities p_n, FedAvg over participants optimises
sum_n p_n F_n rather than the client average (1/N) sum_n F_n (the paper's Theorem 1).
Weighting client n by omega_n ~ 1/p_n undoes this. FedAU estimates 1/p_n online as the
running mean of client n's observed participation intervals, each cut off at K
(``k_cap``), and the server applies (deltas, not models)

    x <- x + server_lr * (1/N) * sum_{n in A_t} omega_n * delta_n,

with N the total number of clients: the weights are not normalised and the sum is not
divided by |A_t|. Exact semantics of the reference:

- the omega used in round t is computed *before* the interval that ends at t is added;
- a client with no closed interval yet gets omega = 1; intervals are counted from the
  start (a first participation in round t closes an interval of length t), and an absence
  of K rounds closes a cut-off interval of length K, so a client absent K or more rounds
  before its first participation gets omega = K;
- the state is O(1) per client: (last round seen, sum of closed intervals, their count),
  updated lazily when the client next participates (no work for absent clients).

Only replies that arrive and pass validation count as participation: a client whose reply
fails or is rejected is, to the server, indistinguishable from one that was offline, so
its state is left untouched and its current interval keeps growing until its next valid
reply (which then closes an interval spanning the failed round).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def fedau_weight_trace(participation: np.ndarray, k_cap: int) -> np.ndarray:
    """The omega each client receives in each round it participates (0 elsewhere).

    A direct, round-by-round transcription of the reference loop (every client's
    counter advances every round); the strategy uses the lazy update
    :func:`advance_interval`, and the tests check that the two agree.

    Parameters
    ----------
    participation : np.ndarray
        (rounds, clients) boolean matrix; row t-1 is round t.
    k_cap : int
        Interval cutoff K >= 1.

    Returns
    -------
    np.ndarray
        (rounds, clients) float matrix of omega where ``participation`` is true.
    """
    if k_cap < 1:
        raise ValueError(f"k_cap must be >= 1, got {k_cap}")
    part = np.asarray(participation, dtype=bool)
    num_clients = part.shape[1]
    since = np.zeros(num_clients, dtype=np.int64)  # rounds since the last closed interval
    total = np.zeros(num_clients, dtype=np.float64)  # sum of closed intervals
    count = np.zeros(num_clients, dtype=np.int64)  # number of closed intervals
    out = np.zeros(part.shape, dtype=np.float64)
    for t, on in enumerate(part):
        omega = np.where(count > 0, total / np.maximum(count, 1), 1.0)
        out[t, on] = omega[on]
        total[on] += since[on] + 1
        count[on] += 1
        since[on] = 0
        off = ~on
        since[off] += 1
        cut = off & (since >= k_cap)
        total[cut] += since[cut]
        count[cut] += 1
        since[cut] = 0
    return out


@dataclass(frozen=True)
class IntervalState:
    """One client's FedAU state: last round it participated (0 = never), sum and count of closed intervals."""

    last_round: int = 0
    total: int = 0
    count: int = 0

    @property
    def omega(self) -> float:
        """Mean closed interval, or 1 when none is closed yet."""
        return self.total / self.count if self.count else 1.0


def advance_interval(state: IntervalState, server_round: int, k_cap: int) -> tuple[float, IntervalState]:
    """The client participates in ``server_round`` (rounds start at 1): (omega to use, new state).

    The ``a`` rounds it was absent first close ``a // K`` cut-off intervals of length K;
    omega is then read; finally the interval ending now, ``a % K + 1``, is closed.
    """
    if server_round <= state.last_round:
        raise ValueError(f"round {server_round} is not after the client's last round {state.last_round}")
    absent = server_round - state.last_round - 1
    cut = absent // k_cap
    before = IntervalState(state.last_round, state.total + k_cap * cut, state.count + cut)
    after = IntervalState(server_round, before.total + absent % k_cap + 1, before.count + 1)
    return before.omega, after


class FedAUWeights:
    """The FedAU weighting part: per-client interval state keyed by partition id; O(1) per participant.

    Pair it with the over-N mean (``Mean(num_clients=N)``, strategies/aggregators.py): FedAU's
    update is ``(1/N) sum_i omega_i delta_i``, not a weighted mean.

    Parameters
    ----------
    k_cap : int
        Interval cutoff K.
    """

    name = "fedau"
    needs_examples = False

    def __init__(self, *, k_cap: int) -> None:
        if k_cap < 1:
            raise ValueError(f"k_cap must be >= 1, got {k_cap}")
        self.k_cap = k_cap
        self.clients: dict[int, IntervalState] = {}

    def weights(self, server_round: int, participants: list[int], metrics: list[dict] | None = None) -> np.ndarray:
        """omega of each participant (partition ids) in this round; advances their state.

        Only replies that passed validation reach here: a failed client's interval keeps growing.
        """
        out = []
        for pid in participants:
            omega, self.clients[pid] = advance_interval(
                self.clients.get(pid, IntervalState()), server_round, self.k_cap
            )
            out.append(omega)
        return np.asarray(out, dtype=np.float64)

    def round_extras(self, participants: list[int], weights: np.ndarray) -> dict:
        """The omega each participant received (after any ``max_weight`` cap)."""
        return {"omega": {str(pid): float(w) for pid, w in zip(participants, weights, strict=True)}}

    def to_json(self) -> dict:
        """JSON-ready state: K and ``{partition id: {last_round, total, count}}``."""
        return {"k_cap": self.k_cap, "clients": {str(p): asdict(s) for p, s in sorted(self.clients.items())}}

    def state_for_results(self) -> dict:
        """The interval state, saved in results.json as ``strategy_state``."""
        return self.to_json()

    def checkpoint_state(self) -> dict:
        """Every client's (last round, interval sum, count): all FedAU needs to continue exactly."""
        return self.to_json()

    def restore_state(self, meta: dict) -> None:
        """Reload the interval state of :meth:`checkpoint_state`."""
        if meta["k_cap"] != self.k_cap:
            raise ValueError(f"checkpoint has k_cap {meta['k_cap']}, the config {self.k_cap}")
        self.clients = {int(p): IntervalState(**s) for p, s in meta["clients"].items()}
