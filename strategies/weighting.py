"""Weighting parts: the weight ``w_i`` of each accepted client in a round.

A :class:`~strategies.peft_strategy.PeftStrategy` asks its weighting for the weights, caps
them (``dp.max-weight``), and hands them to its aggregator, which normalises them (by their
sum for a mean, by N for FedAU). Parts here: :class:`ExampleWeights` (``w_i = n_i``, the
examples a client trained on; McMahan et al. 2017) and :class:`UniformWeights`
(``w_i = 1``). FedAU's estimated ``1/p_n`` lives in strategies/fedau.py, the oracle's true
``1/p_n`` in strategies/known_p_oracle.py.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Weighting(Protocol):
    """What a weighting part provides (see the module docstring)."""

    #: the config's name for it (``strategy.weighting`` or the strategy that implies it)
    name: str
    #: replies must report a finite ``num-examples`` >= 1
    needs_examples: bool

    def weights(self, server_round: int, participants: list[int], metrics: list[dict]) -> np.ndarray:
        """``w_i`` of this round's accepted partitions (sorted ids); may advance the part's state."""

    def round_extras(self, participants: list[int], weights: np.ndarray) -> dict:
        """Fields for the round report, given the weights after any cap."""

    def checkpoint_state(self) -> dict:
        """JSON-ready state a resumed run needs (``{}``: none)."""

    def restore_state(self, meta: dict) -> None:
        """Undo :meth:`checkpoint_state`."""

    def state_for_results(self) -> dict:
        """State saved in results.json (``{}``: none)."""


class _Stateless:
    """Weightings without state: nothing to report, checkpoint or restore."""

    def round_extras(self, participants: list[int], weights: np.ndarray) -> dict:
        """No extra fields."""
        return {}

    def checkpoint_state(self) -> dict:
        """No state."""
        return {}

    def restore_state(self, meta: dict) -> None:
        """No state."""

    def state_for_results(self) -> dict:
        """No state."""
        return {}


class ExampleWeights(_Stateless):
    """``w_i = n_i``, the ``num-examples`` each client reports."""

    name = "examples"
    needs_examples = True

    def weights(self, server_round: int, participants: list[int], metrics: list[dict]) -> np.ndarray:
        """The reported example counts."""
        return np.array([float(m["num-examples"]) for m in metrics], dtype=np.float64)


class UniformWeights(_Stateless):
    """``w_i = 1`` (client-level DP needs it: example counts are private)."""

    name = "uniform"
    needs_examples = False

    def weights(self, server_round: int, participants: list[int], metrics: list[dict]) -> np.ndarray:
        """Ones."""
        return np.ones(len(participants), dtype=np.float64)


def build_weighting(name: str) -> Weighting:
    """The ``strategy.weighting`` part by name (``examples`` or ``uniform``)."""
    parts = {"examples": ExampleWeights, "uniform": UniformWeights}
    if name not in parts:
        raise ValueError(f"weighting must be one of {sorted(parts)}, got {name!r}")
    return parts[name]()
