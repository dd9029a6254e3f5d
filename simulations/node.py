"""What a ClientApp knows about its node: the run's config, its partition, its own data file.

A leaf module (it imports only fedpeft.config) so the ClientApp's handlers, the SPSA
client and the deployment tooling share it without importing each other.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context

from fedpeft.config import ConfigError, ExperimentConfig

#: where a client keeps its DP accountant history (DP-SGD and DPZero) in ``context.state``
DP_STATE_KEY = "dp-accountant"


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


def node_data_path(context: Context) -> str:
    """The node's own training file (``--node-config data-path=...``), or "" to use its partition."""
    return str(context.node_config.get("data-path", ""))
