"""One strategy over PEFT deltas, built from parts: a weighting x an aggregator x a server update.

Clients send ``delta_i = theta_i - theta`` for the trainable PEFT tensors only. Each round::

    w      = weighting.weights(accepted)                      examples | uniform | FedAU | oracle 1/p
    w      = min(w, max_weight)                               client-level DP's cap (dp.max-weight)
    agg    = aggregator.aggregate(deltas, w)                  mean | over-N | zero-pad | flex-svd | robust
    theta' = server_update.apply(theta, agg, noise)           sgd | momentum | adam | yogi | adagrad

FedAvg (McMahan et al. 2017) is ``ExampleWeights() x Mean() x Step(lr)``; FedAU (Wang & Ji,
ICLR 2024) is ``FedAUWeights(K) x Mean(num_clients=N) x Step(lr)``; HetLoRA and FlexLoRA
are the ``ZeroPad`` and ``FlexSVD`` aggregators. ``strategies.build_strategy`` wires them
from a config. Client-level DP (strategies/dp.py) wraps this class and calls
:meth:`PeftStrategy.aggregate_round` with a :class:`Privacy` object: it clips copies of the
accepted deltas and draws the noise that enters between aggregation and the server update.

Per-client server state lives in a part, keyed by partition id, and is checkpointed with it
(FedAU's intervals; MIFA / FedVarp's memory of each client's latest delta is an aggregator
part, strategies/memory.py). What a client must receive beyond its view of the adapter
(SCAFFOLD's control variate, FedProx's mu) comes from the ``client_drift`` part
(strategies/client_drift.py) in :meth:`PeftStrategy.configure_train`, and its extra reply
arrays are screened in :meth:`PeftStrategy.accept_replies`. Per-client evaluation
(strategies/client_eval.py) answers Flower's evaluate hooks.

Replies that failed, broke the message contract, or whose delta has the wrong keys, shapes
or non-finite values, or whose ``num-examples`` is not a finite positive number, are
logged, reported and left out (strategies/screening.py). A round the aggregator cannot
aggregate (Krum with ``n < 2f + 3`` replies, e.g. under Bernoulli participation) is refused
with a logged, reported reason; the global state is left as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft.config import ConfigError
from fedpeft.records import record_to_state, state_to_record
from fedpeft.state import DeltaError, State, check_metric, check_state
from strategies.aggregators import Aggregator, Mean
from strategies.base import KIND_DELTA, Reporter
from strategies.client_drift import ClientDrift
from strategies.client_eval import PerClientEvaluation
from strategies.screening import MAX_EXAMPLES, Accepted, ReplyScreen, summarise_metrics
from strategies.server_update import Noise, ServerUpdate, Step
from strategies.weighting import ExampleWeights, Weighting

log = logging.getLogger(__name__)

NodeSelector = Callable[[int, Grid], list[int]]


class Privacy(Protocol):
    """Client-level DP's per-round hooks (implemented by strategies/dp.py's ``ClientLevelDP``)."""

    def clip(self, delta: State) -> State:
        """A clipped copy of an accepted delta."""

    def noise(self, server_round: int, max_coefficient: float) -> Noise:
        """The round's noise, calibrated to the largest aggregation coefficient."""


class PeftStrategy(FedAvg):
    """Flower ``FedAvg`` over PEFT deltas, built from a weighting, an aggregator and a server update.

    Parameters
    ----------
    weighting : Weighting, optional
        ``w_i`` of each accepted client (default: examples).
    aggregator : Aggregator, optional
        Combines the deltas (default: the weighted mean).
    server_update : ServerUpdate, optional
        Moves the global adapter (default: the plain step with lr 1, i.e. FedAvg).
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
    client_drift : ClientDrift, optional
        What the clients' local update is asked to add: FedProx's mu, SCAFFOLD's control
        variates (strategies/client_drift.py); default: plain local steps.
    client_evaluation : PerClientEvaluation, optional
        Per-client evaluation in Flower's evaluate round (strategies/client_eval.py); default: none.
    """

    client_mode = "first-order"
    expected_kind = KIND_DELTA

    def __init__(
        self,
        *,
        weighting: Weighting | None = None,
        aggregator: Aggregator | None = None,
        server_update: ServerUpdate | None = None,
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
        self.weighting = weighting if weighting is not None else ExampleWeights()
        self.aggregator = aggregator if aggregator is not None else Mean()
        self.server_update = server_update if server_update is not None else Step()
        if self.aggregator.refactorises and self.server_update.stateful:
            raise ConfigError(
                f"strategy.server-optimizer={self.server_update.name!r} keeps moments across rounds, but the "
                f"{self.aggregator.name!r} aggregator re-factorises the adapter every round, so moments over its "
                "factors mean nothing; use strategy.server-optimizer='sgd'"
            )
        self.node_selector = node_selector
        self.partition_of = partition_of or (lambda node_id: node_id)
        self.screen = ReplyScreen(expected_kind=self.expected_kind, partition_of=self.partition_of, report=report)
        self.max_weight = max_weight
        self.client_drift = client_drift if client_drift is not None else ClientDrift()
        self.client_evaluation = client_evaluation
        self.current: State = {}
        self._delta_c: dict[int, State] = {}  # SCAFFOLD's delta c_i of this round's accepted replies

    @property
    def server_lr(self) -> float:
        """The server update's learning rate."""
        return self.server_update.lr

    def summary(self) -> None:
        """Log the parts (called by ``Strategy.start``)."""
        log.info(
            "PeftStrategy: weighting=%s, aggregator=%s, server update=%s (lr %g), clients: %s, replies must carry %r",
            self.weighting.name,
            self.aggregator.name,
            self.server_update.name,
            self.server_lr,
            self.client_drift.describe(),
            self.expected_kind,
        )

    def client_dp_refusal(self) -> str:
        """Client-level DP needs a sensitivity bound; the robust and rank-sliced aggregators have none."""
        if not self.aggregator.bounded:
            return (
                f"client-level DP calibrates its noise to the aggregate's sensitivity; the "
                f"{self.aggregator.name!r} aggregator has no bound (use strategy.aggregator='mean')"
            )
        return ""

    # --- configure --------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send this round's online nodes their view of the global adapter."""
        self.current = record_to_state(arrays)
        config = ConfigRecord(
            {**dict(config), "mode": self.client_mode, "server-round": server_round, **self.client_drift.train_config()}
        )
        extra = self.client_drift.train_arrays(self.current)  # SCAFFOLD's c travels beside the adapter
        if self.node_selector is None:
            sampled = list(super().configure_train(server_round, arrays, config, grid))
            nodes = [m.metadata.dst_node_id for m in sampled]
        else:
            nodes = self.node_selector(server_round, grid)
        views: dict[object, ArrayRecord] = {}
        messages = []
        for node in nodes:
            pid = self.partition_of(node)
            key = self.aggregator.view_key(pid)
            if key not in views:  # the whole adapter goes as received; a view is serialised once
                views[key] = arrays if key is None else state_to_record(self.aggregator.view(self.current, pid))
            content = RecordDict({self.arrayrecord_key: views[key], self.configrecord_key: config, **extra})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self.screen.sent(messages)
        return messages

    # --- aggregate --------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, aggregate the accepted deltas, apply the server update."""
        return self.aggregate_round(server_round, replies)

    def aggregate_round(
        self, server_round: int, replies: Iterable[Message], privacy: Privacy | None = None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """:meth:`aggregate_train` with client-level DP's clipping and noise when ``privacy`` is given."""
        accepted = self.accept_replies(server_round, replies)
        if not accepted:
            self.screen.finish(server_round, [])
            return None, None
        refused = self.aggregator.refusal(len(accepted))
        if refused:
            log.warning("round %d refused: %s; the global adapter is unchanged", server_round, refused)
            self.screen.finish(server_round, [], refused=refused)
            return None, None
        participants = [pid for pid, _, _ in accepted]
        deltas = [d for _, d, _ in accepted]
        if privacy is not None:
            deltas = [privacy.clip(d) for d in deltas]
        weights = self.weighting.weights(server_round, participants, [m for _, _, m in accepted])
        if self.max_weight:
            weights = np.minimum(weights, self.max_weight)
        result = self.aggregator.aggregate(self.current, participants, deltas, weights)
        noise = None
        if privacy is not None:
            if result.max_coefficient is None:
                raise ConfigError(self.client_dp_refusal() or "client-level DP: the aggregate has no sensitivity bound")
            noise = privacy.noise(server_round, result.max_coefficient)
        new_state = self.server_update.apply(self.current, result, noise)
        drift_stats = self.client_drift.after_round(
            [self._delta_c[pid] for pid in participants if pid in self._delta_c]
        )
        metrics = summarise_metrics(accepted, result.coefficients)
        for key, value in result.stats.items():
            metrics[key] = float(value)
        extras = {
            **self.weighting.round_extras(participants, weights),
            **self.aggregator.round_extras(),
            **result.stats,
            **drift_stats,
        }
        self.screen.finish(server_round, accepted, train_metrics=dict(metrics), **extras)
        return state_to_record(new_state), metrics

    def accept_replies(self, server_round: int, replies: Iterable[Message]) -> Accepted:
        """``(partition id, delta, metrics)`` of every valid reply, sorted by partition id."""

        def parse(msg: Message, metrics: dict) -> State:
            pid = self.partition_of(msg.metadata.src_node_id)
            if self.arrayrecord_key not in msg.content.array_records:
                raise DeltaError(f"reply has no {self.arrayrecord_key!r} ArrayRecord")
            delta = record_to_state(msg.content.array_records[self.arrayrecord_key])
            view = self.aggregator.view(self.current, pid)
            check_state(delta, {k: v.shape for k, v in view.items()})
            check_metric(metrics, "num-examples", low=1, high=MAX_EXAMPLES, required=self.weighting.needs_examples)
            delta_c = self.client_drift.parse_reply(msg, {k: v.shape for k, v in view.items()})
            metrics.update(self.aggregator.client_fields(pid))
            if delta_c is not None:
                self._delta_c[pid] = delta_c
            return delta

        self._delta_c = {}
        return self.screen.screen(server_round, replies, parse)

    # --- state: checkpoints (simulations/resume.py) and results.json --------------------

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Every part's state: the weighting's (FedAU's intervals), the aggregator's (MIFA / FedVarp memory),
        the server update's moments and SCAFFOLD's server control variate."""
        update_meta, update_arrays = self.server_update.checkpoint_state()
        meta = {"weighting": self.weighting.checkpoint_state(), "server_update": update_meta}
        arrays = {f"server_update/{k}": v for k, v in update_arrays.items()}
        for name, part in (("aggregator", self.aggregator), ("client_drift", self.client_drift)):
            part_meta, part_arrays = part.checkpoint_state()
            if part_meta or part_arrays:  # stateless parts add nothing: default checkpoints keep their bytes
                meta[name] = part_meta
                arrays.update({f"{name}/{k}": v for k, v in part_arrays.items()})
        return meta, arrays

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Undo :meth:`checkpoint_state` (the clients restarted too: they hold nothing)."""
        self.weighting.restore_state(meta["weighting"])

        def under(prefix: str) -> dict[str, np.ndarray]:
            return {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}

        self.server_update.restore_state(meta["server_update"], under("server_update/"))
        for name, part in (("aggregator", self.aggregator), ("client_drift", self.client_drift)):
            if name in meta:
                part.restore_state(meta[name], under(f"{name}/"))

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

    def state_for_results(self) -> dict:
        """The weighting's state (FedAU's intervals, the oracle's p_n); ``{}`` for stateless parts."""
        return self.weighting.state_for_results()
