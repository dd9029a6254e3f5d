"""FedAvg over PEFT deltas (McMahan et al. 2017, applied to adapter updates).

Clients send ``delta_i = theta_i - theta`` for the trainable PEFT tensors only; the
server applies

    theta <- theta + server_lr * sum_i(w_i * delta_i) / sum_i(w_i),

with ``w_i = n_i`` (examples seen, ``weighting="examples"``) or ``w_i = 1``
(``weighting="uniform"``). Replies that failed, or whose delta has the wrong keys,
shapes or non-finite values, are logged, recorded and left out; the global state is
never touched by them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft.adapters import DeltaError, State, apply_delta, check_state
from fedpeft.records import record_to_state, state_to_record

log = logging.getLogger(__name__)

NodeSelector = Callable[[int, Grid], list[int]]


def weighted_average(deltas: list[State], weights: list[float]) -> State:
    """``sum_i w_i d_i / sum_i w_i`` per tensor, in float64 then cast to fp32."""
    if not deltas or len(deltas) != len(weights):
        raise ValueError("need one weight per delta and at least one delta")
    total = float(np.sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights sum to {total}; they must be positive")
    return {
        k: (sum(np.float64(w) * d[k].astype(np.float64) for d, w in zip(deltas, weights, strict=False)) / total).astype(
            np.float32
        )
        for k in deltas[0]
    }


class FedAvgPEFT(FedAvg):
    """Flower ``FedAvg`` whose clients return PEFT deltas; nodes come from a selector.

    Parameters
    ----------
    server_lr : float
        Step applied to the averaged delta (1.0 is plain FedAvg).
    weighting : str
        ``"examples"`` (weights ``num-examples``) or ``"uniform"``.
    node_selector : callable, optional
        ``(server_round, grid) -> node ids`` to train this round (the environment's
        participation model). Without it, Flower's own fraction sampling is used.
    partition_of : callable, optional
        Maps a Flower node id to its partition id, for per-client state and reports.
    """

    def __init__(
        self,
        *,
        server_lr: float = 1.0,
        weighting: str = "examples",
        node_selector: NodeSelector | None = None,
        partition_of: Callable[[int], int] | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=min_train_nodes,
            min_available_nodes=min_train_nodes,
        )
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
        self.server_lr = server_lr
        self.weighting = weighting
        self.node_selector = node_selector
        self.partition_of = partition_of or (lambda node_id: node_id)
        self.current: State = {}
        self.round_report: dict[str, list] = {"failed": [], "rejected": [], "aggregated": []}

    #: what the ClientApp does with a train message (see simulations/client_app.py)
    client_mode = "first-order"

    @classmethod
    def from_config(cls, cfg, ctx) -> FedAvgPEFT:
        """Build from an ``ExperimentConfig`` and a :class:`~strategies.base.StrategyContext`."""
        return cls(
            server_lr=cfg.strategy.server_lr,
            weighting=cfg.strategy.weighting,
            node_selector=ctx.node_selector,
            partition_of=ctx.partition_of,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global adapter to this round's online nodes."""
        self.current = record_to_state(arrays)
        config["mode"] = self.client_mode
        if self.node_selector is None:
            return super().configure_train(server_round, arrays, config, grid)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, self.node_selector(server_round, grid), MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply's delta, then apply the weighted average to the global state."""
        accepted = self.accept_replies(server_round, replies)
        if not accepted:
            return None, None
        deltas = [delta for _, delta, _ in accepted]
        weights = self.aggregation_weights(server_round, accepted)
        new_state = apply_delta(self.current, weighted_average(deltas, weights), self.server_lr)
        return state_to_record(new_state), self.summarise_metrics(accepted)

    def aggregation_weights(self, server_round: int, accepted: list[tuple[int, State, dict]]) -> list[float]:
        """Weights ``w_i`` of the accepted replies (examples or uniform)."""
        if self.weighting == "uniform":
            return [1.0] * len(accepted)
        return [float(metrics["num-examples"]) for _, _, metrics in accepted]

    def record_if_failed(self, server_round: int, pid: int, msg: Message) -> bool:
        """Log and record a reply that carries an error instead of content; True if it did."""
        if not msg.has_error():
            return False
        log.warning("round %d: partition %s failed: %s", server_round, pid, msg.error.reason)
        self.round_report["failed"].append({"partition_id": pid, "reason": str(msg.error.reason)[:500]})
        return True

    def accept_replies(self, server_round: int, replies: Iterable[Message]) -> list[tuple[int, State, dict]]:
        """``(partition id, delta, metrics)`` of every valid reply; failures are recorded and logged."""
        self.round_report = {"failed": [], "rejected": [], "aggregated": []}
        shapes = {k: v.shape for k, v in self.current.items()}
        accepted = []
        for msg in replies:
            pid = self.partition_of(msg.metadata.src_node_id)
            if self.record_if_failed(server_round, pid, msg):
                continue
            try:
                if self.arrayrecord_key not in msg.content.array_records:
                    raise DeltaError(f"reply has no {self.arrayrecord_key!r} ArrayRecord")
                delta = record_to_state(msg.content.array_records[self.arrayrecord_key])
                check_state(delta, shapes)
                metrics = dict(next(iter(msg.content.metric_records.values()), {}))
                if self.weighting == "examples" and not metrics.get("num-examples", 0) > 0:
                    raise DeltaError("reply has no positive 'num-examples' metric")
            except DeltaError as err:
                log.warning("round %d: rejected update from partition %s: %s", server_round, pid, err)
                self.round_report["rejected"].append({"partition_id": pid, "reason": str(err)})
                continue
            accepted.append((pid, delta, metrics))
        # Replies arrive in any order; sum in partition order so results are reproducible.
        accepted.sort(key=lambda item: item[0])
        self.round_report["aggregated"] = [pid for pid, _, _ in accepted]
        return accepted

    @staticmethod
    def summarise_metrics(accepted: list[tuple[int, State, dict]]) -> MetricRecord:
        """Example-weighted mean of the clients' numeric train metrics."""
        weights = np.array([float(m.get("num-examples", 1.0)) for _, _, m in accepted])
        keys = sorted({k for _, _, m in accepted for k, v in m.items() if isinstance(v, (int, float))})
        out: dict[str, float] = {}
        for key in keys:
            vals = np.array([float(m.get(key, np.nan)) for _, _, m in accepted])
            ok = np.isfinite(vals)
            if ok.any():
                out[key] = float(np.sum(vals[ok] * weights[ok]) / np.sum(weights[ok]))
        out["num-examples"] = float(weights.sum())
        return MetricRecord(out)
