"""``fedpeft check``: validate a run's inputs before anything expensive starts.

Config, data files and columns, model folder (its ``config.json`` only: the module tree is
built on PyTorch's meta device, so no weight is read), participation trace, label prompts,
partition feasibility and the privacy plan, in order of cost, so a typo fails in about a
second. Nothing here imports Flower's simulation engine or starts Ray; ``fedpeft simulate``
runs the same check first.

Settings of a feature that is off are errors (``dp.clip-norm`` with ``dp.mode = "none"``),
except where a config file carries them and the switch was turned off on the command line
(``--set dp.mode=none`` on dp_sample.toml): that is a warning naming the switch.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.config import BYZANTINE_KINDS, ConfigError, ExperimentConfig, prompts_for_labels, read_config_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sources:
    """Where each flat key came from; ``known=False`` when the config was built in code."""

    file_keys: frozenset[str] = frozenset()
    override_keys: frozenset[str] = frozenset()
    known: bool = False


def config_sources(path: str | Path, override_keys: list[str]) -> Sources:
    """The keys set by the file at ``path`` and by ``--set``."""
    return Sources(frozenset(read_config_file(path)), frozenset(override_keys), known=True)


@dataclass
class CheckReport:
    """What the check found: summary lines for ``config OK``, and warnings."""

    summary: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        """``config OK`` and the summary, one item per line."""
        lines = [f"config OK ({self.seconds:.1f} s)", *(f"  {s}" for s in self.summary)]
        return "\n".join(lines + [f"  warning: {w}" for w in self.warnings])


def _keys(section: str, names: str) -> tuple[str, ...]:
    return tuple(f"{section}.{n}" for n in names.split())


# (switch key, "why it is off" or None when on, keys that only matter when it is on)
Rule = tuple[str, Callable[[ExperimentConfig], str | None], tuple[str, ...]]
INACTIVE_RULES: tuple[Rule, ...] = (
    ("dp.mode", lambda c: "privacy is off" if c.dp.mode == "none" else None,
     _keys("dp", "noise-multiplier clip-norm target-epsilon delta grad-sample-mode max-weight")),
    ("dp.mode", lambda c: "the weight cap is for dp.mode='client'" if c.dp.mode == "sample" else None,
     ("dp.max-weight",)),
    ("dp.mode", lambda c: "per-sample gradients are for dp.mode='sample'" if c.dp.mode == "client" else None,
     ("dp.grad-sample-mode",)),
    ("dp.target-epsilon", lambda c: "a target epsilon picks the noise multiplier" if c.dp.target_epsilon else None,
     ("dp.noise-multiplier",)),
    ("participation.model", lambda c: None if c.participation.model == "trace" else "no trace is replayed",
     ("participation.trace-file",)),
    ("participation.model", lambda c: None if c.participation.model == "uniform" else "only 'uniform' samples",
     _keys("participation", "fraction min-clients")),
    ("participation.model",
     lambda c: None if c.participation.model in ("bernoulli", "markov", "cyclic") else "no per-client p_n is drawn",
     _keys("participation", "p-source p-mean p-floor p-list label-alpha")),
    ("participation.model", lambda c: None if c.participation.model == "markov" else "no Markov chain runs",
     ("participation.markov-rate",)),
    ("participation.model", lambda c: None if c.participation.model == "cyclic" else "no cycles run",
     ("participation.cycle-length",)),
    ("participation.p-source", lambda c: None if c.participation.p_source == "list" else "p_n are not listed",
     ("participation.p-list",)),
    ("participation.p-source", lambda c: "p_n are listed" if c.participation.p_source == "list" else None,
     ("participation.p-mean",)),
    ("participation.p-source",
     lambda c: None if c.participation.p_source in ("uniform", "label-correlated") else "p_n have no floor",
     ("participation.p-floor",)),
    ("participation.p-source",
     lambda c: None if c.participation.p_source == "label-correlated" else "p_n ignore labels",
     ("participation.label-alpha",)),
    ("partition.scheme",
     lambda c: None if c.partition.scheme in ("dirichlet", "inner-dirichlet") else "no Dirichlet label mix is drawn",
     ("partition.alpha",)),
    ("partition.scheme", lambda c: None if c.partition.scheme == "dirichlet" else "only 'dirichlet' redraws for a minimum",
     ("partition.min-partition-size",)),
    ("partition.scheme", lambda c: None if c.partition.scheme == "shard" else "only 'shard' cuts shards",
     ("partition.shards-per-client",)),
    ("partition.scheme", lambda c: None if c.partition.scheme == "pathological" else "only 'pathological' counts labels",
     ("partition.classes-per-client",)),
    ("peft.method", lambda c: None if c.peft.method == "lora" else "no LoRA is injected",
     _keys("peft", "lora-rank lora-alpha lora-dropout target-modules layers")),
    ("peft.method", lambda c: None if c.peft.method == "lst" else "no side network is built",
     (*_keys("peft", "lst-reduction lst-layers lst-every"), "train.lst-store-mb")),
    ("peft.method", lambda c: "LST always trains its side network's head" if c.peft.method == "lst" else None,
     ("peft.train-head",)),
    ("peft.lst-layers", lambda c: "listed layers replace every k-th" if c.peft.lst_layers.strip() else None,
     ("peft.lst-every",)),
    ("peft.method", lambda c: None if c.peft.method == "prompt" else "no prompt is tuned",
     ("peft.num-virtual-tokens",)),
    ("peft.method", lambda c: "head-only always trains the head" if c.peft.method == "head" else None,
     ("peft.train-head",)),
    ("strategy.name", lambda c: None if c.strategy.name == "spsa" else "SPSA is off",
     _keys("spsa", "local-steps eps lr lr-schedule codec scale-rule scale-multiplier initial-scale batch-size "
                   "distribution")),
    ("strategy.name", lambda c: "SPSA clients use the spsa.* settings" if c.strategy.name == "spsa" else None,
     _keys("train", "optimizer lr local-epochs local-steps batch-size weight-decay")),
    ("strategy.name", lambda c: None if c.strategy.name == "fedau" else "only FedAU cuts intervals",
     ("strategy.k-cap",)),
    ("strategy.server-optimizer",
     lambda c: None if c.strategy.server_optimizer == "momentum" else "only FedAvgM keeps a velocity",
     ("strategy.server-momentum",)),
    ("strategy.server-optimizer",
     lambda c: None if c.strategy.server_optimizer in ("adam", "yogi", "adagrad") else "no adaptive moments",
     _keys("strategy", "beta1 tau")),
    ("strategy.server-optimizer",
     lambda c: None if c.strategy.server_optimizer in ("adam", "yogi") else "no decaying second moment",
     ("strategy.beta2",)),
    ("strategy.aggregator", lambda c: None if c.strategy.aggregator == "trimmed-mean" else "nothing is trimmed",
     ("strategy.trim-fraction",)),
    ("strategy.aggregator", lambda c: None if c.strategy.aggregator == "krum" else "Krum does not select",
     _keys("strategy", "krum-f krum-m")),
    ("model.head-init", lambda c: None if c.model.head_init == "prompts" else "the head is not built from prompts",
     _keys("model", "label-prompts head-scale")),
    ("train.local-steps", lambda c: "a step count replaces epochs" if c.train.local_steps > 0 else None,
     ("train.local-epochs",)),
    ("data.dataset", lambda c: "a split is chosen on HF datasets only" if _is_file_or_embedded(c) else None,
     ("data.split",)),
    ("model.device", lambda c: "clients run on the CPU" if c.model.device == "cpu" else None,
     ("simulation.num-gpus-per-client",)),
    ("model.quantization", lambda c: None if c.model.quantization == "int8" else "only int8 has an outlier threshold",
     ("model.int8-threshold",)),
    ("tracking.backend", lambda c: None if c.tracking.backend == "mlflow" else "only MLflow has a store and experiments",
     _keys("tracking", "uri experiment")),
    ("faults.byzantine-fraction", lambda c: None if c.faults.byzantine_fraction > 0 else "no client is Byzantine",
     ("faults.byzantine-kind",)),
    ("faults.byzantine-fraction", lambda c: None if _byzantine_kinds_on(c) else "no Byzantine kind is injected",
     ("faults.byzantine-scale",)),
    ("evaluate.fraction-clients", lambda c: None if c.evaluate.fraction_clients > 0 else "per-client evaluation is off",
     ("evaluate.holdout-fraction",)),
)  # fmt: skip


#: aggregators that bound a minority of corrupted deltas' influence (strategies/aggregators.py)
ROBUST_AGGREGATORS = ("median", "trimmed-mean", "krum")


def byzantine_warnings(cfg: ExperimentConfig) -> list[str]:
    """A warning when Byzantine clients attack an aggregator that does not resist them (allowed: a baseline)."""
    if not _byzantine_kinds_on(cfg) or cfg.strategy.aggregator in ROBUST_AGGREGATORS:
        return []
    return [
        f"Byzantine clients (faults.byzantine-fraction={cfg.faults.byzantine_fraction:g}) attack "
        f"strategy.aggregator={cfg.strategy.aggregator!r}, which averages every delta: one attacker can move "
        f"the global adapter arbitrarily (fine as a baseline; robust: {', '.join(ROBUST_AGGREGATORS)})"
    ]


def _byzantine_kinds_on(cfg: ExperimentConfig) -> bool:
    random_kinds = {k.strip() for k in cfg.faults.kinds.split(",")} & set(BYZANTINE_KINDS)
    return cfg.faults.byzantine_fraction > 0 or (cfg.faults.rate > 0 and bool(random_kinds))


def _is_file_or_embedded(cfg: ExperimentConfig) -> bool:
    local_suffixes = (".csv", ".json", ".jsonl", ".parquet", ".tsv")  # fedpeft.data.LOCAL_SUFFIXES, without torch
    return cfg.data.dataset == "embedded" or Path(cfg.data.dataset).suffix in local_suffixes


def check_resources(cfg: ExperimentConfig) -> list[str]:
    """Ray never places a client that asks for more CPUs / GPUs than exist: the run would wait forever.

    With a Ray cluster running (``ray start``), its other machines may have them: a warning.
    """
    import os

    import torch

    sim = cfg.simulation
    problems = []
    if sim.num_cpus_per_client > (os.cpu_count() or 1):
        problems.append(
            f"simulation.num-cpus-per-client={sim.num_cpus_per_client:g} is more than this machine's "
            f"{os.cpu_count()} CPUs, so no client could start; set it <= {os.cpu_count()}"
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if sim.num_gpus_per_client > 0 and gpus == 0:
        problems.append(
            f"simulation.num-gpus-per-client={sim.num_gpus_per_client:g} but this machine has no CUDA GPU, "
            "so no client could start; set it to 0"
        )
    if not problems:
        return []
    if Path(RAY_CLUSTER_FILE).is_file():
        return [p + " (a Ray cluster is running: fine if its other machines have them)" for p in problems]
    raise ConfigError("\n  ".join(problems))


#: written by ``ray start``; Ray attaches to that cluster instead of starting a local one
RAY_CLUSTER_FILE = "/tmp/ray/ray_current_cluster"

#: the int8-on-CUDA measurement the warning quotes (DESIGN.md, "Measured facts")
INT8_CUDA_MEASURED = (
    "measured 5.9x slower per training step than fp32 and 4.9x slower than nf4 on one H200 "
    "(262 ms vs 44 ms fp32 and 53 ms nf4; LoRA r=8 on MiniLM, batch 32 x 64 tokens, bitsandbytes 0.50.2, "
    "model.int8-threshold=6)"
)


def int8_cuda_warning(cfg: ExperimentConfig, cuda_available: bool) -> str | None:
    """A warning when ``cfg`` trains an int8 backbone on CUDA, else None.

    The likely cause is bitsandbytes' LLM.int8() matmul, built for large models: every
    forward quantizes the activations to int8 and, with ``llm_int8_threshold`` > 0,
    splits outlier columns off into a 16-bit matmul (transformers' ``BitsAndBytesConfig``
    docs; bitsandbytes issue #490: 8-bit is ~5x slower than bf16 on 7B models and
    "there is currently no plan to improve 8-bit inference performance"). Threshold 0
    skips the decomposition (reported 25-40% faster in inference, oobabooga/textgen #198,
    at some accuracy cost), which does not close a 5.9x gap: nf4 is the fix.
    """
    on_cuda = cfg.model.device == "cuda" or (cfg.model.device == "auto" and cuda_available)
    if cfg.model.quantization != "int8" or not on_cuda:
        return None
    return (
        f"model.quantization='int8' on CUDA was {INT8_CUDA_MEASURED}. Likely cause: bitsandbytes' LLM.int8() "
        "matmul quantizes activations on every call and decomposes outlier columns "
        f"(model.int8-threshold={cfg.model.int8_threshold:g}; transformers BitsAndBytesConfig.llm_int8_threshold, "
        "bitsandbytes issue #490). Use model.quantization='nf4' (smaller and faster); "
        "model.int8-threshold=0 skips the outlier path at some accuracy cost (its speed-up is unmeasured here)"
    )


def _int8_cuda_warnings(cfg: ExperimentConfig) -> list[str]:
    import torch  # already imported by check_resources

    warning = int8_cuda_warning(cfg, torch.cuda.is_available())
    return [warning] if warning else []


def inactive_settings(cfg: ExperimentConfig) -> list[tuple[str, str, str]]:
    """``(key, switch, why)`` for every non-default setting of a feature that ``cfg`` turns off."""
    flat, default = cfg.to_flat(), ExperimentConfig().to_flat()
    found = []
    for switch, why_off, keys in INACTIVE_RULES:
        why = why_off(cfg)
        if why is None:
            continue
        found += [(key, switch, why) for key in keys if flat[key] != default[key] and key != switch]
    return found


def check_settings(cfg: ExperimentConfig, sources: Sources) -> list[str]:
    """Raise :class:`ConfigError` for settings a switch turns off; return the warnings."""
    flat = cfg.to_flat()
    errors, warnings = [], []
    for key, switch, why in inactive_settings(cfg):
        text = (
            f"{key}={flat[key]!r} has no effect because {switch}={flat[switch]!r} ({why}); "
            f"remove {key} or change {switch}"
        )
        from_file_switch_overridden = key in sources.file_keys and switch in sources.override_keys
        if not sources.known or (from_file_switch_overridden and key not in sources.override_keys):
            warnings.append(text)
        else:
            errors.append(text)
    if cfg.dp.mode == "client" and cfg.strategy.name == "spsa":
        errors.append(
            "dp.mode='client' clips array deltas, but SPSA clients send one-byte codes; "
            "use dp.mode='sample' with strategy.name='spsa' (DPZero)"
        )
    if errors:
        raise ConfigError("\n  ".join(errors))
    return warnings


@dataclass(frozen=True)
class ModelFacts:
    """What the model folder says, without its weights."""

    path: str
    model_type: str
    num_layers: int
    max_positions: int | None
    trainable: int | None  # at peft.lora-rank for LoRA (the server's rank)
    trainable_by_rank: dict[int, int] = field(default_factory=dict)  # LoRA: every rank a client may train


def check_model(cfg: ExperimentConfig, num_labels: int) -> ModelFacts:
    """The model folder, its module names (meta device: no weights read) and the PEFT targets."""
    import torch

    from fedpeft import backbone, check_size

    try:
        backbone.resolve_device(cfg.model.device)
    except RuntimeError as err:
        raise ConfigError(str(err)) from None
    if cfg.model.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization={cfg.model.quantization!r} needs bitsandbytes: pip install bitsandbytes, "
            "or set model.quantization='none'"
        )
    path = backbone.resolve_model_path(cfg.model.name)
    local = Path(path)
    if local.exists():
        if not local.is_dir() or not (local / "config.json").is_file():
            raise ConfigError(
                f"model.name={cfg.model.name!r}: {path} is not a model folder (no config.json); "
                "pass a folder written by save_pretrained, an HF model id, or 'embedded'"
            )
        weights = [p.name for p in local.iterdir() if p.suffix in (".safetensors", ".bin")]
        if not weights:
            raise ConfigError(
                f"model.name={cfg.model.name!r}: {path} has config.json but no weights (*.safetensors / *.bin); "
                "copy the whole folder written by save_pretrained"
            )
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.name={cfg.model.name!r}: its config cannot be read ({first}); pass a local model folder, "
            "an HF model id that is cached (offline) or reachable, or 'embedded'"
        ) from None
    max_positions = getattr(config, "max_position_embeddings", None)
    extra = cfg.peft.num_virtual_tokens if cfg.peft.method == "prompt" else 0
    if max_positions and cfg.data.max_seq_len + extra > max_positions:
        raise ConfigError(
            f"data.max-seq-len={cfg.data.max_seq_len}"
            + (f" + peft.num-virtual-tokens={extra}" if extra else "")
            + f" is more than the {max_positions} positions of {cfg.model.name!r}; set data.max-seq-len <= "
            f"{max_positions - extra}"
        )
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    backbone.head_module(model)
    if cfg.model.pooling == "mean":
        backbone.use_mean_pooling(model)
    trainable = check_size.count_trainable(model, cfg)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    return ModelFacts(
        path, config.model_type, layers, max_positions, trainable, check_size.trainable_by_rank(model, cfg)
    )


def check_prompts(cfg: ExperimentConfig, label_names: tuple[str, ...]) -> None:
    """``model.label-prompts`` must name exactly the data's labels."""
    if cfg.model.head_init != "prompts":
        return
    prompts_for_labels(cfg.model.label_prompts, label_names, cfg.data.dataset)


def check_trace(cfg: ExperimentConfig) -> None:
    """A replayed trace must parse and cover every partition (columns) and round (rows)."""
    if cfg.participation.model != "trace":
        return
    from fedpeft.participation import load_trace

    matrix, _ = load_trace(cfg.participation.trace_file)
    rounds, clients = matrix.shape
    if clients != cfg.partition.num_partitions or rounds < cfg.num_rounds:
        raise ConfigError(
            f"participation.trace-file={cfg.participation.trace_file!r} has {rounds} rounds x {clients} clients; "
            f"the run needs at least num-rounds={cfg.num_rounds} rounds x partition.num-partitions="
            f"{cfg.partition.num_partitions} clients; fix num-rounds / partition.num-partitions or the trace"
        )


def check_experiment(cfg: ExperimentConfig, sources: Sources | None = None) -> CheckReport:
    """Validate everything ``cfg`` needs, cheapest first; raise on the first problem.

    Raises
    ------
    ConfigError, ValueError, FileNotFoundError
        With a message naming the key or file and the fix.
    """
    from fedpeft.check_plan import check_plan, load_checked_splits
    from fedpeft.check_size import size_summary
    from fedpeft.tracking import check_tracking

    t0 = time.monotonic()
    report = CheckReport()
    report.warnings += check_settings(cfg, sources or Sources())
    if cfg.task.kind == "causal-lm":  # its own data, model class and scoring (fedpeft/lm_check.py)
        from fedpeft.lm_check import check_causal_lm_experiment

        check_trace(cfg)
        report.warnings += check_resources(cfg)
        check_causal_lm_experiment(cfg, report)
        report.seconds = time.monotonic() - t0
        return report
    tracking = check_tracking(cfg)  # a missing package or an unreachable server: before any data is read
    check_trace(cfg)
    splits = load_checked_splits(cfg, report)
    report.warnings += check_resources(cfg)
    report.warnings += _int8_cuda_warnings(cfg)
    report.warnings += byzantine_warnings(cfg)
    names = splits.train.label_names
    facts = check_model(cfg, len(names))  # before partitioning: a module-name typo fails a few seconds sooner
    check_prompts(cfg, names)
    check_plan(cfg, splits, report)
    method = f"{cfg.peft.method}" + (
        f" r={cfg.peft.lora_rank} on {cfg.peft.target_modules}" if cfg.peft.method == "lora" else ""
    )
    if cfg.peft.method == "lst":
        method += f" r={cfg.peft.lst_reduction}"
    if cfg.peft.method == "lora" and cfg.peft.lora_variant == "ffa":
        method += " (FFA: A frozen, only B and the head travel)"
    count = size_summary(cfg, facts.trainable, facts.trainable_by_rank)
    report.summary.insert(
        2,
        f"model: {cfg.model.name} ({facts.model_type}, {facts.num_layers} layers), {method}: {count}; "
        f"quantization {cfg.model.quantization}, train-head {'on' if cfg.peft.train_head else 'off'}, "
        f"mean pooling {'on' if cfg.model.pooling == 'mean' else 'off'}, "
        f"prompt head {'on' if cfg.model.head_init == 'prompts' else 'off'}",
    )
    if tracking:
        report.summary.append(tracking)
    if cfg.peft.method == "lst":
        report.summary.append(_lst_summary(cfg, facts.path, len(names)))
    report.seconds = time.monotonic() - t0
    return report


def _lst_summary(cfg: ExperimentConfig, path: str, num_labels: int) -> str:
    from transformers import AutoConfig

    from fedpeft.lst import memory_summary, plan_lst

    c = AutoConfig.from_pretrained(path)
    plan = plan_lst(
        cfg.peft,
        hidden=c.hidden_size,
        heads=c.num_attention_heads,
        intermediate=c.intermediate_size,
        num_layers=c.num_hidden_layers,
    )
    text = memory_summary(
        plan,
        num_labels,
        batch_size=cfg.train.batch_size,
        max_seq_len=cfg.data.max_seq_len,
        optimizer=cfg.train.optimizer,
    )
    return f"{text}, budget train.lst-store-mb={cfg.train.lst_store_mb}"
