"""Each client's own held-out rows, for per-client evaluation (``evaluate.fraction-clients`` > 0).

Under label skew the global test accuracy hides which clients the model fails, so each
client keeps a share of its own rows out of training and scores the global adapter on them
in Flower's evaluate round. The carve is a pure function of (run seed, partition, row
count, fraction): a permutation from ``derive_seed(seed, "client-holdout", 0, partition)``,
whose first ``k = round(fraction x n)`` positions (at least 1, at most ``n - 1``) are held
out. Both parts keep the rows' original order, so the training loader's seeded shuffle works
on the remaining rows exactly as it would on a partition of that size.
"""

from __future__ import annotations

import numpy as np

from fedpeft.rng import numpy_rng


def holdout_count(num_rows: int, fraction: float) -> int:
    """``round(fraction x n)`` clipped to ``[1, n - 1]`` (a client keeps one row for each side)."""
    if num_rows < 2:
        raise ValueError(
            f"a client with {num_rows} row(s) cannot hold rows out for evaluation; "
            "raise partition.min-partition-size to >= 2 or set evaluate.fraction-clients = 0"
        )
    return int(min(max(round(fraction * num_rows), 1), num_rows - 1))


def split_holdout(num_rows: int, fraction: float, *, seed: int, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train positions, held-out positions)`` into a client's ``num_rows`` rows, each sorted.

    Parameters
    ----------
    num_rows : int
        The client's row count (>= 2).
    fraction : float
        ``evaluate.holdout-fraction``.
    seed, partition_id : int
        The run seed and the client; the same pair always gives the same split.
    """
    k = holdout_count(num_rows, fraction)
    order = numpy_rng(seed, "client-holdout", 0, partition_id).permutation(num_rows)
    return np.sort(order[k:]), np.sort(order[:k])
