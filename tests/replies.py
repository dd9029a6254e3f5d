"""One helper for fake Flower replies, round reports and numpy clients (every strategy test uses it).

A reply built with ``Message(content, reply_to=query)`` comes from the node the query
went to, so no metadata is patched: tests address queries to the node they mean.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import Strategy

from fedpeft.records import record_to_state, state_to_record
from simulations.grids import InMemoryGrid
from strategies.base import CONTRACT_KEY, KIND_DELTA, KIND_SPSA, contract_record


def fake_reply(
    query: Message,
    delta: dict | None = None,
    *,
    n: int | float = 1,
    metrics: dict | None = None,
    error: str | None = None,
    kind: str | None = KIND_DELTA,
    codes: bytes | None = None,
) -> Message:
    """A ClientApp's reply to ``query``: a delta (or SPSA ``codes``), its metrics and its contract.

    ``error`` makes an error reply; ``kind=None`` leaves the contract out (a stock Flower client).
    """
    if error:
        return Message(Error(code=1, reason=error), reply_to=query)
    content = RecordDict({"metrics": MetricRecord({"num-examples": n, **(metrics or {})})})
    if delta is not None:
        content["arrays"] = state_to_record(delta)
    if codes is not None:
        content["spsa"] = ConfigRecord({"codes": codes})
        kind = KIND_SPSA if kind == KIND_DELTA else kind
    if kind is not None:
        content[CONTRACT_KEY] = contract_record(kind)
    return Message(content, reply_to=query)


class RoundReports(dict):
    """A strategy's ``report`` callback that keeps every round's merged report: ``reports[round]``."""

    def __call__(self, server_round: int, fields: dict[str, Any]) -> None:
        self.setdefault(server_round, {}).update(fields)

    @property
    def last(self) -> dict[str, Any]:
        """The latest round's report."""
        return self[max(self)]


def numpy_clients(delta_of, *, num_clients: int, epsilon: float | None = None):
    """A grid of ``num_clients`` real ClientApps; partition ``p`` replies ``delta_of(p, global_state)``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        metrics = {"num-examples": 1, "partition-id": pid}
        if epsilon is not None:
            metrics["epsilon"] = epsilon * (pid + 1)
        delta = delta_of(pid, record_to_state(msg.content["arrays"]))
        content = RecordDict(
            {
                "arrays": state_to_record(delta),
                "metrics": MetricRecord(metrics),
                CONTRACT_KEY: contract_record(KIND_DELTA),
            }
        )
        return Message(content, reply_to=msg)

    configs = [{"partition-id": p, "num-partitions": num_clients} for p in range(num_clients)]
    return InMemoryGrid(app, run_config={}, node_configs=configs)


def run_rounds(strategy: Strategy, grid: InMemoryGrid, initial: dict, num_rounds: int) -> tuple[list[dict], object]:
    """``strategy.start`` on ``grid``; returns the global state after round 0..num_rounds and the Result."""
    states: list[dict] = []

    def keep(server_round: int, arrays: ArrayRecord) -> None:
        states.append(record_to_state(arrays))

    result = strategy.start(grid, state_to_record(initial), num_rounds=num_rounds, timeout=60, evaluate_fn=keep)
    return states, result
