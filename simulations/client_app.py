"""Flower ClientApp: local PEFT training on this node's partition, reply with the delta.

The same app runs in simulation (Ray actors) and on real SuperNodes. The experiment
config comes from Flower's ``run_config`` (pyproject defaults, ``flwr run
--run-config``), overlaid with the launcher's overrides when built by
:func:`build_client_app`. The node's partition comes from ``node_config``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedpeft.config import ConfigError, ExperimentConfig
from simulations.cohort import (
    ERROR_KEY,
    client_context,
    cohort_partitions,
    error_record,
    is_cohort,
    num_workers,
    pack,
    save_client_state,
    unpack,
)
from simulations.drift_client import add_scaffold_reply, drift_terms
from simulations.faults import fault_mod
from simulations.node import DP_STATE_KEY, experiment_config, node_data_path, partition_id
from simulations.quiet import quiet_libraries
from simulations.reply import delta_reply

# torch, transformers, peft and opacus are imported inside the handlers, not here: on a
# SuperNode every message starts a fresh ClientApp process, and with a warm worker
# (simulations/deploy/warm_worker.py) that process only forwards the message, so importing them
# here would cost ~1.5 s per message for nothing.

quiet_libraries()
log = logging.getLogger(__name__)


def first_order_train(content: RecordDict, context: Context, cfg: ExperimentConfig) -> RecordDict:
    """Local first-order steps from the global adapter; reply with the delta."""
    from fedpeft.privacy import history_from_lists, history_to_lists
    from fedpeft.records import record_to_state
    from fedpeft.tasks import load_task

    pid = partition_id(context, cfg)
    round_ = int(content["config"]["server-round"])
    task = load_task(cfg)
    history = history_from_lists(context.state.config_records.get(DP_STATE_KEY))
    correction, scaffold = drift_terms(content, context)  # FedProx / SCAFFOLD, when the strategy asks
    cpu_start = time.process_time()
    delta, result = task.local_update(
        record_to_state(content["arrays"]),
        pid,
        round_,
        dp_history=history,
        data_path=node_data_path(context),
        correction=correction,
    )
    cpu_s = time.process_time() - cpu_start
    if result.privacy is not None:  # DP-SGD: keep the accountant across rounds
        context.state[DP_STATE_KEY] = ConfigRecord(history_to_lists(result.privacy["history"]))
    reply = delta_reply(task, pid, delta, result, cpu_s=cpu_s)
    if scaffold is not None:
        delta_c = scaffold.finish(context, delta, num_steps=result.num_steps, lr=cfg.train.lr)
        add_scaffold_reply(reply, delta_c)
    return reply


def spsa_train(content: RecordDict, context: Context, cfg: ExperimentConfig) -> RecordDict:
    """Shared-seed SPSA steps with one-byte codes (simulations/spsa_client.py)."""
    from simulations.spsa_client import spsa_train as run_spsa

    return run_spsa(content, context, cfg)


# What a train message asks for (its config's "mode", set by the strategy) -> the handler.
TRAIN_MODES = {
    "first-order": first_order_train,
    "spsa": spsa_train,
}


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
    """The handshake: this node's partition id (a cohort worker: all of its partitions)."""
    if content["config"].get("query") == "partition-ids":
        return RecordDict({"config": ConfigRecord({"partition-ids": worker_partitions(context, cfg)})})
    return RecordDict({"config": ConfigRecord({"partition-id": partition_id(context, cfg)})})


def evaluate(content: RecordDict, context: Context, cfg: ExperimentConfig) -> RecordDict:
    """Score the global adapter on this client's own held-out rows (fedpeft/holdout.py).

    Without per-client evaluation (``evaluate.fraction-clients = 0``) no client holds rows out,
    and an evaluate message (from a strategy of your own) scores the client's training rows.
    """
    from fedpeft.records import record_to_state
    from fedpeft.tasks import load_task

    pid = partition_id(context, cfg)
    task = load_task(cfg)
    if cfg.evaluate.fraction_clients > 0:
        rows = task.client_holdout(pid, node_data_path(context))
    else:
        rows = task.client_rows(pid, node_data_path(context))
    loader = task.train_loader(rows, 0, pid)
    scores = task.evaluate(record_to_state(content["arrays"]), loader)
    metrics = MetricRecord(
        {
            "num-examples": int(scores["num_examples"]),
            "eval-loss": scores["loss"],
            "eval-accuracy": scores["accuracy"],
            "eval-balanced-accuracy": scores["balanced_accuracy"],
            "partition-id": pid,
        }
    )
    return RecordDict({"metrics": metrics})


def worker_partitions(context: Context, cfg: ExperimentConfig) -> list[int]:
    """The partitions a cohort worker node owns (its node config's partition-id is the worker index)."""
    k, n = cfg.simulation.cohort_size, cfg.partition.num_partitions
    workers = num_workers(n, k)
    if int(context.node_config.get("num-partitions", workers)) != workers:
        raise ConfigError(
            f"simulation.cohort-size={k} puts {n} partitions on {workers} worker nodes, but this node says "
            f"num-partitions={context.node_config.get('num-partitions')}; start {workers} nodes"
        )
    return cohort_partitions(int(context.node_config["partition-id"]), n, k)


def run_cohort(handler, packed: RecordDict, context: Context, cfg: ExperimentConfig) -> RecordDict:
    """Run ``handler`` for every client of a packed cohort, each with its own state; pack the replies.

    First-order train messages without DP-SGD go to :func:`fedpeft.cohort.train_cohort`
    (batched LoRA when ``simulation.cohort-batched``); anything else runs client by client.
    One client's failure is its own error reply; the others go on.
    """
    contents = unpack(packed)
    if handler is train and cfg.dp.mode != "sample" and not node_data_path(context):
        modes = {c["config"].get("mode") for c in contents.values() if "config" in c.config_records}
        if modes == {"first-order"} and all(map(_plain_first_order, contents.values())):
            return pack(train_together(contents, cfg))
    replies = {}
    for pid, content in contents.items():
        client = client_context(context, pid, cfg.partition.num_partitions)
        try:
            replies[pid] = handler(content, client, cfg)
        except Exception as err:  # reported as this client's failure, with its own message
            replies[pid] = RecordDict({ERROR_KEY: error_record(err)})
        save_client_state(context, pid, client)
    return pack(replies)


def _plain_first_order(content: RecordDict) -> bool:
    # FedProx and SCAFFOLD messages train client by client (their gradient terms are per client).
    config = content.config_records.get("config", {})
    return list(content.array_records) == ["arrays"] and not config.get("prox-mu")


def train_together(contents: dict[int, RecordDict], cfg: ExperimentConfig) -> dict[int, RecordDict]:
    """A first-order cohort in one call (fedpeft/cohort.py); a failure fails every client of it."""
    from fedpeft.cohort import train_cohort
    from fedpeft.records import record_to_state
    from fedpeft.tasks import load_task

    task = load_task(cfg)
    jobs = [(record_to_state(c["arrays"]), pid, int(c["config"]["server-round"])) for pid, c in contents.items()]
    cpu_start = time.process_time()
    try:
        outcomes = train_cohort(task, jobs, batched=None if cfg.simulation.cohort_batched else False)
    except Exception as err:  # reported as each client's failure, with the error's own message
        log.exception("cohort training failed")
        return {pid: RecordDict({ERROR_KEY: error_record(err)}) for pid in contents}
    cpu_s = (time.process_time() - cpu_start) / len(jobs)  # a batched cohort's CPU is not separable: split evenly
    return {
        pid: delta_reply(task, pid, delta, result, cpu_s=cpu_s)
        for pid, (delta, result) in zip(contents, outcomes, strict=True)
    }


def build_client_app(overrides: dict[str, Any] | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp whose config is ``run_config`` overlaid with ``overrides``; ``mods`` are Flower mods."""
    overrides = dict(overrides or {})
    app = ClientApp(mods=[*(mods or []), fault_mod(overrides)])

    def serve(handler, msg: Message, context: Context) -> Message:
        from fedpeft.task import set_threads

        cfg = experiment_config(context, overrides)
        if is_cohort(msg.content):  # a worker uses all the cores its resources give it
            set_threads(max(cfg.simulation.torch_threads, int(cfg.simulation.num_cpus_per_client)))
            return Message(run_cohort(handler, msg.content, context, cfg), reply_to=msg)
        set_threads(cfg.simulation.torch_threads)
        try:
            return Message(handler(msg.content, context, cfg), reply_to=msg)
        except Exception as err:  # the reply keeps the client's own error (engines would wrap it)
            log.exception("%s handler failed", msg.metadata.message_type)
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}")
            return Message(error, reply_to=msg)

    app.query()(lambda msg, context: serve(query, msg, context))
    app.train()(lambda msg, context: serve(train, msg, context))
    app.evaluate()(lambda msg, context: serve(evaluate, msg, context))
    return app


def warm_worker(msg: Message, context: Context, call_next) -> Message:
    """On a SuperNode started with --node-config "... warm-worker=true", every message is served by a
    long-lived worker process that keeps the model loaded (simulations/deploy/warm_worker.py).

    The deployment tooling is imported only on such a node: simulations never load it.
    """
    if "warm-worker" not in context.node_config:  # warm_worker.NODE_CONFIG_KEY
        return call_next(msg, context)
    from simulations.deploy.warm_worker import make_warm_worker_mod

    return make_warm_worker_mod("simulations.client_app:build_client_app")(msg, context, call_next)


app = build_client_app(mods=[warm_worker])
