"""Flower ClientApp: local PEFT training on this node's partition, reply with the delta.

The same app runs in simulation (Ray actors) and on real SuperNodes. The experiment
config comes from Flower's ``run_config`` (pyproject defaults, ``flwr run
--run-config``), overlaid with the launcher's overrides when built by
:func:`build_client_app`. The node's partition comes from ``node_config``.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.config import ExperimentConfig
from simulations.deploy.warm_worker import make_warm_worker_mod
from simulations.node import DP_STATE_KEY, experiment_config, node_data_path, partition_id
from simulations.quiet import quiet_libraries
from strategies.base import CONTRACT_KEY, KIND_DELTA, contract_record

# torch, transformers, peft and opacus are imported inside the handlers, not here: on a
# SuperNode every message starts a fresh ClientApp process, and with a warm worker
# (simulations/warm_worker.py) that process only forwards the message, so importing them
# here would cost ~1.5 s per message for nothing.

quiet_libraries()


def first_order_train(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """Local first-order steps from the global adapter; reply with the delta."""
    from fedpeft.adapters import num_trainable
    from fedpeft.privacy import history_from_lists, history_to_lists
    from fedpeft.records import record_to_state, state_to_record
    from fedpeft.task import load_task

    pid = partition_id(context, cfg)
    round_ = int(msg.content["config"]["server-round"])
    task = load_task(cfg)
    history = history_from_lists(context.state.config_records.get(DP_STATE_KEY))
    delta, result = task.local_update(
        record_to_state(msg.content["arrays"]), pid, round_, dp_history=history, data_path=node_data_path(context)
    )
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.mean_loss,
            "train-loss-first": result.first_loss,
            "train-loss-last": result.last_loss,
            "num-steps": result.num_steps,
            "partition-id": pid,
            "trainable-params": num_trainable(task.model),
        }
    )
    if result.privacy is not None:  # DP-SGD: keep the accountant across rounds, report epsilon so far
        context.state[DP_STATE_KEY] = ConfigRecord(history_to_lists(result.privacy["history"]))
        for key in ("epsilon", "delta", "noise-multiplier", "sample-rate"):
            metrics[key if key == "epsilon" else f"dp-{key}"] = float(result.privacy[key])
    content = RecordDict(
        {"arrays": state_to_record(delta), "metrics": metrics, CONTRACT_KEY: contract_record(KIND_DELTA)}
    )
    return Message(content, reply_to=msg)


def spsa_train(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """Shared-seed SPSA steps with one-byte codes (simulations/spsa_client.py)."""
    from simulations.spsa_client import spsa_train as run_spsa

    return run_spsa(msg, context, cfg)


# What a train message asks for (its config's "mode", set by the strategy) -> the handler.
TRAIN_MODES = {
    "first-order": first_order_train,
    "spsa": spsa_train,
}


def build_client_app(overrides: dict[str, Any] | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp whose config is ``run_config`` overlaid with ``overrides``; ``mods`` are Flower mods."""
    overrides = dict(overrides or {})
    app = ClientApp(mods=mods or [])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg = experiment_config(context, overrides)
        content = RecordDict({"config": ConfigRecord({"partition-id": partition_id(context, cfg)})})
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedpeft.task import set_threads

        cfg = experiment_config(context, overrides)
        set_threads(cfg.simulation.torch_threads)
        mode = msg.content["config"].get("mode") if "config" in msg.content.config_records else None
        if mode not in TRAIN_MODES:
            raise ValueError(
                f"train message with mode={mode!r}: this ClientApp replies with PEFT deltas, not weights, so it "
                f"only trains for a fedpeft strategy (strategies/, which sets config 'mode' to one of "
                f"{sorted(TRAIN_MODES)}); a stock Flower FedAvg would average deltas as if they were weights"
            )
        return TRAIN_MODES[mode](msg, context, cfg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from fedpeft.adapters import set_adapter_state
        from fedpeft.records import record_to_state
        from fedpeft.task import load_task, set_threads
        from fedpeft.train import evaluate as evaluate_model

        cfg = experiment_config(context, overrides)
        set_threads(cfg.simulation.torch_threads)
        pid = partition_id(context, cfg)
        task = load_task(cfg)
        set_adapter_state(task.model, record_to_state(msg.content["arrays"]))
        loader = task.train_loader(task.client_rows(pid, node_data_path(context)), 0, pid)
        scores = evaluate_model(task.model, loader)
        metrics = MetricRecord(
            {
                "num-examples": int(scores["num_examples"]),
                "eval-loss": scores["loss"],
                "eval-accuracy": scores["accuracy"],
                "partition-id": pid,
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


# On a SuperNode started with --node-config "... warm-worker=true", every message is served by a
# long-lived worker process that keeps the model loaded (simulations/warm_worker.py).
app = build_client_app(mods=[make_warm_worker_mod("simulations.client_app:build_client_app")])
