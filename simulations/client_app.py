"""Flower ClientApp: one client's handlers (train per mode, query, evaluate) behind Flower mods.

The same app runs in simulation (Ray actors) and on real SuperNodes. The config is Flower's
``run_config`` overlaid with the launcher's overrides (:func:`build_client_app`); the partition
comes from ``node_config``. Mods, outermost first: the warm-worker forwarder (deployment), the
cohort mod (simulations/cohort_worker.py: a cohort worker calls the rest once per client), the
caller's mods, fault injection (simulations/faults.py); the handlers only ever see one client.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedpeft.config import ExperimentConfig
from simulations.cohort_worker import cohort_mod
from simulations.drift_client import add_scaffold_reply, drift_terms
from simulations.faults import fault_mod
from simulations.node import DP_STATE_KEY, experiment_config, node_data_path, partition_id
from simulations.quiet import quiet_libraries
from simulations.reply import delta_reply, eval_reply

# torch, transformers, peft and opacus are imported inside the handlers: on a SuperNode every message
# starts a fresh process, which with a warm worker only forwards it (~1.5 s per message saved).

quiet_libraries()
log = logging.getLogger(__name__)


def first_order_train(content: RecordDict, context: Context, cfg: ExperimentConfig) -> RecordDict:
    """Local first-order steps from the global adapter; reply with the delta."""
    from fedpeft.privacy import history_from_lists, history_to_lists
    from fedpeft.records import record_to_state
    from fedpeft.tasks import load_task

    pid, round_, task = partition_id(context, cfg), int(content["config"]["server-round"]), load_task(cfg)
    history = history_from_lists(context.state.config_records.get(DP_STATE_KEY))
    correction, scaffold = drift_terms(content, context)  # FedProx / SCAFFOLD, when the strategy asks
    cpu_start = time.process_time()
    state, data_path = record_to_state(content["arrays"]), node_data_path(context)
    delta, result = task.local_update(
        state, pid, round_, dp_history=history, data_path=data_path, correction=correction
    )
    cpu_s = time.process_time() - cpu_start
    if result.privacy is not None:  # DP-SGD: keep the accountant across rounds
        context.state[DP_STATE_KEY] = ConfigRecord(history_to_lists(result.privacy["history"]))
    reply = delta_reply(task, pid, delta, result, cpu_s=cpu_s)
    if scaffold is not None:  # SCAFFOLD: the client's control variate moves; delta c_i travels with the delta
        add_scaffold_reply(reply, scaffold.finish(context, delta, num_steps=result.num_steps, lr=cfg.train.lr))
    return reply


def spsa_train(content: RecordDict, context: Context, cfg: ExperimentConfig) -> RecordDict:
    """Shared-seed SPSA steps with one-byte codes (simulations/spsa_client.py)."""
    from simulations.spsa_client import spsa_train as run_spsa

    return run_spsa(content, context, cfg)


# What a train message asks for (its config's "mode", set by the strategy) -> the handler.
TRAIN_MODES = {"first-order": first_order_train, "spsa": spsa_train}


def train(content: RecordDict, context: Context, cfg: ExperimentConfig) -> RecordDict:
    """The train handler: the mode the strategy asked for, or a refusal naming the contract."""
    mode = content["config"].get("mode") if "config" in content.config_records else None
    if mode not in TRAIN_MODES:
        raise ValueError(
            f"train message with mode={mode!r}: this ClientApp replies with PEFT deltas, not weights, so it "
            f"only trains for a fedpeft strategy (strategies/, which sets config 'mode' to one of "
            f"{sorted(TRAIN_MODES)}); a stock Flower FedAvg would average deltas as if they were weights"
        )
    return TRAIN_MODES[mode](content, context, cfg)


def query(content: RecordDict, context: Context, cfg: ExperimentConfig) -> RecordDict:
    """The handshake: this node's partition id (a cohort worker's partitions: simulations/cohort_worker.py)."""
    return RecordDict({"config": ConfigRecord({"partition-id": partition_id(context, cfg)})})


def evaluate(content: RecordDict, context: Context, cfg: ExperimentConfig) -> RecordDict:
    """Score the global adapter on this client's held-out rows (fedpeft/holdout.py); its training rows
    when no client holds rows out (``evaluate.fraction-clients = 0``, a strategy of your own asking)."""
    from fedpeft.records import record_to_state
    from fedpeft.tasks import load_task

    pid, task = partition_id(context, cfg), load_task(cfg)
    held_out = cfg.evaluate.fraction_clients > 0
    rows = (task.client_holdout if held_out else task.client_rows)(pid, node_data_path(context))
    scores = task.evaluate(record_to_state(content["arrays"]), task.train_loader(rows, 0, pid))
    return eval_reply(pid, scores)


def build_client_app(overrides: dict[str, Any] | None = None, mods: list | None = None, node_mods=()) -> ClientApp:
    """A ClientApp whose config is ``run_config`` overlaid with ``overrides``; ``mods`` see one client's
    message (in a cohort worker, each client's), ``node_mods`` the node's (the warm-worker forwarder)."""
    overrides = dict(overrides or {})
    cohorts = cohort_mod(overrides, per_client_mods=bool(mods))
    app = ClientApp(mods=[*node_mods, cohorts, *(mods or []), fault_mod(overrides)])

    def serve(handler, msg: Message, context: Context) -> Message:
        try:
            return Message(handler(msg.content, context, experiment_config(context, overrides)), reply_to=msg)
        except Exception as err:  # the reply keeps the client's own error (engines would wrap it)
            log.exception("%s handler failed", msg.metadata.message_type)
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}")
            return Message(error, reply_to=msg)

    app.query()(lambda msg, context: serve(query, msg, context))
    app.train()(lambda msg, context: serve(train, msg, context))
    app.evaluate()(lambda msg, context: serve(evaluate, msg, context))
    return app


def warm_worker(msg: Message, context: Context, call_next) -> Message:
    """With --node-config "... warm-worker=true", forward to a long-lived worker process that keeps the
    model loaded (simulations/deploy/warm_worker.py, imported only on such a node)."""
    if "warm-worker" not in context.node_config:  # warm_worker.NODE_CONFIG_KEY
        return call_next(msg, context)
    from simulations.deploy.warm_worker import make_warm_worker_mod

    return make_warm_worker_mod("simulations.client_app:build_client_app")(msg, context, call_next)


app = build_client_app(node_mods=[warm_worker])
