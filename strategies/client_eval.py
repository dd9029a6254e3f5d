"""Per-client evaluation through Flower's evaluate round: who does the global model fail?

Under label skew the global test accuracy hides the clients the model fails (issue 22,
item 7). With ``evaluate.fraction-clients`` > 0, every evaluated round (the rounds the
server scores: every ``train.eval-every`` and the last) sends the new global adapter to
``max(1, round(fraction x N))`` clients drawn from ``derive_seed(seed, "evaluate-clients",
round)``; each scores it on its own held-out rows (fedpeft/holdout.py) and the round's
results row gets, beside the global test accuracy,

- ``client_accuracy_mean``: the unweighted mean over the evaluated clients,
- ``client_accuracy_worst10``: the mean of the worst ``ceil(10% x m)`` of the ``m`` clients
  (at least the single worst),
- ``client_accuracy_std``, ``client_accuracy_min``, ``client_accuracy_max``: the spread,

and ``client_eval`` (each client's accuracy, loss and row count). Evaluate messages are
counted in the byte ledger as kind ``evaluate``, off the algorithm's byte axis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedpeft.rng import numpy_rng
from strategies.base import Reporter, client_error, no_report

log = logging.getLogger(__name__)


def client_accuracy_summary(accuracies: list[float]) -> dict[str, float]:
    """Mean, worst 10% (mean of the lowest ``ceil(0.1 m)``), std, min and max of per-client accuracies."""
    if not accuracies:
        raise ValueError("no client accuracies to summarise")
    acc = np.sort(np.asarray(accuracies, dtype=np.float64))
    worst = max(1, math.ceil(0.1 * acc.size))
    return {
        "client_accuracy_mean": float(acc.mean()),
        "client_accuracy_worst10": float(acc[:worst].mean()),
        "client_accuracy_std": float(acc.std()),
        "client_accuracy_min": float(acc[0]),
        "client_accuracy_max": float(acc[-1]),
    }


def evaluation_partitions(num_clients: int, fraction: float, *, seed: int, server_round: int) -> list[int]:
    """The ``max(1, round(fraction x N))`` partitions that evaluate in ``server_round``, sorted."""
    count = min(num_clients, max(1, round(fraction * num_clients)))
    rng = numpy_rng(seed, "evaluate-clients", server_round)
    return sorted(int(p) for p in rng.choice(num_clients, size=count, replace=False))


class PerClientEvaluation:
    """The evaluate-round part of a strategy (see the module docstring).

    Parameters
    ----------
    fraction : float
        ``evaluate.fraction-clients`` (> 0).
    num_clients : int
        N.
    seed : int
        Run seed (which clients evaluate each round).
    eval_rounds : callable
        ``server_round -> bool``: whether the round is evaluated.
    partition_of : callable
        Flower node id -> partition id.
    report : callable, optional
        Round-report callback (strategies/base.py).
    """

    def __init__(
        self,
        *,
        fraction: float,
        num_clients: int,
        seed: int,
        eval_rounds: Callable[[int], bool],
        partition_of: Callable[[int], int],
        report: Reporter | None = None,
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.num_clients = num_clients
        self.seed = seed
        self.eval_rounds = eval_rounds
        self.partition_of = partition_of
        self.report = report if report is not None else no_report

    def configure(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> list[Message]:
        """Evaluate messages to this round's drawn clients that are connected (none off evaluated rounds)."""
        if not self.eval_rounds(server_round):
            return []
        wanted = set(evaluation_partitions(self.num_clients, self.fraction, seed=self.seed, server_round=server_round))
        nodes = sorted((self.partition_of(n), n) for n in grid.get_node_ids())
        config = ConfigRecord({"server-round": server_round})
        return [
            Message(
                content=RecordDict({"arrays": arrays, "config": config}),
                message_type=MessageType.EVALUATE,
                dst_node_id=node,
            )
            for pid, node in nodes
            if pid in wanted
        ]

    def aggregate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Report each client's scores and their summary; the summary is also the returned record."""
        clients, failed = [], []
        for msg in replies:
            pid = self.partition_of(msg.metadata.src_node_id)
            if msg.has_error():
                failed.append({"partition_id": pid, "reason": client_error(msg.error.reason)})
                continue
            metrics = dict(next(iter(msg.content.metric_records.values()), {}))
            acc = metrics.get("eval-accuracy")
            if not isinstance(acc, int | float) or not math.isfinite(acc):
                failed.append({"partition_id": pid, "reason": f"eval-accuracy is {acc!r}"})
                continue
            clients.append(
                {
                    "partition_id": pid,
                    "accuracy": float(acc),
                    "loss": float(metrics.get("eval-loss", math.nan)),
                    "num_examples": int(metrics.get("num-examples", 0)),
                }
            )
        clients.sort(key=lambda c: c["partition_id"])
        if not clients:
            if failed:
                self.report(server_round, {"client_eval_failed": failed})
            return None
        summary = client_accuracy_summary([c["accuracy"] for c in clients])
        self.report(server_round, {**summary, "client_eval": clients, "client_eval_failed": failed})
        log.info(
            "round %d: %d clients on their own rows: mean %.4f, worst 10%% %.4f, std %.4f",
            server_round,
            len(clients),
            summary["client_accuracy_mean"],
            summary["client_accuracy_worst10"],
            summary["client_accuracy_std"],
        )
        return MetricRecord(summary)
