"""Aggregation math over PEFT deltas: pure numpy functions of explicit inputs.

In the style of Flower's ``aggregate_*`` helpers: no Flower, no torch, no state. A state
is a dict of named arrays (``fedpeft.state.State``); every function returns new arrays
and keeps the key order of its first input.

Weighted combination
    ``sum_i w_i d_i * scale / divisor``: a mean divides by the weight sum
    (:func:`mean_normalisation`), FedAU and the oracle multiply by ``1/N``
    (:func:`over_n_normalisation`). The coefficients ``c_i = w_i scale / divisor`` are
    reported; client-level DP calibrates its noise from the largest.

Robust aggregators (no sensitivity bound: refused under client-level DP)
    :func:`coordinate_median` (Yin et al. 2018), :func:`trimmed_mean` (Yin et al. 2018,
    ``beta`` trimmed from each end per coordinate), :func:`multi_krum` (Blanchard et al.
    2017, "Machine Learning with Adversaries"; El Mhamdi et al. 2018 for multi-Krum).

Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Alg. 2;
Hsu et al. 2019 for FedAvgM) over the pseudo-gradient ``g = -Delta``, ``Delta`` the
aggregated delta::

    step:      x <- x - lr g                                   (FedAvg with a server lr)
    momentum:  v <- beta v + g;            x <- x - lr v       (FedAvgM)
    adam:      m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    yogi:      m as adam;               v <- v - (1 - b2) g^2 sign(v - g^2)
    adagrad:   m as adam;               v <- v + g^2
    (adaptive) x <- x - lr m / (sqrt(v) + tau)

As in the paper's Algorithm 2 there is no bias correction, ``m`` starts at 0 and ``v`` at
``tau^2`` (``v_{-1} >= tau^2``). Moments are float64; parameters are cast back to float32.
"""

from __future__ import annotations

import math

import numpy as np

from fedpeft.state import State, apply_delta, linear_combination

# --- weighted combination ---------------------------------------------------------------


def mean_normalisation(weights: np.ndarray) -> tuple[float, float]:
    """``(scale, divisor) = (1, sum w)``: coefficients ``w_i / sum w`` (FedAvg)."""
    total = float(np.sum(np.asarray(weights, dtype=np.float64)))
    if not total > 0:
        raise ValueError(f"aggregation weights sum to {total}; they must be positive")
    return 1.0, total


def over_n_normalisation(num_clients: int) -> tuple[float, float]:
    """``(scale, divisor) = (1/N, 1)``: coefficients ``w_i / N`` (FedAU, Wang & Ji 2024, Alg. 1)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    return 1.0 / num_clients, 1.0


def coefficients(weights: np.ndarray, scale: float, divisor: float) -> np.ndarray:
    """``c_i = w_i * scale / divisor`` (float64)."""
    return np.asarray(weights, dtype=np.float64) * scale / divisor


def combine(deltas: list[State], weights: np.ndarray, *, scale: float = 1.0, divisor: float = 1.0) -> State:
    """``(sum_i w_i d_i) * scale / divisor`` per tensor, summed in float64 in list order, cast to fp32.

    Dividing by ``divisor`` (not multiplying by its rounded inverse) keeps the bits of a
    weighted mean stable across refactorings.
    """
    return linear_combination(deltas, [float(w) for w in weights], scale=scale, divisor=divisor)


# --- robust aggregators -----------------------------------------------------------------


def _stacked(deltas: list[State], name: str) -> np.ndarray:
    return np.stack([d[name].astype(np.float64) for d in deltas])


def coordinate_median(deltas: list[State]) -> State:
    """The coordinate-wise median of the deltas (mean of the two middle values for an even count)."""
    if not deltas:
        raise ValueError("need at least one delta")
    return {k: np.median(_stacked(deltas, k), axis=0).astype(np.float32) for k in deltas[0]}


def trim_count(num_deltas: int, beta: float) -> int:
    """How many values ``trimmed_mean`` drops from each end: ``floor(beta * n)``."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction beta must lie in [0, 0.5), got {beta}")
    return math.floor(beta * num_deltas)


def trimmed_mean(deltas: list[State], beta: float) -> State:
    """Per coordinate: drop the ``floor(beta n)`` largest and smallest values, average the rest.

    ``beta < 0.5`` (checked by :func:`trim_count`) always leaves ``n - 2 floor(beta n) >= 1`` values.
    """
    if not deltas:
        raise ValueError("need at least one delta")
    n = len(deltas)
    k = trim_count(n, beta)
    out: State = {}
    for name in deltas[0]:
        ordered = np.sort(_stacked(deltas, name), axis=0)
        out[name] = ordered[k : n - k].mean(axis=0).astype(np.float32)
    return out


def flatten(state: State) -> np.ndarray:
    """One float64 vector of every tensor, in key order."""
    return np.concatenate([v.astype(np.float64).ravel() for v in state.values()]) if state else np.zeros(0)


def krum_scores(deltas: list[State], f: int) -> np.ndarray:
    """Krum's score of each delta: the sum of its squared distances to its ``n - f - 2`` nearest others.

    Raises ``ValueError`` unless ``n >= 2f + 3`` (Blanchard et al. 2017, Prop. 1's condition).
    """
    n = len(deltas)
    if f < 0 or n < 2 * f + 3:
        raise ValueError(f"Krum with f={f} needs at least 2f + 3 = {2 * f + 3} deltas, got {n}")
    vectors = np.stack([flatten(d) for d in deltas])
    sq = np.sum(vectors**2, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * vectors @ vectors.T, 0.0)
    scores = np.empty(n)
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))
        scores[i] = others[: n - f - 2].sum()
    return scores


def multi_krum(deltas: list[State], f: int, m: int) -> list[int]:
    """Indices of the ``m`` deltas with the lowest Krum scores (ties: the lower index), ascending.

    ``m = 1`` is Krum; ``m = n - f`` multi-Krum's usual choice. The caller averages them.
    """
    n = len(deltas)
    if not 1 <= m <= n - f:
        raise ValueError(f"multi-Krum keeps m in 1..n - f = {n - f} deltas, got m={m}")
    scores = krum_scores(deltas, f)
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:m])


# --- server optimizers --------------------------------------------------------------------


def sgd_step(current: State, update: State, lr: float) -> State:
    """``x + lr * Delta`` (= ``x - lr g``), in float32 as FedAvg always applied it."""
    return apply_delta(current, update, lr)


def momentum_step(current: State, update: State, velocity: State, *, lr: float, beta: float) -> tuple[State, State]:
    """FedAvgM: ``v <- beta v + g``, ``x <- x - lr v`` with ``g = -Delta``; returns ``(x, v)``."""
    new_v = {k: beta * velocity[k] - update[k].astype(np.float64) for k in current}
    new_x = {k: (current[k].astype(np.float64) - lr * new_v[k]).astype(np.float32) for k in current}
    return new_x, new_v


def adaptive_step(
    current: State,
    update: State,
    first: State,
    second: State,
    *,
    rule: str,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[State, State, State]:
    """FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, Alg. 2); returns ``(x, m, v)``.

    ``rule`` is ``"adam"``, ``"yogi"`` or ``"adagrad"``; ``g = -Delta``.
    """
    new_x, new_m, new_v = {}, {}, {}
    for k in current:
        g = -update[k].astype(np.float64)
        g2 = g * g
        m = beta1 * first[k] + (1.0 - beta1) * g
        if rule == "adam":
            v = beta2 * second[k] + (1.0 - beta2) * g2
        elif rule == "yogi":
            v = second[k] - (1.0 - beta2) * g2 * np.sign(second[k] - g2)
        elif rule == "adagrad":
            v = second[k] + g2
        else:
            raise ValueError(f"unknown adaptive rule {rule!r}; expected 'adam', 'yogi' or 'adagrad'")
        new_x[k] = (current[k].astype(np.float64) - lr * m / (np.sqrt(v) + tau)).astype(np.float32)
        new_m[k], new_v[k] = m, v
    return new_x, new_m, new_v


def zeros_like(state: State, fill: float = 0.0) -> State:
    """float64 arrays of ``fill`` with the shapes of ``state`` (optimizer moments)."""
    return {k: np.full(v.shape, fill, dtype=np.float64) for k, v in state.items()}
