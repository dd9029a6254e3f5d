"""Per-client participation probabilities p_n for the heterogeneous environment models.

Sources (``participation.p-source``):

- ``constant``: p_n = ``p-mean`` for every client;
- ``list``: the comma-separated ``p-list``, one value per partition;
- ``uniform``: p_n ~ U(``p-floor``, 2 ``p-mean`` - ``p-floor``), clipped to 1 (mean ``p-mean``);
- ``label-correlated``: the construction of Wang & Ji (ICLR 2024, reference code): one
  class multiplier q ~ Dirichlet(``label-alpha`` 1_C) for the whole run, and
  p_n = min(1, max(``p-floor``, C ``p-mean`` <d_n, q>)), with d_n client n's label mix
  (its normalised label histogram). E<d_n, q> is about 1/C, so ``p-mean`` is the typical
  rate; clients holding the favoured classes come often, the rest sit at the floor.
"""

from __future__ import annotations

import numpy as np

from fedpeft.config import ParticipationConfig
from fedpeft.rng import numpy_rng


def parse_probability_list(text: str) -> np.ndarray:
    """``"0.1, 0.5,1"`` -> array([0.1, 0.5, 1.0])."""
    return np.array([float(v) for v in text.split(",") if v.strip()], dtype=np.float64)


def label_correlated_probabilities(
    label_hist: np.ndarray, *, mean: float, floor: float, alpha: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(p_n, q): p_n = min(1, max(floor, C mean <d_n, q>)) with q ~ Dirichlet(alpha 1_C).

    Parameters
    ----------
    label_hist : np.ndarray
        (clients, classes) label counts of the partitions.
    mean, floor, alpha : float
        Typical rate, lower bound, Dirichlet concentration of the class multiplier.
    rng : np.random.Generator
        Draws q.
    """
    hist = np.asarray(label_hist, dtype=np.float64)
    num_classes = hist.shape[1]
    mix = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1.0)
    q = rng.dirichlet(np.full(num_classes, alpha))
    p = np.minimum(1.0, np.maximum(floor, num_classes * mean * (mix @ q)))
    return p, q


def build_probabilities(
    cfg: ParticipationConfig, num_clients: int, seed: int, label_hist: np.ndarray | None = None
) -> np.ndarray:
    """p_n for every client, from ``cfg.p_source`` (see the module docstring)."""
    if cfg.p_source == "constant":
        return np.full(num_clients, cfg.p_mean)
    if cfg.p_source == "list":
        p = parse_probability_list(cfg.p_list)
        if len(p) != num_clients or not np.all((p > 0) & (p <= 1)):
            raise ValueError(f"participation.p-list needs {num_clients} values in (0, 1], got {cfg.p_list!r}")
        return p
    if cfg.p_source == "uniform":
        high = 2 * cfg.p_mean - cfg.p_floor
        if high < cfg.p_floor:
            raise ValueError("participation.p-source='uniform' needs p-mean >= p-floor")
        rng = numpy_rng(seed, "participation-p-uniform")
        return np.minimum(1.0, rng.uniform(cfg.p_floor, high, size=num_clients))
    if cfg.p_source == "label-correlated":
        if label_hist is None or len(label_hist) != num_clients:
            raise ValueError("participation.p-source='label-correlated' needs the partitions' label histograms")
        rng = numpy_rng(seed, "participation-q")
        p, _ = label_correlated_probabilities(
            label_hist, mean=cfg.p_mean, floor=cfg.p_floor, alpha=cfg.label_alpha, rng=rng
        )
        return p
    raise ValueError(f"unknown participation.p-source {cfg.p_source!r}")
