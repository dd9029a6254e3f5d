"""What the ServerApp hands a strategy when it builds one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StrategyContext:
    """Server-side wiring for a strategy.

    Attributes
    ----------
    node_selector : callable
        ``(server_round, grid) -> node ids`` online this round (the environment decides).
    partition_of : callable
        Flower node id -> partition id (node ids are random in simulation).
    num_clients : int
        N, the total number of clients (partitions).
    environment : object
        The participation model. Only oracle baselines may read it (they say so in
        their name); adaptive strategies must not.
    extras : dict
        Anything else a strategy needs from the server (e.g. the initial state).
    """

    node_selector: Callable[[int, Any], list[int]]
    partition_of: Callable[[int], int]
    num_clients: int
    environment: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
