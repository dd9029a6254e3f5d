"""HetLoRA-style zero padding: clients of unequal LoRA rank share one global adapter.

Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models". The server keeps rank-R factors (R = ``peft.lora-rank``); client k, of rank
r_k (``clients.rank-profile``), receives their first r_k slices (rows of A, columns of B)
and the head, trains them, and returns its delta. The server embeds each delta in rank R
with zeros and averages rank slice j over the clients that have it:

    theta_j <- theta_j + server_lr * sum_{k: r_k > j} c_k^{(j)} delta_{k,j},

``c^{(j)}`` being the strategy's normalised weights over those clients only
(strategies/lora_hetero.py); the head averages over all clients. Every rank uses the
scaling ``lora_alpha / R`` (fedpeft/adapters.py ``use_rank``), so a slice means the same
on every client. Each message carries only its client's arrays, so the byte ledger sees
every client's own rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpeft.ranks import client_ranks
from fedpeft.records import record_to_state, state_to_record
from fedpeft.state import DeltaError, State, apply_delta, check_metric, check_state
from strategies.fedavg import MAX_EXAMPLES, Accepted, FedAvgPEFT
from strategies.lora_hetero import slice_coefficients, slice_rank, state_rank, zero_pad_average


class HetLoRA(FedAvgPEFT):
    """FedAvg over LoRA factors of unequal rank, by zero padding.

    Parameters
    ----------
    ranks : list of int
        LoRA rank of every partition, indexed by partition id (fedpeft/ranks.py).
    max_rank : int, optional
        The global adapter's rank R (``peft.lora-rank``); default ``max(ranks)``.
    **kwargs
        As :class:`~strategies.fedavg.FedAvgPEFT`.
    """

    def __init__(self, *, ranks: list[int], max_rank: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ranks = [int(r) for r in ranks]
        self.max_rank = int(max_rank or max(self.ranks))
        if min(self.ranks) <= 0 or max(self.ranks) > self.max_rank:
            raise ValueError(f"client ranks {self.ranks} must lie in 1..{self.max_rank} (the global rank)")

    @classmethod
    def from_config(cls, cfg, ctx) -> HetLoRA:
        """Ranks from ``ctx.extras["client-ranks"]`` (the ServerApp measures ``mem:`` budgets) or the config."""
        return cls(
            ranks=ctx.extras.get("client-ranks") or client_ranks(cfg),
            max_rank=cfg.peft.lora_rank,
            server_lr=cfg.strategy.server_lr,
            weighting=cfg.strategy.weighting,
            node_selector=ctx.node_selector,
            partition_of=ctx.partition_of,
            report=ctx.report,
        )

    def rank_of(self, partition_id: int) -> int:
        """The LoRA rank of a partition."""
        if not 0 <= partition_id < len(self.ranks):
            raise ValueError(f"partition {partition_id} has no rank; ranks are known for 0..{len(self.ranks) - 1}")
        return self.ranks[partition_id]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send every online client its rank's slice of the global adapter."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        by_rank: dict[int, ArrayRecord] = {}
        out = []
        for msg in messages:
            rank = self.rank_of(self.partition_of(msg.metadata.dst_node_id))
            if rank not in by_rank:
                by_rank[rank] = state_to_record(slice_rank(self.current, rank))
            content = RecordDict(
                {self.arrayrecord_key: by_rank[rank], self.configrecord_key: msg.content[self.configrecord_key]}
            )
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=msg.metadata.dst_node_id))
        return out

    def accept_replies(self, server_round: int, replies: Iterable[Message]) -> Accepted:
        """As FedAvgPEFT, but each delta must have its client's rank's shapes."""

        def parse(msg: Message, metrics: dict) -> State:
            rank = self.rank_of(self.partition_of(msg.metadata.src_node_id))
            if self.arrayrecord_key not in msg.content.array_records:
                raise DeltaError(f"reply has no {self.arrayrecord_key!r} ArrayRecord")
            delta = record_to_state(msg.content.array_records[self.arrayrecord_key])
            check_state(delta, {k: v.shape for k, v in slice_rank(self.current, rank).items()})
            check_metric(metrics, "num-examples", low=1, high=MAX_EXAMPLES, required=self.weighting == "examples")
            metrics["lora-rank"] = rank
            return delta

        return self.screen_replies(server_round, replies, parse)

    def combine(self, accepted: Accepted, weights: np.ndarray) -> tuple[State, list[float], dict[str, float]]:
        """The rank-aware aggregate on the rank-R global state; every partition's rank goes in the report."""
        rule = self.coefficient_rule
        new_state, stats = self.aggregate_factors(accepted, [float(w) for w in weights], rule)
        return new_state, rule([float(w) for w in weights]), stats

    def round_extras(self, accepted: Accepted, weights: list[float]) -> dict:
        """Every partition's LoRA rank."""
        return {**super().round_extras(accepted, weights), "client-ranks": list(self.ranks)}

    def coefficient_rule(self, weights: list[float]) -> list[float]:
        """Coefficients of a subset of the weights (a rank slice's clients), by the strategy's normalisation."""
        return [float(c) for c in self.normalise(np.asarray(weights, dtype=np.float64))]

    def aggregate_factors(self, accepted: Accepted, weights: list[float], rule) -> tuple[State, dict[str, float]]:
        """Zero-padded, per-slice weighted average of the deltas, applied with ``server_lr``."""
        deltas = [d for _, d, _ in accepted]
        update = zero_pad_average(deltas, weights, self.max_rank, coefficients=rule)
        table = slice_coefficients([state_rank(d) for d in deltas], weights, self.max_rank, rule)
        return apply_delta(self.current, update, self.server_lr), {"max-slice-coefficient": float(table.max())}
