"""Reply screening and round reports, shared by every fedpeft strategy (composed, not inherited).

A :class:`ReplyScreen` remembers which partitions were sent a train message, screens the
replies (failures, the message contract of strategies/base.py, then the strategy's own
``parse``), and sends the round report: aggregated / failed / rejected partitions, the
per-client metrics and whatever the strategy adds. Replies that fail a check are logged,
reported and left out; the global state is never touched by them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
from flwr.app import Message, MetricRecord

from fedpeft.state import DeltaError
from strategies.base import ContractError, Reporter, client_error, contract_violation, no_report

log = logging.getLogger(__name__)

Item = TypeVar("Item")
#: ``(partition id, parsed reply, client metrics)``, sorted by partition id
Accepted = list[tuple[int, Item, dict]]

#: train metrics that mean something when averaged over clients (example-weighted)
MEAN_METRICS = ("train-loss", "train-loss-first", "train-loss-last", "spsa-mean-abs-g")
#: the largest ``num-examples`` a reply may claim
MAX_EXAMPLES = 1e12
#: the failure of a client whose reply did not come (a cohort worker reports a silent client with it)
NO_REPLY = "no reply within simulation.round-timeout-s"


class ReplyScreen:
    """One strategy's reply screening and round reports.

    Parameters
    ----------
    expected_kind : str
        What a valid train reply carries (``KIND_DELTA`` or ``KIND_SPSA``).
    partition_of : callable
        Flower node id -> partition id.
    report : callable, optional
        Round-report callback ``(server_round, fields)``.
    """

    def __init__(self, *, expected_kind: str, partition_of: Callable[[int], int], report: Reporter | None) -> None:
        self.expected_kind = expected_kind
        self.partition_of = partition_of
        self.report = report if report is not None else no_report
        self.expected: list[int] = []  # partitions sent a train message this round
        self.outcome: dict[str, list] = {"failed": [], "rejected": []}

    def sent(self, messages: Iterable[Message]) -> None:
        """Remember the partitions this round's train messages went to (a missing reply is a failure)."""
        self.expected = [self.partition_of(m.metadata.dst_node_id) for m in messages]

    def screen(self, server_round: int, replies: Iterable[Message], parse: Callable[[Message, dict], Item]) -> Accepted:
        """``(partition id, parse(reply), metrics)`` of every valid reply, sorted by partition id.

        ``parse`` raises :class:`~fedpeft.state.DeltaError` to reject a reply. A round in which
        every reply broke the message contract raises :class:`~strategies.base.ContractError`.
        """
        self.outcome = {"failed": [], "rejected": []}
        accepted, answered, contract_breaks = [], set(), 0
        for msg in replies:
            pid = self.partition_of(msg.metadata.src_node_id)
            answered.add(pid)
            if msg.has_error():
                reason = client_error(msg.error.reason)
                log.warning("round %d: partition %s failed: %s", server_round, pid, reason)
                self.outcome["failed"].append({"partition_id": pid, "reason": reason})
                continue
            metrics = dict(next(iter(msg.content.metric_records.values()), {}))
            try:
                broken = contract_violation(msg, self.expected_kind)
                if broken:
                    contract_breaks += 1
                    raise DeltaError(broken)
                item = parse(msg, metrics)
            except DeltaError as err:
                log.warning("round %d: rejected reply from partition %s: %s", server_round, pid, err)
                self.outcome["rejected"].append({"partition_id": pid, "reason": str(err)})
                continue
            accepted.append((pid, item, metrics))
        for pid in self.expected:
            if pid not in answered:
                reason = NO_REPLY
                self.outcome["failed"].append({"partition_id": pid, "reason": reason})
        if contract_breaks and not accepted:
            raise ContractError(self.outcome["rejected"][0]["reason"])
        # Replies arrive in any order; sum in partition order so results are reproducible.
        accepted.sort(key=lambda item: item[0])
        return accepted

    def finish(self, server_round: int, accepted: Accepted, **extras) -> None:
        """Send the round report: aggregated, failed and rejected partitions, per-client metrics, extras."""
        clients = [{"partition_id": pid, **_numbers(m)} for pid, _, m in accepted]
        self.report(
            server_round,
            {"aggregated": [pid for pid, _, _ in accepted], **self.outcome, "clients": clients, **extras},
        )


def summarise_metrics(accepted: Accepted, coefficients: list[float]) -> MetricRecord:
    """Train metrics that aggregate meaningfully; per-client values stay in the round report.

    Losses are example-weighted means, ``num-examples`` a sum, ``epsilon`` the maximum;
    ``max-coefficient`` is the largest ``c_i`` of ``update = sum_i c_i delta_i``.
    """
    metrics = [m for _, _, m in accepted]
    examples = np.array([float(m.get("num-examples", 1.0)) for m in metrics])
    out: dict[str, float] = {
        "num-examples": float(examples.sum()),
        "num-clients": len(metrics),
        "max-coefficient": float(max(coefficients)),
    }
    for key in MEAN_METRICS:
        vals = np.array([float(m.get(key, np.nan)) for m in metrics])
        ok = np.isfinite(vals)
        if ok.any():
            out[key] = float(np.sum(vals[ok] * examples[ok]) / np.sum(examples[ok]))
    eps = [float(m["epsilon"]) for m in metrics if "epsilon" in m]
    if eps:
        out["epsilon"] = max(eps)
    return MetricRecord(out)


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "partition-id"}
