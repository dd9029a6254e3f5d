"""``fedpeft check`` for ``task.kind = "causal-lm"``: everything a causal-LM run needs, before Ray starts.

The instruction data load (missing response column, empty response: fedpeft/instruct.py's
errors), every example encodes within ``data.max-seq-len`` (a response that cannot fit is
refused there), the model folder is a causal LM (a classifier folder is refused), the PEFT
method and target modules fit it (on the meta device: no weight is read), and the label words
tokenize to distinct, non-empty ids. The embedded GGUF is converted here, once, so the clients
start from the cached folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedpeft.config import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)


def check_causal_lm_experiment(cfg: ExperimentConfig, report):
    """The causal-LM part of :func:`fedpeft.check.check_experiment`: data, model, sizes into ``report``.

    ``report`` is the :class:`fedpeft.check.CheckReport` whose settings, trace and resources
    ``check_experiment`` has already checked (passed in, so this module does not import check.py back).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from fedpeft import adapters
    from fedpeft.causal_lm import check_causal_lm_config, lm_peft_config, load_lm_tokenizer, resolve_lm_path
    from fedpeft.check_size import size_summary
    from fedpeft.lm_batches import encode_rows
    from fedpeft.lm_eval import label_word_ids
    from fedpeft.lm_task import lm_partitions, load_instruction

    splits = load_instruction(cfg)
    path = resolve_lm_path(cfg.model.name)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise ConfigError(
            f"model.name={cfg.model.name!r}: {path} is not a model folder (no config.json); "
            "pass a causal-LM folder written by save_pretrained, an HF causal-LM id, or 'embedded'"
        )
    config = check_causal_lm_config(path, cfg.model.name)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and cfg.data.max_seq_len > max_positions:
        raise ConfigError(
            f"data.max-seq-len={cfg.data.max_seq_len} is more than the {max_positions} positions of "
            f"{cfg.model.name!r}; set data.max-seq-len <= {max_positions}"
        )
    lst_line = None
    if cfg.peft.method == "lst":  # counted from the plan: pruning reads weights, which the meta device has not
        from fedpeft.lst_lm_build import lm_memory_summary, plan_lm

        plan = plan_lm(cfg.peft, config)
        trainable = plan.num_params()
        lst_line = lm_memory_summary(
            plan,
            batch_size=cfg.train.batch_size,
            max_seq_len=cfg.data.max_seq_len,
            optimizer=cfg.train.optimizer,
            vocab=config.vocab_size,
        )
        lst_line += f", budget train.lst-store-mb={cfg.train.lst_store_mb}"
    else:
        with torch.device("meta"):
            meta_model = AutoModelForCausalLM.from_config(config)
        peft_model = adapters.inject_adapters(meta_model, lm_peft_config(cfg.peft), seed=cfg.seed, causal_lm=True)
        trainable = adapters.num_trainable(peft_model)
    tokenizer = load_lm_tokenizer(path)
    words = splits.label_words
    if words:
        label_word_ids(tokenizer, words)
    encode_rows(tokenizer, splits.train + splits.test, cfg.data.max_seq_len)  # refuses responses that cannot fit
    sizes = [len(p) for p in lm_partitions(cfg)]
    report.summary += [
        f"run: {cfg.name}, seed {cfg.seed}, {cfg.num_rounds} rounds, strategy {cfg.strategy.name}, "
        f"participation {cfg.participation.model}",
        f"data: {cfg.data.dataset}: {len(splits.train)} training examples, {len(splits.test)} test examples, "
        + (f"label words {', '.join(words)}" if words else "free-form responses"),
        f"model: {cfg.model.name} (causal LM, {config.model_type}, {config.num_hidden_layers} layers), "
        f"{cfg.peft.method}: {size_summary(cfg, trainable, {})}; quantization {cfg.model.quantization}",
        f"partitions: {len(sizes)}, sizes {min(sizes)}..{max(sizes)}",
    ]
    if lst_line:
        report.summary.append(lst_line)
    return report
