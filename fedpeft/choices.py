"""The vocabulary of a setting: its allowed values, its help and range, and the error a bad one raises.

A leaf module (it imports nothing from the project) so that ``fedpeft/config.py``, the section
modules and ``fedpeft/validation.py`` can all import it without importing each other.

Each string choice is a ``Literal`` here, and :data:`CHOICES` is derived from those Literals
(one source of truth): a field typed ``Quantization`` accepts exactly ``CHOICES["model.quantization"]``.
Each field is declared with :func:`setting`: default, help text (units, range, what it does) and,
for numbers, a range rule that :func:`fedpeft.validation.validate` checks and ``fedpeft config`` shows.
"""

from __future__ import annotations

import re
from dataclasses import field
from typing import Any, Literal, get_args


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""


def setting(default: Any, help: str, rule: str = "") -> Any:  # noqa: A002 (peft's metadata key is "help")
    """A dataclass field with its help text and optional range rule (peft's ``metadata={"help": ...}``).

    ``rule``: ``"> 0"``, ``">= 1"``, ``"< 65535"``, ``"in (0, 1]"``, ``"in [0, 0.5)"``, optionally
    followed by a parenthesised note (``">= 0 (0 = all)"``); :func:`rule_holds` checks it.
    """
    return field(default=default, metadata={"help": help, "rule": rule})


_BOUND = re.compile(r"^(>=|<=|>|<)\s*(-?[\d.e+-]+)")
_INTERVAL = re.compile(r"^in\s*([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])")


def rule_holds(rule: str, value: float) -> bool:
    """Whether ``value`` satisfies a :func:`setting` rule (its leading comparison or interval)."""
    if m := _BOUND.match(rule):
        op, bound = m.group(1), float(m.group(2))
        return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]
    if m := _INTERVAL.match(rule):
        low, high = float(m.group(2)), float(m.group(3))
        above = value >= low if m.group(1) == "[" else value > low
        below = value <= high if m.group(4) == "]" else value < high
        return above and below
    raise ValueError(f"unreadable range rule {rule!r}")  # a typo in a field declaration, not user input


# The string choices. A new choice is one more word in its Literal.
TaskKind = Literal["classification", "causal-lm"]
Quantization = Literal["none", "int8", "nf4"]
Device = Literal["auto", "cpu", "cuda"]
Pooling = Literal["head", "mean"]
HeadInit = Literal["random", "prompts"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
PeftMethod = Literal["lora", "ia3", "prompt", "bitfit", "head", "full", "lst"]
LoraVariant = Literal["lora", "ffa"]
PartitionScheme = Literal[
    "iid",
    "dirichlet",
    "natural-id",
    "shard",
    "pathological",
    "inner-dirichlet",
    "size-linear",
    "size-square",
    "size-exponential",
]
ParticipationModel = Literal["always", "uniform", "bernoulli", "markov", "cyclic", "trace"]
PSource = Literal["constant", "list", "uniform", "label-correlated"]
Optimizer = Literal["adamw", "sgd"]
PrefixCache = Literal["auto", "off"]
StrategyName = Literal["fedavg", "fedau", "known_p_oracle", "spsa", "hetlora", "flexlora"]
Weighting = Literal["examples", "uniform"]
ControlVariates = Literal["none", "scaffold"]
ServerOptimizer = Literal["sgd", "momentum", "adam", "yogi", "adagrad"]
Aggregator = Literal["mean", "median", "trimmed-mean", "krum", "mifa", "fedvarp"]
DPMode = Literal["none", "sample", "client"]
GradSampleMode = Literal["hooks", "functorch"]
SpsaCodec = Literal["int8", "log8"]
ScaleRule = Literal["median", "fixed"]
LrSchedule = Literal["constant", "inverse-sqrt"]
Distribution = Literal["gaussian", "rademacher"]
ByzantineKind = Literal["scaled", "sign-flip", "noise"]
TrackingBackend = Literal["none", "tensorboard", "mlflow"]

#: the fault kinds a Byzantine client applies to its delta (simulations/faults.py)
BYZANTINE_KINDS: tuple[str, ...] = get_args(ByzantineKind)
FAULT_KINDS = ("crash", "hang", "nan", "inf", "shape", "metrics", "slow", *BYZANTINE_KINDS)

#: flat key -> allowed values, read off the Literals above (tests/test_config.py checks that each
#: Literal-typed field is listed here under its own key)
CHOICES: dict[str, tuple[str, ...]] = {
    key: get_args(literal)
    for key, literal in {
        "task.kind": TaskKind,
        "model.quantization": Quantization,
        "model.device": Device,
        "model.pooling": Pooling,
        "model.head-init": HeadInit,
        "model.compute-dtype": ComputeDtype,
        "peft.method": PeftMethod,
        "peft.lora-variant": LoraVariant,
        "partition.scheme": PartitionScheme,
        "participation.model": ParticipationModel,
        "participation.p-source": PSource,
        "train.optimizer": Optimizer,
        "train.prefix-cache": PrefixCache,
        "strategy.name": StrategyName,
        "strategy.weighting": Weighting,
        "strategy.control-variates": ControlVariates,
        "strategy.server-optimizer": ServerOptimizer,
        "strategy.aggregator": Aggregator,
        "dp.mode": DPMode,
        "dp.grad-sample-mode": GradSampleMode,
        "spsa.codec": SpsaCodec,
        "spsa.scale-rule": ScaleRule,
        "spsa.lr-schedule": LrSchedule,
        "spsa.distribution": Distribution,
        "faults.byzantine-kind": ByzantineKind,
        "tracking.backend": TrackingBackend,
    }.items()
}
