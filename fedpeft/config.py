"""One validated configuration object for an experiment.

Frozen dataclasses, one per concern (fedpeft/config_sections.py), and for the sections with
modes one per mode (fedpeft/config_variants.py: ``cfg.dp`` is a ``NoPrivacy``,
``SamplePrivacy`` or ``ClientPrivacy``). Every field carries its default, help text and range
(:func:`fedpeft.choices.setting`); :data:`KEYS` lists them all, ``fedpeft config`` prints them.

Flower's ``run_config`` is a flat ``{key: scalar}`` mapping, so each field has a flat key:
``<section>.<field-name>`` (``train.lr``, ``peft.lora-rank``) or, for the top-level fields,
just ``<field-name>`` (``num-rounds``). TOML files may write the sections as tables; they are
flattened the same way Flower flattens them, and a key given twice in any form is refused.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`, whose message
names the key and the valid choices. A setting of a switched-off mode has no field to go in:
:meth:`ExperimentConfig.from_flat` leaves it out, and ``fedpeft check`` refuses it
(fedpeft/dead_settings.py).

Adding a key: one ``name: Type = setting(default, "help", "range")`` line in its section's
dataclass, and the flat key with the same default in pyproject.toml's ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

# The allowed values and the error type live in a leaf module that validation.py imports too;
# re-exported here for callers, as are the sections.
from fedpeft.choices import BYZANTINE_KINDS, CHOICES, FAULT_KINDS, ConfigError, setting  # noqa: F401
from fedpeft.config_sections import (
    ClientsConfig,
    DataConfig,
    EvaluateConfig,
    FaultsConfig,
    ModelConfig,
    PartitionConfig,
    PeftConfig,
    SimulationConfig,
    SpsaConfig,
    StrategyConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
)
from fedpeft.config_variants import (  # noqa: F401
    DP,
    PARTICIPATION,
    AlwaysParticipation,
    BernoulliParticipation,
    ClientPrivacy,
    CyclicParticipation,
    DPConfig,
    MarkovParticipation,
    NoPrivacy,
    ParticipationConfig,
    SamplePrivacy,
    TraceParticipation,
    UniformParticipation,
    Variants,
)

Scalar = bool | int | float | str

#: section name -> its dataclass, or its :class:`Variants` (a dataclass per mode)
SECTIONS: dict[str, type | Variants] = {
    "task": TaskConfig,
    "model": ModelConfig,
    "peft": PeftConfig,
    "data": DataConfig,
    "partition": PartitionConfig,
    "participation": PARTICIPATION,
    "train": TrainConfig,
    "strategy": StrategyConfig,
    "dp": DP,
    "spsa": SpsaConfig,
    "simulation": SimulationConfig,
    "clients": ClientsConfig,
    "faults": FaultsConfig,
    "tracking": TrackingConfig,
    "evaluate": EvaluateConfig,
}
VARIANT_SECTIONS: dict[str, Variants] = {n: s for n, s in SECTIONS.items() if isinstance(s, Variants)}


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs; ``to_flat()`` of it is written beside the results."""

    name: str = setting("quickstart", "the experiment's name: runs/<name>/seed-<seed>, plot titles, trackers")
    seed: int = setting(0, "the root of every random draw (fedpeft.rng.derive_seed)", ">= 0")
    num_rounds: int = setting(5, "federated rounds", ">= 1")
    out_dir: str = setting(
        "",
        'run folder for results.json; "" = runs/<name>/seed-<seed> under the ServerApp\'s working directory '
        "(on a SuperLink: where flower-superlink was started); never changes numerics",
    )
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    participation: ParticipationConfig = field(default_factory=UniformParticipation)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    dp: DPConfig = field(default_factory=NoPrivacy)
    spsa: SpsaConfig = field(default_factory=SpsaConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        from fedpeft.validation import validate  # a module of its own: validation.py

        validate(self)

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> ExperimentConfig:
        """Build from flat keys (Flower run_config); missing keys take their defaults.

        A section with modes becomes the variant its switch names; keys of the other modes have
        no field there and are left out (``fedpeft check`` refuses them when they are not defaults).
        """
        unknown = [k for k in flat if k not in KEYS]
        if unknown:
            raise ConfigError("; ".join(_unknown_message(k) for k in sorted(unknown)))
        per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        top: dict[str, Any] = {}
        for key, value in flat.items():
            value = _coerce(key, value, KEYS[key].type)
            section, _, attr = key.rpartition(".")
            target = per_section[section] if section else top
            target[attr.replace("-", "_")] = value
        sections = {name: _build_section(name, kw) for name, kw in per_section.items()}
        return cls(**top, **sections)

    def to_flat(self) -> dict[str, Scalar]:
        """Flat ``{key: scalar}`` view, the inverse of :meth:`from_flat` (the chosen variants' keys only)."""
        flat: dict[str, Scalar] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECTIONS:
                for g in dataclasses.fields(value):
                    flat[f"{f.name}.{g.name.replace('_', '-')}"] = getattr(value, g.name)
            else:
                flat[f.name.replace("_", "-")] = value
        return flat

    def replace(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """A copy with some flat keys changed (validated like ``from_flat``)."""
        return ExperimentConfig.from_flat({**self.to_flat(), **overrides})


def _build_section(name: str, kw: dict[str, Any]) -> Any:
    spec = SECTIONS[name]
    if not isinstance(spec, Variants):
        return spec(**kw)
    mode = kw.get(spec.switch, spec.default)
    if mode not in spec.classes:
        choices = ", ".join(spec.classes)
        raise ConfigError(f"config key '{name}.{spec.switch.replace('_', '-')}' is {mode!r}; valid choices: {choices}")
    live = {f.name for f in dataclasses.fields(spec.classes[mode])}
    return spec.build(**{k: v for k, v in kw.items() if k in live})


@dataclass(frozen=True)
class Key:
    """One flat config key: where it lives, its type, default, help and range, and the modes that have it."""

    name: str
    type: Any
    default: Scalar
    help: str
    rule: str = ""
    choices: tuple[str, ...] = ()
    #: for a key of a section with modes: (switch key, the modes whose variant has it)
    modes: tuple[str, tuple[str, ...]] | None = None


def _keys_of(section: str, cls: type) -> dict[str, Key]:
    hints = get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        name = f"{section}.{f.name.replace('_', '-')}" if section else f.name.replace("_", "-")
        if name in SECTIONS:
            continue
        want = hints[f.name]
        choices = typing.get_args(want) if typing.get_origin(want) is Literal else ()
        found[name] = Key(name, want, f.default, f.metadata.get("help", ""), f.metadata.get("rule", ""), choices)
    return found


def _build_keys() -> dict[str, Key]:
    keys = _keys_of("", ExperimentConfig)
    for section, spec in SECTIONS.items():
        if not isinstance(spec, Variants):
            keys.update(_keys_of(section, spec))
            continue
        switch = f"{section}.{spec.switch.replace('_', '-')}"
        for cls in spec.classes.values():
            for name, key in _keys_of(section, cls).items():
                modes = None if name == switch else (switch, spec.modes_with(name.split(".")[1].replace("-", "_")))
                if name == switch:  # each variant's switch is a one-value Literal; the key takes them all
                    key = dataclasses.replace(key, type=str, default=spec.default, choices=tuple(spec.classes))
                keys.setdefault(name, dataclasses.replace(key, modes=modes))
    return keys


#: every flat key, in declaration order (a section with modes: each key once, with the modes that have it)
KEYS: dict[str, Key] = _build_keys()
#: flat key -> default, for every key (``ExperimentConfig().to_flat()`` holds the default modes' keys only)
DEFAULTS: dict[str, Scalar] = {name: key.default for name, key in KEYS.items()}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested TOML tables to dotted keys, as Flower does for run_config."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        for flat_key, leaf in (flatten(value, f"{full}.") if isinstance(value, dict) else {full: value}).items():
            if flat_key in flat:  # "train.lr" = 0.1 and [train] lr = 0.2: TOML allows both, we cannot pick
                section, _, name = flat_key.rpartition(".")
                raise ConfigError(
                    f'config key {flat_key!r} is given twice (as "{flat_key}" and as {name} in a [{section}] '
                    f"table, {flat[flat_key]!r} and {leaf!r}); keep one"
                )
            flat[flat_key] = leaf
    return flat


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read an experiment TOML file, apply ``overrides`` and validate."""
    return ExperimentConfig.from_flat({**read_config_file(path), **(overrides or {})})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The flat keys of an experiment TOML file, unvalidated; errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder; pass one of its .toml files" if path.is_dir() else "not found"
        raise ConfigError(f"config file {str(path)!r} {what}; see simulations/configs/ for examples")
    try:
        flat = flatten(tomllib.loads(path.read_bytes().decode("utf-8")))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, OSError) as err:
        raise ConfigError(f"config file {str(path)!r} is not readable UTF-8 TOML ({err}); fix that line") from None
    if not flat:
        raise ConfigError(f'config file {str(path)!r} is empty; write at least name = "..." (the rest defaults)')
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` from the command line; the value is read as TOML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.lr=0.01")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words such as fedavg are strings
    return key.strip(), value


def _unknown_message(key: str) -> str:
    close = difflib.get_close_matches(key, list(KEYS), n=3)
    hint = f" did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r};{hint} valid keys: {', '.join(sorted(KEYS))}"


def _coerce(key: str, value: Any, want: Any) -> Scalar:
    if typing.get_origin(want) is Literal or isinstance(want, types.UnionType):
        want = str  # a choice: validation names the allowed values
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a list key with one entry: --set peft.layers=5 (the value parser reads "5" as int)
    if want is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if type(value) is not want:
        raise ConfigError(f"config key {key!r} wants {want.__name__}, got {type(value).__name__} {value!r}")
    return value


# Parsers of compound settings live beside the rules that use them; re-exported here.
from fedpeft.validation import parse_label_prompts, parse_rank_profile, prompts_for_labels  # noqa: E402, F401
