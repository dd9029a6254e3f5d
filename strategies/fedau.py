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

from fedpeft.state import State
from strategies.fedavg import FedAvgPEFT


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
    """FedAU's per-client interval state, keyed by partition id; O(1) memory and work per participant."""

    def __init__(self, *, k_cap: int) -> None:
        if k_cap < 1:
            raise ValueError(f"k_cap must be >= 1, got {k_cap}")
        self.k_cap = k_cap
        self.clients: dict[int, IntervalState] = {}

    def weights(self, server_round: int, participants: list[int]) -> list[float]:
        """omega of each participant (partition ids) in this round; advances their state."""
        out = []
        for pid in participants:
            omega, self.clients[pid] = advance_interval(
                self.clients.get(pid, IntervalState()), server_round, self.k_cap
            )
            out.append(omega)
        return out

    def to_json(self) -> dict:
        """JSON-ready state: K and ``{partition id: {last_round, total, count}}``."""
        return {"k_cap": self.k_cap, "clients": {str(p): asdict(s) for p, s in sorted(self.clients.items())}}


class FedAU(FedAvgPEFT):
    """FedAvg over PEFT deltas with FedAU weights, divided by the total client count N.

    Parameters
    ----------
    num_clients : int
        N, every client that could ever participate (not the number online).
    k_cap : int
        Interval cutoff K.
    server_lr, node_selector, partition_of, report, max_weight
        As for :class:`~strategies.fedavg.FedAvgPEFT`.
    """

    def __init__(self, *, num_clients: int, k_cap: int = 100000, server_lr: float = 1.0, **kwargs) -> None:
        super().__init__(server_lr=server_lr, weighting="uniform", **kwargs)
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self.estimator = FedAUWeights(k_cap=k_cap)

    @classmethod
    def from_config(cls, cfg, ctx) -> FedAU:
        """Build from an ``ExperimentConfig`` and a :class:`~strategies.base.StrategyContext`."""
        return cls(
            num_clients=ctx.num_clients,
            k_cap=cfg.strategy.k_cap,
            server_lr=cfg.strategy.server_lr,
            node_selector=ctx.node_selector,
            partition_of=ctx.partition_of,
            report=ctx.report,
            max_weight=(cfg.dp.max_weight or None) if cfg.dp.mode == "client" else None,
        )

    def aggregation_weights(self, server_round: int, accepted: list[tuple[int, State, dict]]) -> list[float]:
        """FedAU's omega for each accepted reply (failed and rejected replies never get here)."""
        return self.estimator.weights(server_round, [pid for pid, _, _ in accepted])

    def normalisation(self, weights: np.ndarray) -> tuple[float, float]:
        """``omega_n * (1/N)``: FedAU's update is not a weighted mean (the paper's Alg. 1)."""
        return 1.0 / self.num_clients, 1.0

    def round_extras(self, accepted: list[tuple[int, State, dict]], weights: list[float]) -> dict:
        """The omega each participant received (after any ``max_weight`` cap)."""
        return {"omega": {str(pid): w for (pid, _, _), w in zip(accepted, weights, strict=True)}}

    def state_for_results(self) -> dict:
        """The interval state, saved in results.json as ``strategy_state``."""
        return self.estimator.to_json()

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Every client's (last round, interval sum, count): all FedAU needs to continue exactly."""
        return {"fedau": self.estimator.to_json()}, {}

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Reload the interval state of :meth:`checkpoint_state`."""
        saved = meta["fedau"]
        if saved["k_cap"] != self.estimator.k_cap:
            raise ValueError(f"checkpoint has k_cap {saved['k_cap']}, the config {self.estimator.k_cap}")
        self.estimator.clients = {int(p): IntervalState(**s) for p, s in saved["clients"].items()}
