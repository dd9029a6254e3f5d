"""Adapter state <-> Flower records, keeping tensor names and order."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpeft.state import State


def state_to_record(state: State) -> ArrayRecord:
    """Named fp32 arrays as an ``ArrayRecord`` (Flower rejects bf16, so cast first)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(arr, dtype=np.float32)) for name, arr in state.items()})


def record_to_state(record: ArrayRecord) -> State:
    """An ``ArrayRecord`` back to ``{name: ndarray}``."""
    return {name: np.asarray(arr.numpy()) for name, arr in record.items()}
