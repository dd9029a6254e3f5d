"""Confidence intervals over seeds: the mean and a Student-t interval half-width.

Every number ``fedpeft report`` prints as ``mean ± h`` is the sample mean of one value per
seed and the half-width ``h = t_{1-(1-level)/2, n-1} * s / sqrt(n)`` of the two-sided
Student-t interval, with ``s`` the sample standard deviation (``ddof=1``). Seeds are
treated as independent draws of the whole run (data split, participation, initialisation,
client sampling), which is what differs between them. With one seed there is no interval
(half-width NaN, printed as ``n=1, no CI``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import t as student_t

CI_DESCRIPTION = "mean ± 95% CI half-width, Student-t over seeds"


def t_quantile(probability: float, df: int) -> float:
    """The Student-t quantile ``t_{probability, df}`` (e.g. ``t_{0.975, 3} = 3.18245``)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(student_t.ppf(probability, df))


def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float, int]:
    """``(mean, half_width, n)`` of the two-sided Student-t ``level`` interval over ``values``.

    ``values`` holds one number per seed; ``None`` and NaN entries are dropped (a metric a
    run did not record). ``n = 0`` gives ``(nan, nan, 0)``; ``n = 1`` gives ``(x, nan, 1)``:
    one seed has no spread to build an interval from.
    """
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    kept = np.array([float(v) for v in values if v is not None and not math.isnan(float(v))], dtype=np.float64)
    n = int(kept.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(kept.mean())
    if n == 1:
        return mean, math.nan, 1
    sd = float(kept.std(ddof=1))
    return mean, t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n), n


def curve_band(
    curves: Sequence[dict[int, float]], level: float = 0.95
) -> tuple[list[int], list[float], list[float], list[int]]:
    """Per round present in every curve: ``(rounds, means, half_widths, ns)``.

    ``curves`` holds one ``{round: value}`` per seed. Only rounds evaluated in all of them
    are kept, so every point of the band averages the same seeds.
    """
    if not curves:
        return [], [], [], []
    common = sorted(set.intersection(*(set(c) for c in curves)))
    stats = [mean_ci([c[r] for c in curves], level) for r in common]
    return common, [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats]


def format_ci(mean: float, half_width: float, n: int, spec: str = ".4f") -> str:
    """``0.6512 ± 0.0123`` with both numbers in format ``spec``; ``n=1, no CI`` for one value, ``-`` for none."""
    if n == 0 or math.isnan(mean):
        return "-"
    if n == 1 or math.isnan(half_width):
        return f"{mean:{spec}} (n=1, no CI)"
    return f"{mean:{spec}} ± {half_width:{spec.replace('+', '')}}"
