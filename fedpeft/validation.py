"""Validation of an :class:`~fedpeft.config.ExperimentConfig`: every range, choice and combination.

Split from config.py (which holds the dataclasses and the file/override parsing) to keep
each file one concept; ``ExperimentConfig.__post_init__`` calls :func:`validate`. Errors
are :class:`~fedpeft.choices.ConfigError` naming the key, the rule and the fix.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedpeft.choices import CHOICES, FAULT_KINDS, ConfigError

if TYPE_CHECKING:
    from fedpeft.config import ExperimentConfig


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} must be {rule}, got {value!r}")


def validate(cfg: ExperimentConfig) -> None:
    """Raise :class:`ConfigError` at the first setting that breaks a rule."""
    for key, value in cfg.to_flat().items():
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config key {key!r} is {value!r}; valid choices: {', '.join(CHOICES[key])}")
        _check(not isinstance(value, float) or math.isfinite(value), key, "a finite number", value)  # inf > 0
    _check(cfg.num_rounds >= 1, "num-rounds", ">= 1", cfg.num_rounds)
    _check(cfg.seed >= 0, "seed", ">= 0", cfg.seed)
    _validate_model(cfg)
    _validate_task(cfg)
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
    _check(
        cfg.data.num_val_examples >= 0, "data.num-val-examples", ">= 0 (0 = no validation)", cfg.data.num_val_examples
    )
    _check(cfg.data.max_seq_len >= 8, "data.max-seq-len", ">= 8", cfg.data.max_seq_len)
    _check(cfg.partition.num_partitions >= 1, "partition.num-partitions", ">= 1", cfg.partition.num_partitions)
    _check(cfg.partition.alpha > 0, "partition.alpha", "> 0", cfg.partition.alpha)
    _check(
        cfg.partition.min_partition_size >= 1, "partition.min-partition-size", ">= 1", cfg.partition.min_partition_size
    )
    _check(cfg.partition.shards_per_client >= 1, "partition.shards-per-client", ">= 1", cfg.partition.shards_per_client)
    _check(
        cfg.partition.classes_per_client >= 1, "partition.classes-per-client", ">= 1", cfg.partition.classes_per_client
    )
    _check(0 < cfg.participation.fraction <= 1, "participation.fraction", "in (0, 1]", cfg.participation.fraction)
    _check(cfg.participation.min_clients >= 0, "participation.min-clients", ">= 0", cfg.participation.min_clients)
    _validate_participation(cfg)
    _validate_natural_id(cfg)
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
    _check(
        cfg.train.eval_every >= 1,
        "train.eval-every",
        ">= 1 (the server also scores round 0 and the last)",
        cfg.train.eval_every,
    )
    _check(cfg.train.weight_decay >= 0, "train.weight-decay", ">= 0", cfg.train.weight_decay)
    _check(cfg.strategy.server_lr > 0, "strategy.server-lr", "> 0", cfg.strategy.server_lr)
    _validate_memory(cfg)  # before the generic aggregator rules: MIFA / FedVarp's refusals say why
    _validate_strategy_parts(cfg)
    _validate_dp(cfg)
    _validate_spsa(cfg)
    _validate_lora_ranks(cfg)
    _validate_lst(cfg)
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
    _check(
        cfg.simulation.server_threads >= 0,
        "simulation.server-threads",
        ">= 0 (0 = every core for a server in its own process)",
        cfg.simulation.server_threads,
    )
    _check(cfg.simulation.round_timeout_s > 0, "simulation.round-timeout-s", "> 0", cfg.simulation.round_timeout_s)
    _check(cfg.simulation.node_wait_s > 0, "simulation.node-wait-s", "> 0", cfg.simulation.node_wait_s)
    _check(0.0 <= cfg.faults.rate <= 1.0, "faults.rate", "in [0, 1] (0 = no injected faults)", cfg.faults.rate)
    _check(cfg.faults.slow_s >= 0, "faults.slow-s", ">= 0", cfg.faults.slow_s)
    unknown = [k for k in cfg.faults.kinds.split(",") if k.strip() not in FAULT_KINDS]
    _check(
        not unknown and cfg.faults.kinds.strip() != "",
        "faults.kinds",
        f"a comma list of {FAULT_KINDS}",
        cfg.faults.kinds,
    )
    _check(
        cfg.faults.rate == 0 or cfg.simulation.cohort_size == 1,
        "faults.rate",
        "0 when simulation.cohort-size > 1 (faults are injected per one-client node)",
        cfg.faults.rate,
    )
    _check(
        cfg.simulation.max_nodes >= 0,
        "simulation.max-nodes",
        ">= 0 (0 = one Flower node per client however many there are)",
        cfg.simulation.max_nodes,
    )
    _check(
        cfg.simulation.cohort_size >= 1,
        "simulation.cohort-size",
        ">= 1 (1 = one client per node)",
        cfg.simulation.cohort_size,
    )
    _validate_drift(cfg)
    _validate_byzantine(cfg)
    _validate_evaluate(cfg)


def _validate_drift(cfg: ExperimentConfig) -> None:
    # FedProx and SCAFFOLD change the first-order local update's gradient (fedpeft/drift.py).
    mu, cv = cfg.train.prox_mu, cfg.strategy.control_variates
    _check(mu >= 0, "train.prox-mu", ">= 0 (0 = no FedProx proximal term)", mu)
    for name, on in (("train.prox-mu", mu > 0), ("strategy.control-variates", cv != "none")):
        if not on:
            continue
        value = mu if name == "train.prox-mu" else cv
        _check(
            cfg.strategy.name != "spsa",
            name,
            "off with strategy.name='spsa' (SPSA clients take zeroth-order steps, no gradient to correct)",
            value,
        )
        _check(
            cfg.dp.mode != "sample",
            name,
            "off with dp.mode='sample' (Opacus' DP-SGD step replaces the corrected gradient; "
            "set dp.mode=none or client)",
            value,
        )
    if cv == "scaffold":
        _check(
            cfg.dp.mode == "none",
            "strategy.control-variates",
            "'none' with dp.mode='client': SCAFFOLD's control variates would travel unclipped and un-noised, "
            "outside the privacy accounting (set dp.mode=none, or strategy.control-variates=none)",
            cv,
        )
        _check(
            cfg.train.optimizer == "sgd",
            "train.optimizer",
            "'sgd' with strategy.control-variates='scaffold': option II's c_i = c_i - c + (x - y_i) / (K lr) "
            "is the mean corrected gradient only for plain SGD steps (set train.optimizer=sgd)",
            cfg.train.optimizer,
        )
        _check(
            cfg.strategy.name not in ("hetlora", "flexlora") and not cfg.clients.rank_profile.strip(),
            "strategy.control-variates",
            "'none' with unequal LoRA ranks (a control variate per tensor needs every client's tensors "
            "to have the server's shapes)",
            cv,
        )


def _validate_memory(cfg: ExperimentConfig) -> None:
    # MIFA / FedVarp (strategies/memory.py) reuse absent clients' stored updates every round.
    agg = cfg.strategy.aggregator
    if agg not in ("mifa", "fedvarp"):
        return
    _check(
        cfg.dp.mode != "client",
        "strategy.aggregator",
        f"not {agg!r} with dp.mode='client': reusing absent clients' stored updates breaks the subsampling "
        "amplification the client-level accountant relies on (set strategy.aggregator=mean, or dp.mode=none)",
        agg,
    )
    _check(
        cfg.strategy.weighting == "uniform",
        "strategy.weighting",
        f"'uniform' with strategy.aggregator={agg!r} (it weighs clients 1/N or 1/|S| as in its paper; "
        "set strategy.weighting=uniform)",
        cfg.strategy.weighting,
    )
    _check(
        cfg.strategy.name == "fedavg",
        "strategy.name",
        f"'fedavg' with strategy.aggregator={agg!r} (its memory is the unknown-participation correction; "
        "FedAU's weights or unequal ranks do not combine with it)",
        cfg.strategy.name,
    )


def _validate_byzantine(cfg: ExperimentConfig) -> None:
    faults = cfg.faults
    _check(
        0.0 <= faults.byzantine_fraction < 1.0,
        "faults.byzantine-fraction",
        "in [0, 1) (the share of partitions that send corrupted deltas; 0 = none)",
        faults.byzantine_fraction,
    )
    _check(faults.byzantine_scale > 0, "faults.byzantine-scale", "> 0", faults.byzantine_scale)
    _check(
        faults.byzantine_fraction == 0 or cfg.simulation.cohort_size == 1,
        "faults.byzantine-fraction",
        "0 when simulation.cohort-size > 1 (faults are injected per one-client node)",
        faults.byzantine_fraction,
    )
    _check(
        faults.byzantine_fraction == 0 or cfg.strategy.name != "spsa",
        "faults.byzantine-fraction",
        "0 with strategy.name='spsa' (Byzantine kinds corrupt array deltas; SPSA sends one-byte codes)",
        faults.byzantine_fraction,
    )


def _validate_evaluate(cfg: ExperimentConfig) -> None:
    ev = cfg.evaluate
    _check(
        0.0 <= ev.fraction_clients <= 1.0,
        "evaluate.fraction-clients",
        "in [0, 1] (the share of clients scored on their own held-out rows each evaluated round; 0 = off)",
        ev.fraction_clients,
    )
    _check(
        0.0 < ev.holdout_fraction < 1.0,
        "evaluate.holdout-fraction",
        "in (0, 1) (the share of each client's rows kept out of training for its evaluation)",
        ev.holdout_fraction,
    )
    if ev.fraction_clients > 0:
        _check(
            cfg.strategy.name != "spsa",
            "evaluate.fraction-clients",
            "0 with strategy.name='spsa' (SPSA's local update reads the whole partition, held-out rows included)",
            ev.fraction_clients,
        )
        _check(
            cfg.partition.min_partition_size >= 2,
            "partition.min-partition-size",
            ">= 2 when evaluate.fraction-clients > 0 (each client keeps >= 1 row to train and >= 1 to score)",
            cfg.partition.min_partition_size,
        )


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


def prompts_for_labels(text: str, label_names: tuple[str, ...] | list[str], dataset: str = "") -> dict[str, str]:
    """The label prompts of ``text``, which must give exactly one text per label of the data."""
    prompts = parse_label_prompts(text)
    missing = [n for n in label_names if n not in prompts]
    unknown = [n for n in prompts if n not in label_names]
    if missing or unknown:
        of = f"of {dataset!r} " if dataset else ""
        raise ConfigError(
            f"model.label-prompts must give one text per label {of}{list(label_names)}; "
            f"missing {missing}, unknown {unknown}"
        )
    return prompts


def _validate_model(cfg: ExperimentConfig) -> None:
    model = cfg.model
    _check(
        cfg.peft.method != "full" or model.quantization == "none",
        "model.quantization",
        "'none' when peft.method='full' (quantized weights cannot train; set model.quantization = \"none\")",
        model.quantization,
    )
    _check(model.head_scale > 0, "model.head-scale", "> 0", model.head_scale)
    _check(
        model.int8_threshold >= 0,
        "model.int8-threshold",
        ">= 0 (bitsandbytes' LLM.int8() outlier threshold: 6.0 by default, 0 = no outlier decomposition)",
        model.int8_threshold,
    )
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


# Classifier-only settings: a causal LM has no pooler and no classification head (its LM head is tied to the
# embeddings). Each is refused under task.kind="causal-lm" when set to anything but its default.
CLASSIFIER_ONLY = {
    "model.pooling": "head",
    "model.head-init": "random",
    "model.label-prompts": "",
    "model.head-scale": 10.0,
}
# What a causal LM can train here: Llama's layers have no biases (BitFit has nothing to train), the LM head is tied
# to the input embeddings and stays frozen ("head" would train nothing), and "full" is not wired for causal LMs.
CAUSAL_LM_METHODS = ("lora", "ia3", "prompt")


def _validate_task(cfg: ExperimentConfig) -> None:
    task = cfg.task
    words = task.label_word_list()
    _check(
        len(words) == len(set(words)) and all("," not in w for w in words),
        "task.label-words",
        'distinct words, comma-separated, e.g. "positive,negative" (label 0 first: embedded fresh, rotten)',
        task.label_words,
    )
    _check(
        task.num_sample_generations >= 0,
        "task.num-sample-generations",
        ">= 0 (0 = no generations.jsonl)",
        task.num_sample_generations,
    )
    _check(task.max_new_tokens >= 1, "task.max-new-tokens", ">= 1", task.max_new_tokens)
    if task.kind != "causal-lm":
        _check(
            cfg.data.dataset != "embedded-dialog",
            "data.dataset",
            "a labelled text set with task.kind='classification' ('embedded-dialog' is instruction data: "
            'set task.kind = "causal-lm")',
            cfg.data.dataset,
        )
        return
    flat = cfg.to_flat()
    for key, default in CLASSIFIER_ONLY.items():
        _check(
            flat[key] == default,
            key,
            f"{default!r} (its default) with task.kind='causal-lm': it configures a sequence classifier's "
            f"pooling / head, which a causal LM does not have; remove the setting or use task.kind='classification'",
            flat[key],
        )
    _check(
        cfg.peft.method in CAUSAL_LM_METHODS,
        "peft.method",
        f"one of {CAUSAL_LM_METHODS} with task.kind='causal-lm' (Llama-style layers have no biases, so bitfit "
        "trains nothing; the LM head is tied to the embeddings and stays frozen, so head trains nothing; "
        "full is not supported for causal LMs)",
        cfg.peft.method,
    )
    _check(
        cfg.strategy.name not in ("spsa",),
        "strategy.name",
        "a first-order strategy (fedavg, fedau, known_p_oracle, hetlora, flexlora) with task.kind='causal-lm': "
        "SPSA on a causal LM is not implemented yet",
        cfg.strategy.name,
    )
    _check(
        cfg.simulation.cohort_size == 1,
        "simulation.cohort-size",
        "1 with task.kind='causal-lm' (cohort nodes train classifiers only so far)",
        cfg.simulation.cohort_size,
    )
    _check(
        cfg.data.num_val_examples == 0,
        "data.num-val-examples",
        "0 with task.kind='causal-lm' (the validation carve covers classification data only so far; "
        "hold out rows in your own file instead)",
        cfg.data.num_val_examples,
    )
    _check(
        cfg.evaluate.fraction_clients == 0,
        "evaluate.fraction-clients",
        "0 with task.kind='causal-lm' (per-client evaluation scores classifiers only so far)",
        cfg.evaluate.fraction_clients,
    )


def _validate_natural_id(cfg: ExperimentConfig) -> None:
    """``natural-id`` partitions by a group per example: only data that has one."""
    if cfg.data.group_column and cfg.data.dataset in ("embedded", "embedded-dialog"):
        has = "groups by its category" if cfg.data.dataset == "embedded-dialog" else "has no group column"
        raise ConfigError(
            f"data.group-column={cfg.data.group_column!r} names a column of a file or HF dataset, and "
            f'data.dataset={cfg.data.dataset!r} {has}; set data.group-column = ""'
        )
    if cfg.partition.scheme == "natural-id" and cfg.data.dataset != "embedded-dialog" and not cfg.data.group_column:
        raise ConfigError(
            f"partition.scheme='natural-id' needs a group per example, and data.dataset={cfg.data.dataset!r} "
            "has none: set data.group-column to the column holding it (e.g. user_id), use "
            "data.dataset='embedded-dialog' (grouped by category), or another partition.scheme"
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


def parse_rank_profile(text: str) -> tuple[str, list[float]]:
    """``clients.rank-profile``: ``"2,4,8"`` -> ``("ranks", [2, 4, 8])``; ``"mem:60,80"`` ->
    ``("mem", [60.0, 80.0])`` (MB budgets); ``""`` -> ``("", [])``."""
    body = text.strip()
    kind = "mem" if body.startswith("mem:") else "ranks"
    body = body.removeprefix("mem:")
    if not body and kind == "ranks":
        return "", []
    try:
        values = [float(v) if kind == "mem" else int(v) for v in body.split(",")]
    except ValueError:
        raise ConfigError(
            f'clients.rank-profile {text!r} is not a list of ranks like "2,4,8" '
            'or of memory budgets in MB like "mem:60,80,120"'
        ) from None
    return kind, values


def _validate_lora_ranks(cfg: ExperimentConfig) -> None:
    peft = cfg.peft
    if peft.lora_variant == "ffa":
        _check(
            peft.method == "lora",
            "peft.lora-variant",
            f"'lora' with peft.method={peft.method!r}: FFA-LoRA freezes LoRA's A matrix, which only "
            "peft.method='lora' has (set peft.method=lora, or peft.lora-variant=lora)",
            peft.lora_variant,
        )
    hetero = ("hetlora", "flexlora")
    if cfg.strategy.name in hetero:
        name = cfg.strategy.name
        _check(
            peft.method == "lora",
            "strategy.name",
            f"'fedavg' with peft.method={peft.method!r}: {name} aggregates LoRA factors "
            "(set peft.method=lora, or strategy.name=fedavg)",
            name,
        )
        _check(
            cfg.dp.mode != "client",
            "dp.mode",
            f"'none' or 'sample' with strategy.name={name!r}: its per-rank-slice weights have no "
            "client-level DP calibration (use strategy.name=fedavg for dp.mode=client)",
            cfg.dp.mode,
        )
    if cfg.strategy.name == "flexlora":
        _check(
            peft.lora_variant == "lora",
            "peft.lora-variant",
            "'lora' with strategy.name='flexlora' (FlexLoRA re-factors B A, so A must train and travel)",
            peft.lora_variant,
        )
    kind, values = parse_rank_profile(cfg.clients.rank_profile)
    if not kind:
        return
    key, num = "clients.rank-profile", cfg.partition.num_partitions
    _check(
        cfg.strategy.name in hetero,
        "strategy.name",
        "'hetlora' (zero padding) or 'flexlora' (SVD) when clients.rank-profile gives clients unequal ranks",
        cfg.strategy.name,
    )
    _check(
        peft.lora_variant == "lora",
        key,
        "'' with peft.lora-variant='ffa' (FFA-LoRA's frozen A must be the same on every client; "
        "use one rank, peft.lora-rank)",
        cfg.clients.rank_profile,
    )
    if kind == "ranks":
        _check(all(r > 0 for r in values), key, "ranks > 0", cfg.clients.rank_profile)
        _check(
            max(values) <= peft.lora_rank,
            key,
            f"ranks <= peft.lora-rank={peft.lora_rank}, the server's rank (set peft.lora-rank={int(max(values))})",
            cfg.clients.rank_profile,
        )
        _check(
            len(values) <= num,
            key,
            f"at most partition.num-partitions={num} ranks (they are assigned round-robin)",
            cfg.clients.rank_profile,
        )
    else:
        _check(all(v > 0 for v in values), key, "memory budgets > 0 MB", cfg.clients.rank_profile)
        _check(
            len(values) == num,
            key,
            f"'mem:' followed by exactly partition.num-partitions={num} budgets in MB (one per partition)",
            cfg.clients.rank_profile,
        )


def clients_per_round(cfg: ExperimentConfig) -> tuple[int, bool]:
    """``(n, fixed)``: clients online per round, and whether every round has exactly that many.

    ``always`` and ``uniform`` fix n; the other participation models vary it, so ``n`` is then
    the most there can be (all N) and the rule is checked again each round at run time.
    """
    num = cfg.partition.num_partitions
    part = cfg.participation
    if part.model == "always":
        return num, True
    if part.model == "uniform":
        return min(num, max(part.min_clients, int(round(part.fraction * num)))), True
    return num, False


def _validate_strategy_parts(cfg: ExperimentConfig) -> None:
    """Server optimizer and aggregator ranges, and the combinations docs/strategies.md marks undefined."""
    s = cfg.strategy
    _check(0 <= s.server_momentum < 1, "strategy.server-momentum", "in [0, 1)", s.server_momentum)
    _check(0 <= s.beta1 < 1, "strategy.beta1", "in [0, 1)", s.beta1)
    _check(0 <= s.beta2 < 1, "strategy.beta2", "in [0, 1)", s.beta2)
    _check(s.tau > 0, "strategy.tau", "> 0", s.tau)
    _check(
        0 <= s.trim_fraction < 0.5,
        "strategy.trim-fraction",
        "in [0, 0.5) (the fraction dropped from each end; 0.5 would leave no client)",
        s.trim_fraction,
    )
    _check(s.krum_f >= 0, "strategy.krum-f", ">= 0", s.krum_f)
    _check(s.krum_m >= 1, "strategy.krum-m", ">= 1 (1 = Krum)", s.krum_m)
    if s.server_optimizer != "sgd":
        _check(
            s.name not in ("flexlora", "spsa"),
            "strategy.server-optimizer",
            f"'sgd' with strategy.name={s.name!r}: "
            + (
                "FlexLoRA re-factorises B A every round, so moments over its factors mean nothing"
                if s.name == "flexlora"
                else "SPSA's server replays the clients' seeded steps; it has no pseudo-gradient to adapt"
            ),
            s.server_optimizer,
        )
    if s.aggregator == "mean":
        return
    _check(
        s.name == "fedavg",
        "strategy.aggregator",
        f"'mean' with strategy.name={s.name!r}: "
        + {
            "fedau": "FedAU's omega / N weights with a median or Krum are undefined",
            "known_p_oracle": "the oracle's 1/p weights with a median or Krum are undefined",
            "hetlora": "zero padding is HetLoRA's own aggregator",
            "flexlora": "the SVD of the mean is FlexLoRA's own aggregator",
            "spsa": "SPSA replays one-byte codes, not deltas",
        }.get(s.name, "robust aggregators combine with strategy.name='fedavg' only"),
        s.aggregator,
    )
    _check(
        cfg.dp.mode != "client",
        "dp.mode",
        f"'none' or 'sample' with strategy.aggregator={s.aggregator!r}: client-level DP calibrates its noise "
        "to the mean's sensitivity, which a median, trimmed mean or Krum does not have (use strategy.aggregator=mean)",
        cfg.dp.mode,
    )
    if s.aggregator in ("median", "trimmed-mean"):
        _check(
            s.weighting == "uniform",
            "strategy.weighting",
            f"'uniform' with strategy.aggregator={s.aggregator!r}: it is a per-coordinate order statistic "
            "and uses no weights (set strategy.weighting=uniform)",
            s.weighting,
        )
    n, fixed = clients_per_round(cfg)
    when = "per round" if fixed else "at most (all clients online)"
    if s.aggregator == "krum":
        _check(
            n >= 2 * s.krum_f + 3,
            "strategy.krum-f",
            f"<= (n - 3) / 2 = {(n - 3) // 2} for n = {n} clients {when}: Krum needs n >= 2f + 3 "
            "(lower strategy.krum-f or put more clients online)",
            s.krum_f,
        )
        _check(
            s.krum_m <= n - s.krum_f,
            "strategy.krum-m",
            f"<= n - f = {n - s.krum_f} for n = {n} clients {when}",
            s.krum_m,
        )


def _validate_lst(cfg: ExperimentConfig) -> None:
    # Ranges hold for every method; the backbone-dependent rules (reduction divides the hidden size,
    # layers in range) are checked against the model's config by `fedpeft check` (fedpeft/lst.py).
    peft = cfg.peft
    _check(peft.lst_reduction >= 1, "peft.lst-reduction", ">= 1 (the paper's default is 8)", peft.lst_reduction)
    _check(peft.lst_every >= 1, "peft.lst-every", ">= 1 (1 = a side block for every layer)", peft.lst_every)
    _check(
        all(v.strip().isdigit() for v in peft.lst_layers.split(",")) if peft.lst_layers.strip() else True,
        "peft.lst-layers",
        'comma-separated layer indices >= 0 such as "1,3,5", or "" for every peft.lst-every-th layer',
        peft.lst_layers,
    )
    _check(
        cfg.train.lst_store_mb >= 0, "train.lst-store-mb", ">= 0 (MB of stored ladder inputs)", cfg.train.lst_store_mb
    )
    if peft.method != "lst":
        return
    _check(
        cfg.train.lst_store_mb > 0,
        "train.lst-store-mb",
        "> 0 with peft.method='lst' (the budget of a client's stored activations in MB, e.g. 1024; "
        "the store is what makes rounds after the first cheap)",
        cfg.train.lst_store_mb,
    )
    _check(
        cfg.strategy.name in ("fedavg", "fedau", "known_p_oracle"),
        "strategy.name",
        f"'fedavg', 'fedau' or 'known_p_oracle' with peft.method='lst' (got {cfg.strategy.name!r}: "
        "SPSA and the LoRA-rank strategies do not apply to a side network)",
        cfg.strategy.name,
    )
    _check(
        cfg.model.head_init == "random",
        "model.head-init",
        "'random' with peft.method='lst' (the head sits on the side network, which prompts do not reach)",
        cfg.model.head_init,
    )
