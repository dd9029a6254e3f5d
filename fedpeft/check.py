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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError, ExperimentConfig, prompts_for_labels, read_config_file
from fedpeft.dead_settings import byzantine_on, dead_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sources:
    """The flat keys a run was given: those of its file and those of ``--set`` (``known=False``: built in code)."""

    file: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    known: bool = False

    @property
    def flat(self) -> dict[str, Any]:
        """The keys as the config was built from them (overrides over the file)."""
        return {**self.file, **self.overrides}


def config_sources(path: str | Path, overrides: Mapping[str, Any]) -> Sources:
    """The keys set by the file at ``path`` and by ``--set``."""
    return Sources(read_config_file(path), dict(overrides), known=True)


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


#: aggregators that bound a minority of corrupted deltas' influence (strategies/aggregators.py)
ROBUST_AGGREGATORS = ("median", "trimmed-mean", "krum")


def byzantine_warnings(cfg: ExperimentConfig) -> list[str]:
    """A warning when Byzantine clients attack an aggregator that does not resist them (allowed: a baseline)."""
    faults = cfg.faults
    if (
        not byzantine_on(faults.byzantine_fraction, faults.rate, faults.kinds)
        or cfg.strategy.aggregator in ROBUST_AGGREGATORS
    ):
        return []
    return [
        f"Byzantine clients (faults.byzantine-fraction={cfg.faults.byzantine_fraction:g}) attack "
        f"strategy.aggregator={cfg.strategy.aggregator!r}, which averages every delta: one attacker can move "
        f"the global adapter arbitrarily (fine as a baseline; robust: {', '.join(ROBUST_AGGREGATORS)})"
    ]


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


def check_settings(cfg: ExperimentConfig, sources: Sources) -> list[str]:
    """Raise :class:`ConfigError` for settings a switch turns off; return the warnings.

    A setting the file carries whose switch ``--set`` turned off is a warning (``--set dp.mode=none``
    on dp_sample.toml), as is every one of a config built in code; the rest are errors.
    """
    flat = {**cfg.to_flat(), **sources.flat}  # the sources hold the keys a variant left out
    errors, warnings = [], []
    for key, switch, why in dead_settings(flat):
        text = (
            f"{key}={flat[key]!r} has no effect because {switch}={flat[switch]!r} ({why}); "
            f"remove {key} or change {switch}"
        )
        from_file_switch_overridden = key in sources.file and switch in sources.overrides
        if not sources.known or (from_file_switch_overridden and key not in sources.overrides):
            warnings.append(text)
        else:
            errors.append(text)
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
