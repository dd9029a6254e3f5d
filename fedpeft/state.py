"""Adapter states as plain numpy: ``{name: ndarray}``, checked, subtracted, added.

Numpy only (no torch) so server strategies can use it without importing torch: the
server's aggregation is array arithmetic, and a Flower user who imports
``strategies.fedavg`` into their own ServerApp should not pay for torch.
"""

from __future__ import annotations

import math

import numpy as np

State = dict[str, np.ndarray]


class DeltaError(ValueError):
    """A client's update does not fit the global adapter state."""


def check_state(state: State, shapes: dict[str, tuple[int, ...]], what: str = "delta") -> None:
    """Raise :class:`DeltaError` unless ``state`` has exactly these keys/shapes and finite values."""
    missing = [k for k in shapes if k not in state]
    extra = [k for k in state if k not in shapes]
    if missing or extra:
        raise DeltaError(f"{what} keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in shapes.items():
        arr = np.asarray(state[name])
        if tuple(arr.shape) != tuple(shape):
            raise DeltaError(f"{what} {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if not np.all(np.isfinite(arr)):
            raise DeltaError(f"{what} {name!r} contains NaN or Inf")


def check_metric(metrics: dict, key: str, *, low: float, high: float = math.inf, required: bool = True) -> None:
    """Raise :class:`DeltaError` unless ``metrics[key]`` is a finite number in ``[low, high]``.

    Every client-reported number that enters the aggregation (example counts, weights)
    goes through this: one ``num-examples = inf`` would otherwise turn the global model
    into NaN.
    """
    if key not in metrics:
        if required:
            raise DeltaError(f"reply has no {key!r} metric")
        return
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DeltaError(f"metric {key!r} is {value!r}, not a number")
    if not math.isfinite(value) or not low <= value <= high:
        raise DeltaError(f"metric {key!r} = {value!r} is outside [{low}, {high}]")


def compute_delta(new: State, old: State) -> State:
    """``new - old`` per tensor (what a first-order client sends)."""
    return {k: (new[k].astype(np.float32) - old[k].astype(np.float32)) for k in old}


def apply_delta(state: State, delta: State, scale: float = 1.0) -> State:
    """``state + scale * delta`` per tensor, as a new dict."""
    return {k: (state[k] + np.float32(scale) * delta[k]).astype(np.float32) for k in state}


def linear_combination(
    deltas: list[State], coefficients: list[float], *, scale: float = 1.0, divisor: float = 1.0
) -> State:
    """``(sum_i c_i d_i) * scale / divisor`` per tensor, in float64 in the given order, then cast to fp32.

    ``scale`` and ``divisor`` let a weighted mean divide by the weight sum (not multiply by
    its rounded inverse), so results keep their exact bits across refactorings.
    """
    if not deltas or len(deltas) != len(coefficients):
        raise ValueError("need one coefficient per delta and at least one delta")
    return {
        k: (
            sum(np.float64(c) * d[k].astype(np.float64) for d, c in zip(deltas, coefficients, strict=True))
            * np.float64(scale)
            / np.float64(divisor)
        ).astype(np.float32)
        for k in deltas[0]
    }
