"""The allowed values of the config's string fields, and the error a bad setting raises.

A leaf module (it imports nothing from the project) so that both ``fedpeft/config.py``, which
re-exports these names, and ``fedpeft/validation.py``, which checks against them, can import it
without importing each other.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""


# Allowed values for string fields: "<section>.<field>" -> choices.
FAULT_KINDS = ("crash", "hang", "nan", "inf", "shape", "metrics", "slow", "scaled", "sign-flip", "noise")
#: the fault kinds a Byzantine client applies to its delta (simulations/faults.py)
BYZANTINE_KINDS = ("scaled", "sign-flip", "noise")

CHOICES: dict[str, tuple[str, ...]] = {
    "model.quantization": ("none", "int8", "nf4"),
    "model.device": ("auto", "cpu", "cuda"),
    "model.pooling": ("head", "mean"),
    "model.head-init": ("random", "prompts"),
    "model.compute-dtype": ("auto", "float32", "bfloat16", "float16"),
    "peft.method": ("lora", "ia3", "prompt", "bitfit", "head", "full", "lst"),
    "peft.lora-variant": ("lora", "ffa"),
    "partition.scheme": (
        "iid",
        "dirichlet",
        "natural-id",
        "shard",
        "pathological",
        "inner-dirichlet",
        "size-linear",
        "size-square",
        "size-exponential",
    ),
    "participation.model": ("always", "uniform", "bernoulli", "markov", "cyclic", "trace"),
    "participation.p-source": ("constant", "list", "uniform", "label-correlated"),
    "train.optimizer": ("adamw", "sgd"),
    "train.prefix-cache": ("auto", "off"),
    "strategy.name": ("fedavg", "fedau", "known_p_oracle", "spsa", "hetlora", "flexlora"),
    "strategy.weighting": ("examples", "uniform"),
    "dp.mode": ("none", "sample", "client"),
    "dp.grad-sample-mode": ("hooks", "functorch"),
    "spsa.codec": ("int8", "log8"),
    "spsa.scale-rule": ("median", "fixed"),
    "spsa.lr-schedule": ("constant", "inverse-sqrt"),
    "spsa.distribution": ("gaussian", "rademacher"),
    "strategy.server-optimizer": ("sgd", "momentum", "adam", "yogi", "adagrad"),
    "strategy.aggregator": ("mean", "median", "trimmed-mean", "krum", "mifa", "fedvarp"),
    "strategy.control-variates": ("none", "scaffold"),
    "task.kind": ("classification", "causal-lm"),
    "faults.byzantine-kind": BYZANTINE_KINDS,
    "tracking.backend": ("none", "tensorboard", "mlflow"),
}
