"""One helper for fake Flower replies and round reports (every strategy test uses it).

A reply built with ``Message(content, reply_to=query)`` comes from the node the query
went to, so no metadata is patched: tests address queries to the node they mean.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedpeft.records import state_to_record
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
