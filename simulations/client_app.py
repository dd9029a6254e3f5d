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

from fedpeft.adapters import num_trainable, set_adapter_state
from fedpeft.config import ConfigError, ExperimentConfig
from fedpeft.records import record_to_state, state_to_record
from fedpeft.task import load_task, set_threads
from fedpeft.train import evaluate as evaluate_model
from simulations.quiet import quiet_libraries

quiet_libraries()


def experiment_config(context: Context, overrides: dict[str, Any]) -> ExperimentConfig:
    """The run's config: Flower's run_config overlaid with the launcher's overrides."""
    return ExperimentConfig.from_flat({**dict(context.run_config), **overrides})


def partition_id(context: Context, cfg: ExperimentConfig) -> int:
    """This node's partition id, checked against the config."""
    if "partition-id" not in context.node_config:
        raise ConfigError(
            "this SuperNode has no 'partition-id' in its node config; start it with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        )
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config.get("num-partitions", cfg.partition.num_partitions))
    if num != cfg.partition.num_partitions:
        raise ConfigError(
            f"node config says num-partitions={num} but the experiment has "
            f"partition.num-partitions={cfg.partition.num_partitions}; make them equal"
        )
    return pid


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
        cfg = experiment_config(context, overrides)
        set_threads(cfg.simulation.torch_threads)
        pid = partition_id(context, cfg)
        round_ = int(msg.content["config"]["server-round"])
        task = load_task(cfg)
        delta, result = task.local_update(record_to_state(msg.content["arrays"]), pid, round_)
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
        return Message(RecordDict({"arrays": state_to_record(delta), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = experiment_config(context, overrides)
        set_threads(cfg.simulation.torch_threads)
        pid = partition_id(context, cfg)
        task = load_task(cfg)
        set_adapter_state(task.model, record_to_state(msg.content["arrays"]))
        loader = task.train_loader(task.partition(pid), 0, pid)
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


app = build_client_app()
