"""One delegating base for every wrapper: client-level DP, DP-SGD reports, resumed runs.

A wrapper is a strategy: it subclasses Flower's ``Strategy`` and delegates each hook by
name, as Flower's ``DifferentialPrivacyServerSideFixedClipping`` does, so
``wrapper.start(grid, ...)`` runs Flower's own round loop with the wrapper's hooks. It also
forwards what :class:`~strategies.base.FedPeftStrategy` declares (client mode, reply
kind, server lr, checkpoint state), by name: never ``__getattr__`` (which would hand
``start()`` itself to the inner strategy) and never probes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.base import FedPeftStrategy

log = logging.getLogger(__name__)


class Delegating(Strategy):
    """Every ``Strategy`` hook and every :class:`FedPeftStrategy` member delegated to ``strategy``.

    Parameters
    ----------
    strategy : FedPeftStrategy
        The wrapped strategy (itself possibly a wrapper).
    """

    def __init__(self, *, strategy: FedPeftStrategy) -> None:
        self.strategy = strategy

    # --- what apps and wrappers read (strategies/base.py) ---------------------------------

    @property
    def client_mode(self) -> str:
        """The wrapped strategy's client mode."""
        return self.strategy.client_mode

    @property
    def expected_kind(self) -> str:
        """The wrapped strategy's reply kind."""
        return self.strategy.expected_kind

    @property
    def server_lr(self) -> float:
        """The wrapped strategy's server lr."""
        return self.strategy.server_lr

    def partition_of(self, node_id: int) -> int:
        """The wrapped strategy's partition of a node."""
        return self.strategy.partition_of(node_id)

    def client_dp_refusal(self) -> str:
        """The wrapped strategy's answer."""
        return self.strategy.client_dp_refusal()

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The wrapped strategy's checkpoint under ``inner`` (subclasses add their own fields)."""
        meta, arrays = self.strategy.checkpoint_state()
        return {"inner": meta}, arrays

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Restore the wrapped strategy."""
        self.strategy.restore_state(meta["inner"], arrays)

    def state_for_results(self) -> dict:
        """The wrapped strategy's state for results.json."""
        return self.strategy.state_for_results()

    # --- Flower's hooks ---------------------------------------------------------------

    def summary(self) -> None:
        """The wrapper's name, then the wrapped strategy's settings."""
        log.info("%s around:", type(self).__name__)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """The wrapped strategy's train messages."""
        return list(self.strategy.configure_train(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """The wrapped strategy's aggregation."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """The wrapped strategy's evaluate messages."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        """The wrapped strategy's evaluate aggregation."""
        return self.strategy.aggregate_evaluate(server_round, replies)
