"""FedAvg over PEFT deltas (McMahan et al. 2017, applied to adapter updates).

Clients send ``delta_i = theta_i - theta`` for the trainable PEFT tensors only; the
server applies

    theta <- theta + server_lr * sum_i c_i delta_i,    c_i = w_i / sum_j w_j,

with ``w_i = n_i`` (examples seen, ``weighting="examples"``) or ``w_i = 1``
(``weighting="uniform"``). :meth:`FedAvgPEFT.coefficients` is the one aggregation hook:
subclasses change the weights (FedAU's omega, the oracle's 1/p_n) or their
normalisation (FedAU divides by N, not by the weight sum), and the DP wrapper calibrates
its noise from the largest ``c_i`` the strategy reports (metric ``max-coefficient``).

Replies that failed, broke the message contract (strategies/base.py), or whose delta
has the wrong keys, shapes or non-finite values, or whose ``num-examples`` is not a
finite positive number, are logged, reported and left out; the global state is never
touched by them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft.records import record_to_state, state_to_record
from fedpeft.state import DeltaError, State, apply_delta, check_metric, check_state, linear_combination
from strategies.base import KIND_DELTA, ContractError, Reporter, client_error, contract_violation, no_report
from strategies.client_drift import ClientDrift
from strategies.client_eval import PerClientEvaluation

log = logging.getLogger(__name__)

NodeSelector = Callable[[int, Grid], list[int]]
Accepted = list[tuple[int, State, dict]]

#: train metrics that mean something when averaged over clients (example-weighted)
MEAN_METRICS = ("train-loss", "train-loss-first", "train-loss-last", "spsa-mean-abs-g")
#: client-reported counts that enter aggregation or reports, and their valid range
MAX_EXAMPLES = 1e12


def weighted_average(deltas: list[State], weights: list[float]) -> State:
    """``sum_i w_i d_i / sum_i w_i`` per tensor, in float64 then cast to fp32."""
    total = float(np.sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights sum to {total}; they must be positive")
    return linear_combination(deltas, list(weights), divisor=total)


class FedAvgPEFT(FedAvg):
    """Flower ``FedAvg`` whose clients return PEFT deltas; nodes come from a selector.

    Parameters
    ----------
    server_lr : float
        Step applied to the aggregated delta (1.0 is plain FedAvg).
    weighting : str
        ``"examples"`` (weights ``num-examples``) or ``"uniform"``.
    node_selector : callable, optional
        ``(server_round, grid) -> node ids`` to train this round (the environment's
        participation model). Without it, Flower's own fraction sampling is used.
    partition_of : callable, optional
        Maps a Flower node id to its partition id, for per-client state and reports.
    report : callable, optional
        Round-report callback ``(server_round, fields)`` (strategies/base.py).
    max_weight : float, optional
        Cap on every aggregation weight (``dp.max-weight``: bounds FedAU's omega under
        client-level DP); ``None`` leaves them as they are.
    """

    #: what the ClientApp does with a train message (see simulations/client_app.py)
    client_mode = "first-order"
    #: what a train reply must carry (the message contract, strategies/base.py)
    expected_kind = KIND_DELTA

    def __init__(
        self,
        *,
        server_lr: float = 1.0,
        weighting: str = "examples",
        node_selector: NodeSelector | None = None,
        partition_of: Callable[[int], int] | None = None,
        report: Reporter | None = None,
        max_weight: float | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        client_drift: ClientDrift | None = None,
        client_evaluation: PerClientEvaluation | None = None,
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
        self.report = report if report is not None else no_report
        self.max_weight = max_weight
        self.current: State = {}
        self.expected: list[int] = []  # partitions sent a train message this round
        self.outcome: dict[str, list] = {"failed": [], "rejected": []}
        self.client_drift = client_drift or ClientDrift()
        self.client_evaluation = client_evaluation
        self._delta_c: dict[int, State] = {}

    @classmethod
    def from_config(cls, cfg, ctx) -> FedAvgPEFT:
        """Build from an ``ExperimentConfig`` and a :class:`~strategies.base.StrategyContext`."""
        return cls(
            server_lr=cfg.strategy.server_lr,
            weighting=cfg.strategy.weighting,
            node_selector=ctx.node_selector,
            partition_of=ctx.partition_of,
            report=ctx.report,
            max_weight=(cfg.dp.max_weight or None) if cfg.dp.mode == "client" else None,
            client_drift=build_client_drift(cfg, ctx),
            client_evaluation=build_client_evaluation(cfg, ctx),
        )

    def summary(self) -> None:
        """Log the strategy's settings (called by ``Strategy.start``)."""
        log.info(
            "%s: server_lr=%g, weighting=%s, replies must carry %r",
            type(self).__name__,
            self.server_lr,
            self.weighting,
            self.expected_kind,
        )

    # --- configure --------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global adapter to this round's online nodes."""
        self.current = record_to_state(arrays)
        config = ConfigRecord(
            {**dict(config), "mode": self.client_mode, "server-round": server_round, **self.client_drift.train_config()}
        )
        extra = self.client_drift.train_arrays(self.current)  # SCAFFOLD's c travels beside the adapter
        if self.node_selector is None and not extra:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        else:
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config, **extra})
            nodes = self.node_selector(server_round, grid) if self.node_selector else sorted(grid.get_node_ids())
            messages = self._construct_messages(record, nodes, MessageType.TRAIN)
        self.expected = [self.partition_of(m.metadata.dst_node_id) for m in messages]
        return messages

    # --- aggregate --------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, then apply ``server_lr * sum_i c_i delta_i`` to the global state."""
        accepted = self.accept_replies(server_round, replies)
        if not accepted:
            self.finish_round(server_round, [])
            return None, None
        weights = self.capped_weights(server_round, accepted)
        new_state, coefficients, stats = self.combine(accepted, weights)
        delta_cs = [self._delta_c[pid] for pid, _, _ in accepted if pid in self._delta_c]  # SCAFFOLD only
        stats = {**stats, **self.client_drift.after_round(delta_cs)}
        metrics = self.summarise_metrics(accepted, coefficients)
        for key, value in stats.items():
            metrics[key] = float(value)
        extras = {**self.round_extras(accepted, [float(w) for w in weights]), **stats}
        self.finish_round(server_round, accepted, train_metrics=dict(metrics), **extras)
        return state_to_record(new_state), metrics

    def combine(self, accepted: Accepted, weights: np.ndarray) -> tuple[State, list[float], dict[str, float]]:
        """``(new global state, c_i, extra round statistics)`` from the accepted deltas and their weights."""
        scale, divisor = self.normalisation(weights)
        update = linear_combination([d for _, d, _ in accepted], list(weights), scale=scale, divisor=divisor)
        return apply_delta(self.current, update, self.server_lr), [float(c) for c in weights * scale / divisor], {}

    def aggregation_weights(self, server_round: int, accepted: Accepted) -> list[float]:
        """Weights ``w_i`` of the accepted replies (examples or uniform)."""
        if self.weighting == "uniform":
            return [1.0] * len(accepted)
        return [float(metrics["num-examples"]) for _, _, metrics in accepted]

    def capped_weights(self, server_round: int, accepted: Accepted) -> np.ndarray:
        """The weights after the ``max_weight`` cap (call once per round: FedAU's intervals advance)."""
        weights = np.asarray(self.aggregation_weights(server_round, accepted), dtype=np.float64)
        return np.minimum(weights, self.max_weight) if self.max_weight else weights

    def coefficients(self, server_round: int, accepted: Accepted) -> list[float]:
        """``c_i`` in ``update = sum_i c_i delta_i``: the (capped) weights, normalised.

        Call once per round: stateful weights (FedAU's intervals) advance when called.
        """
        return [float(c) for c in self.normalise(self.capped_weights(server_round, accepted))]

    def normalisation(self, weights: np.ndarray) -> tuple[float, float]:
        """``(scale, divisor)`` with ``c_i = w_i * scale / divisor``: FedAvg divides by the weight sum."""
        total = float(weights.sum())
        if total <= 0:
            raise ValueError(f"aggregation weights sum to {total}; they must be positive")
        return 1.0, total

    def normalise(self, weights: np.ndarray) -> np.ndarray:
        """The coefficients ``c_i`` of these weights (:meth:`normalisation` applied)."""
        scale, divisor = self.normalisation(np.asarray(weights, dtype=np.float64))
        return np.asarray(weights, dtype=np.float64) * scale / divisor

    def round_extras(self, accepted: Accepted, weights: list[float]) -> dict:
        """Strategy-specific fields for the round report, given the (capped) weights (none for FedAvg)."""
        return {}

    # --- checkpoints (simulations/resume.py) ---------------------------------------------

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """What a resumed run needs beyond the global adapter: JSON fields and named arrays (SCAFFOLD's c)."""
        meta, arrays = self.client_drift.checkpoint_state()
        return ({"client_drift": meta} if meta else {}), arrays

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Undo :meth:`checkpoint_state` (the clients restarted too: they hold nothing)."""
        if "client_drift" in meta:
            self.client_drift.restore_state(meta["client_drift"], arrays)

    # --- per-client evaluation (strategies/client_eval.py) -------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Evaluate messages to this round's drawn clients (none when per-client evaluation is off)."""
        if self.client_evaluation is None:
            return []
        return self.client_evaluation.configure(server_round, arrays, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The clients' own-row accuracies: mean, worst 10%, spread (reported in the round's row)."""
        if self.client_evaluation is None:
            return None
        return self.client_evaluation.aggregate(server_round, replies)

    # --- validation and reports ----------------------------------------------------------

    def accept_replies(self, server_round: int, replies: Iterable[Message]) -> Accepted:
        """``(partition id, delta, metrics)`` of every valid reply, sorted by partition id.

        Failed, contract-breaking and invalid replies are logged and kept in
        ``self.outcome`` for the round report; partitions that were sent a message
        and did not answer are recorded as failed.
        """
        shapes = {k: v.shape for k, v in self.current.items()}

        def parse(msg: Message, metrics: dict) -> State:
            if self.arrayrecord_key not in msg.content.array_records:
                raise DeltaError(f"reply has no {self.arrayrecord_key!r} ArrayRecord")
            delta = record_to_state(msg.content.array_records[self.arrayrecord_key])
            check_state(delta, shapes)
            check_metric(metrics, "num-examples", low=1, high=MAX_EXAMPLES, required=self.weighting == "examples")
            delta_c = self.client_drift.parse_reply(msg, shapes)
            if delta_c is not None:
                self._delta_c[self.partition_of(msg.metadata.src_node_id)] = delta_c
            return delta

        self._delta_c = {}
        return self.screen_replies(server_round, replies, parse)

    def screen_replies(
        self, server_round: int, replies: Iterable[Message], parse: Callable[[Message, dict], object]
    ) -> list[tuple[int, object, dict]]:
        """Shared screening: failures, the contract, then ``parse`` (raises DeltaError to reject)."""
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
                reason = "no reply within simulation.round-timeout-s"
                self.outcome["failed"].append({"partition_id": pid, "reason": reason})
        if contract_breaks and not accepted:
            raise ContractError(self.outcome["rejected"][0]["reason"])
        # Replies arrive in any order; sum in partition order so results are reproducible.
        accepted.sort(key=lambda item: item[0])
        return accepted

    def finish_round(self, server_round: int, accepted: list[tuple[int, object, dict]], **extras) -> None:
        """Send the round report: aggregated, failed and rejected partitions, per-client metrics, extras."""
        clients = [{"partition_id": pid, **_numbers(m)} for pid, _, m in accepted]
        self.report(
            server_round,
            {"aggregated": [pid for pid, _, _ in accepted], **self.outcome, "clients": clients, **extras},
        )

    @staticmethod
    def summarise_metrics(accepted: list[tuple[int, object, dict]], coefficients: list[float]) -> MetricRecord:
        """Train metrics that aggregate meaningfully; per-client values stay in the round report.

        Losses are example-weighted means, ``num-examples`` a sum, ``epsilon`` the maximum;
        ``max-coefficient`` is the largest ``c_i`` (the DP wrapper calibrates noise from it).
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


def build_client_drift(cfg, ctx) -> ClientDrift:
    """FedProx's mu and SCAFFOLD's control variates from ``train.prox-mu`` and ``strategy.control-variates``."""
    return ClientDrift(
        prox_mu=cfg.train.prox_mu, scaffold=cfg.strategy.control_variates == "scaffold", num_clients=ctx.num_clients
    )


def build_client_evaluation(cfg, ctx) -> PerClientEvaluation | None:
    """Per-client evaluation when ``evaluate.fraction-clients`` > 0 (on the rounds the server scores)."""
    if cfg.evaluate.fraction_clients <= 0:
        return None
    every, last = cfg.train.eval_every, cfg.num_rounds
    return PerClientEvaluation(
        fraction=cfg.evaluate.fraction_clients,
        num_clients=ctx.num_clients,
        seed=cfg.seed,
        eval_rounds=lambda r: r % every == 0 or r == last,
        partition_of=ctx.partition_of,
        report=ctx.report,
    )


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "partition-id"}
