"""MIFA and FedVarp: the server remembers each client's latest update (unknown-participation baselines).

Both keep ``y_i``, the last delta client ``i`` sent (zero before it first reports), so
clients that are offline this round still count. With ``S`` the clients aggregated this
round and ``N`` all clients:

- MIFA (Gu et al., NeurIPS 2021, "Fast Federated Learning in the Presence of Arbitrary
  Device Unavailability", Algorithm 1): first ``y_i <- delta_i`` for ``i in S``, then
  ``update = (1/N) sum_{i=1..N} y_i``, the average of every stored update.
- FedVarp (Jhunjhunwala et al., UAI 2022, "FedVARP: Tackling the Variance Due to Partial
  Client Participation in Federated Learning", Algorithm 1): with the memory of the
  previous round, ``update = (1/N) sum_j y_j + (1/|S|) sum_{i in S} (delta_i - y_i)``, then
  ``y_i <- delta_i`` for ``i in S``: the stored updates are a control variate for the
  sampled mean (unbiased, lower variance).

The memory is what these methods cost: ``N`` adapter-sized arrays on the server, reported
as ``memory_bytes`` every round. Reusing absent clients' updates breaks the subsampling
amplification client-level DP's accounting relies on, so both are refused under
``dp.mode = "client"`` (fedpeft/validation.py). Numpy only.

:class:`MIFA` and :class:`FedVarp` are aggregator parts of a
:class:`~strategies.peft_strategy.PeftStrategy` (``strategy.aggregator = "mifa" | "fedvarp"``):
any server update steps along their update; their memory is checkpointed (resume stays
bit-identical). Both weigh clients uniformly, as in their papers (``strategy.weighting =
"uniform"``): the weights the strategy passes are not used.
"""

from __future__ import annotations

import numpy as np

from fedpeft.state import State
from strategies.aggregators import Aggregate, WholeAdapter

Memory = dict[int, State]


def remember(memory: Memory, participants: list[int], deltas: list[State]) -> Memory:
    """A new memory with ``y_i = delta_i`` (float32 copies) for each participant."""
    out = dict(memory)
    for pid, delta in zip(participants, deltas, strict=True):
        out[pid] = {k: np.array(v, dtype=np.float32, copy=True) for k, v in delta.items()}
    return out


def memory_mean(memory: Memory, like: State, num_clients: int) -> State:
    """``(1/N) sum_j y_j`` in float64 (absent clients count as zero)."""
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in like.items()}
    for pid in sorted(memory):  # fixed summation order: reproducible
        for k, v in memory[pid].items():
            total[k] += v.astype(np.float64)
    return {k: v / num_clients for k, v in total.items()}


def mifa_update(memory: Memory, participants: list[int], deltas: list[State], num_clients: int) -> tuple[State, Memory]:
    """``(update, new memory)``: store this round's deltas, then average all ``N`` stored updates."""
    new_memory = remember(memory, participants, deltas)
    mean = memory_mean(new_memory, deltas[0], num_clients)
    return {k: v.astype(np.float32) for k, v in mean.items()}, new_memory


def fedvarp_update(
    memory: Memory, participants: list[int], deltas: list[State], num_clients: int
) -> tuple[State, Memory]:
    """``(update, new memory)``: ``mean_j y_j + mean_{i in S} (delta_i - y_i)`` with the old ``y``, then store."""
    update = memory_mean(memory, deltas[0], num_clients)
    for pid, delta in zip(participants, deltas, strict=True):
        stored = memory.get(pid)
        for k, v in delta.items():
            correction = v.astype(np.float64) - (0.0 if stored is None else stored[k].astype(np.float64))
            update[k] += correction / len(participants)
    return {k: v.astype(np.float32) for k, v in update.items()}, remember(memory, participants, deltas)


def memory_bytes(memory: Memory) -> int:
    """Bytes of the stored updates (float32 arrays)."""
    return int(sum(v.nbytes for state in memory.values() for v in state.values()))


def memory_to_arrays(memory: Memory) -> dict[str, np.ndarray]:
    """Flat ``{"<partition>/<tensor>": array}`` for a checkpoint."""
    return {f"{pid}/{k}": v for pid in sorted(memory) for k, v in memory[pid].items()}


def memory_from_arrays(arrays: dict[str, np.ndarray]) -> Memory:
    """Undo :func:`memory_to_arrays`."""
    memory: Memory = {}
    for key, value in arrays.items():
        pid, _, name = key.partition("/")
        memory.setdefault(int(pid), {})[name] = np.array(value, dtype=np.float32, copy=True)
    return memory


class _MemoryAggregator(WholeAdapter):
    """Shared wiring of MIFA and FedVarp: the whole adapter travels, any ``n >= 1`` aggregates."""

    name = "memory"
    bounded = False  # absent clients' stored updates enter every round: refused under client-level DP
    refactorises = False

    def __init__(self, *, num_clients: int) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self.memory: Memory = {}

    def round_extras(self) -> dict:
        """How many clients the memory holds and its bytes (what these methods cost the server)."""
        return {"memory_clients": len(self.memory), "memory_bytes": memory_bytes(self.memory)}

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The stored updates, one array per (client, tensor)."""
        if not self.memory:
            return {}, {}
        return {"clients": sorted(self.memory)}, memory_to_arrays(self.memory)

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Undo :meth:`checkpoint_state`."""
        self.memory = memory_from_arrays(arrays)


class MIFA(_MemoryAggregator):
    """MIFA's aggregate: the mean over all ``N`` clients of each one's latest update (module docstring)."""

    name = "mifa"

    def aggregate(self, current: State, participants: list[int], deltas: list[State], weights: np.ndarray) -> Aggregate:
        """Store this round's deltas, then average the memory over ``N``."""
        update, self.memory = mifa_update(self.memory, participants, deltas, self.num_clients)
        coefs = [1.0 / self.num_clients] * len(deltas)
        return Aggregate(update=update, coefficients=coefs, max_coefficient=None)


class FedVarp(_MemoryAggregator):
    """FedVarp's aggregate: the stored mean plus this round's corrections (module docstring)."""

    name = "fedvarp"

    def aggregate(self, current: State, participants: list[int], deltas: list[State], weights: np.ndarray) -> Aggregate:
        """``mean_j y_j + mean_{i in S} (delta_i - y_i)``, then store this round's deltas."""
        update, self.memory = fedvarp_update(self.memory, participants, deltas, self.num_clients)
        coefs = [1.0 / len(deltas)] * len(deltas)
        return Aggregate(update=update, coefficients=coefs, max_coefficient=None)
