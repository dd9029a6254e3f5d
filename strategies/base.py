"""What every fedpeft strategy shares: the server wiring, the message contract, round reports.

The message contract (fedpeft ClientApp <-> fedpeft strategies)
---------------------------------------------------------------
- A train message's ``"config"`` ConfigRecord carries ``"mode"`` (``"first-order"`` or
  ``"spsa"``) and ``"server-round"``; the ClientApp refuses a train message without a
  mode, so a stock Flower strategy pointed at it fails loudly instead of averaging
  deltas as if they were weights.
- A train reply says what it carries in its ``"contract"`` ConfigRecord: ``kind =
  "delta"`` (``"arrays"`` holds ``theta_i - theta``, trainable PEFT tensors only) or
  ``kind = "spsa-codes"`` (``"spsa"`` holds one-byte projected gradients). Full weights
  (``kind = "arrays"``, or no contract at all, as a stock Flower ClientApp sends) are
  refused: the reply is rejected, and a round in which every reply broke the contract
  raises :class:`ContractError`.
- ``"metrics"`` carries ``num-examples`` (finite, > 0), ``partition-id`` and the
  client's training statistics.

Round reports: a strategy calls its ``report(server_round, fields)`` callback once per
round with what happened (aggregated / failed / rejected partitions, per-client train
metrics, strategy extras such as FedAU's omega, SPSA hashes, epsilon). The ServerApp's
results writer is that callback; in your own ServerApp leave it out (a no-op), or pass a
function to collect them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message

from fedpeft.privacy_plan import PrivacyPlan

#: the reply ConfigRecord that says what the reply carries
CONTRACT_KEY = "contract"
KIND_DELTA = "delta"
KIND_SPSA = "spsa-codes"
KIND_ARRAYS = "arrays"  # full weights: what stock Flower ClientApps send; never averaged here

Reporter = Callable[[int, dict[str, Any]], None]


def no_report(server_round: int, fields: dict[str, Any]) -> None:
    """The default round-report callback: nothing is collected."""


class ContractError(RuntimeError):
    """Every reply of a round broke the message contract (e.g. full weights to a delta strategy)."""


def client_error(reason: str, limit: int = 1000) -> str:
    """The client's own error from a Flower error reason, without the engine's wrapping.

    fedpeft's ClientApp replies ``"<ExceptionType>: <message>"`` itself; an exception that
    escapes to Flower's Ray engine arrives wrapped in a Ray traceback whose useful part is
    the ``Message: ...`` of Flower's ClientAppException (or the last line of a traceback).
    """
    text = str(reason)
    marker = "occurred. Message: "
    if marker in text:
        text = text.split(marker, 1)[1].splitlines()[0].rstrip("'>\" ")
    elif "Traceback" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = next((line for line in reversed(lines) if ": " in line), lines[-1])
    return text[:limit]


def contract_record(kind: str) -> ConfigRecord:
    """The ConfigRecord a ClientApp adds to a train reply carrying ``kind``."""
    return ConfigRecord({"kind": kind})


def reply_kind(msg: Message) -> str | None:
    """What a train reply says it carries, or None when it says nothing."""
    record = msg.content.config_records.get(CONTRACT_KEY)
    return None if record is None else str(record.get("kind"))


def contract_violation(msg: Message, expected: str) -> str:
    """A reason naming the contract when ``msg`` does not carry ``expected``; "" when it does."""
    kind = reply_kind(msg)
    if kind == expected:
        return ""
    said = "says nothing about what it carries" if kind is None else f"carries {kind!r}"
    return (
        f"message contract: the reply {said}, but this strategy aggregates {expected!r} replies "
        f"(a '{CONTRACT_KEY}' ConfigRecord with kind={expected!r}, see strategies/base.py); "
        "point it at fedpeft's ClientApp (simulations/client_app.py), not a stock Flower ClientApp"
    )


@dataclass
class StrategyContext:
    """Server-side wiring for a strategy: what the ServerApp knows, in typed fields.

    Attributes
    ----------
    node_selector : callable
        ``(server_round, grid) -> node ids`` online this round (the environment decides).
    partition_of : callable
        Flower node id -> partition id (node ids are random in simulation).
    num_clients : int
        N, the total number of clients (partitions).
    environment : object
        The participation model (``fedpeft.participation``). Only oracle baselines may read
        it (they say so in their name); adaptive strategies must not.
    report : callable
        Round-report callback ``(server_round, fields)`` (see the module docstring).
    initial_state : dict, optional
        The seeded initial adapter (SPSA replays from it).
    client_ranks : list of int, optional
        Every partition's LoRA rank when the ServerApp measured them (``mem:`` budgets);
        ``None``: read ``clients.rank-profile``.
    privacy_plan : PrivacyPlan, optional
        The run's noise multipliers (``fedpeft.privacy_plan.plan_privacy``); required when
        ``dp.mode`` is not ``none`` (strategies load no data to plan it themselves).
    """

    node_selector: Callable[[int, Any], list[int]]
    partition_of: Callable[[int], int]
    num_clients: int
    environment: Any = None
    report: Reporter = no_report
    initial_state: dict[str, np.ndarray] | None = None
    client_ranks: list[int] | None = None
    privacy_plan: PrivacyPlan | None = None


class FedPeftStrategy(Protocol):
    """What the apps, the checkpoint writer and the wrappers read from any fedpeft strategy.

    :class:`~strategies.peft_strategy.PeftStrategy`, :class:`~strategies.spsa.SharedSeedSPSA`
    and every wrapper (:class:`~strategies.delegating.Delegating`) provide all of it, so no
    caller probes a strategy with ``getattr``/``hasattr``.
    """

    #: what the ClientApp does with a train message (its config's ``"mode"``)
    client_mode: str
    #: what a train reply must carry (the message contract)
    expected_kind: str

    @property
    def server_lr(self) -> float:
        """The server step size."""

    def partition_of(self, node_id: int) -> int:
        """The partition id of a Flower node."""

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """JSON fields and named arrays a resumed run needs beyond the global adapter."""

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Undo :meth:`checkpoint_state`."""

    def state_for_results(self) -> dict:
        """The strategy's state for results.json (``strategy_state``); ``{}`` when it keeps none."""

    def client_dp_refusal(self) -> str:
        """Why client-level DP cannot wrap this strategy; ``""`` when it can."""
