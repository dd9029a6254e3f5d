"""The causal-LM task (``task.kind = "causal-lm"``): the same seam as the classifier's :class:`~fedpeft.task.Task`.

A :class:`CausalLMTask` is a ``Task`` whose model is a PEFT causal LM (fedpeft/causal_lm.py),
whose data are instruction examples (fedpeft/instruct.py), whose batches carry token targets
(fedpeft/lm_batches.py: the loss is on response tokens only) and whose evaluation is
fedpeft/lm_eval.py's. The local update (optimizer, steps, DP-SGD with Opacus) is the
classifier's own ``Task.local_update``, inherited, not copied: ``train.batch_loss`` picks the
response loss for token targets. Strategies never see the kind: they aggregate named arrays.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from fedpeft import adapters, backbone, partition
from fedpeft.config import ConfigError, DataConfig, ExperimentConfig
from fedpeft.task import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOutExamples:
    """Instruction examples to score like the test set (what a causal LM's ``validation_loader`` gives)."""

    examples: list


@dataclass
class CausalLMTask(Task):
    """A PEFT causal LM with its tokenizer and instruction splits (``splits``: ``InstructionSplits``)."""

    def partition(self, partition_id: int) -> list:
        """This client's examples of the training pool."""
        parts = lm_partitions(self.cfg)
        if not 0 <= partition_id < len(parts):
            raise ValueError(f"partition-id {partition_id} outside 0..{len(parts) - 1}")
        return [self.splits.train[i] for i in parts[partition_id]]

    def client_rows(self, partition_id: int, data_path: str = "") -> list:
        """This client's training examples: its node's own instruction file if ``data_path`` is set, else its partition.

        ``data_path`` comes from a SuperNode's ``--node-config data-path=/path/file.jsonl``; the file is read
        with the experiment's column settings (``data.instruction-column`` / ``input-column`` /
        ``response-column`` or ``messages-column``), as ``data.dataset`` would be (fedpeft/instruct_files.py).
        """
        if data_path:
            return node_examples(data_path, self.cfg.data)
        return self.partition(partition_id)

    def label_histograms(self) -> np.ndarray:
        """(partitions, groups) counts of the partition key: the label, else the natural group (see lm_partitions)."""
        keys, num = partition_keys(self.splits.train)
        return partition.label_histograms(keys, lm_partitions(self.cfg), num)

    def train_loader(self, rows: list, round_: int, partition_id: int):
        """Shuffled, right-padded batches of encoded examples, seeded by (seed, round, partition)."""
        from fedpeft.rng import torch_generator

        generator = torch_generator(self.cfg.seed, "batches", round_, partition_id)
        return self.shuffled_loader(rows, batch_size=self.cfg.train.batch_size, generator=generator)

    def shuffled_loader(self, rows: list, *, batch_size: int, generator):
        """Right-padded batches of encoded examples in the order ``generator`` shuffles them (SPSA's too)."""
        from fedpeft.lm_batches import build_lm_loader

        return build_lm_loader(
            rows,
            self.tokenizer,
            max_seq_len=self.cfg.data.max_seq_len,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
        )

    def logits_fn(self):
        """None: the frozen-prefix cache serves BERT-family encoders only (Llama needs its rotary positions)."""
        return None

    def evaluate(self, state: adapters.State, loader=None) -> dict:
        """fedpeft/lm_eval.py's scores of the model at ``state`` on the held-out set.

        ``loader`` is None (the test set), the :class:`HeldOutExamples` of
        :meth:`validation_loader` (the same scores; no greedy replies, which validation does
        not report), or a client's own batches: then only the response loss is computed and
        ``accuracy`` is the next-token accuracy of the response tokens.
        """
        from fedpeft.lm_eval import evaluate_lm

        adapters.set_adapter_state(self.model, state)
        if loader is not None and not isinstance(loader, HeldOutExamples):
            return _loader_scores(self.model, loader)
        validation = isinstance(loader, HeldOutExamples)
        return evaluate_lm(
            self.model,
            self.tokenizer,
            loader.examples if validation else self.splits.test,
            label_words=self.splits.label_words,
            max_seq_len=self.cfg.data.max_seq_len,
            batch_size=self.cfg.train.eval_batch_size,
            max_new_tokens=self.cfg.task.max_new_tokens,
            num_samples=0 if validation else self.cfg.task.num_sample_generations,
            num_generate=0 if validation else self.cfg.task.num_generate_eval,
        )

    def validation_loader(self) -> HeldOutExamples | None:
        """The validation rows (``data.num-val-examples`` > 0, the embedded snippets), else None."""
        if not self.splits.validation:
            return None
        return HeldOutExamples(self.splits.validation)

    def test_loader(self):
        """The held-out set as right-padded batches, in order."""
        from fedpeft.lm_batches import build_lm_loader

        return build_lm_loader(
            self.splits.test,
            self.tokenizer,
            max_seq_len=self.cfg.data.max_seq_len,
            batch_size=self.cfg.train.eval_batch_size,
            shuffle=False,
        )


def _loader_scores(model: nn.Module, loader) -> dict:
    import math

    import torch

    from fedpeft.lm_batches import token_losses
    from fedpeft.train import forward_logits

    loss_sum, tokens, hits, n = 0.0, 0, 0, 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            logits = forward_logits(model, batch)
            labels = batch["labels"].to(logits.device)
            sums, counts = token_losses(logits, labels)
            loss_sum, tokens, n = loss_sum + float(sums.sum()), tokens + int(counts.sum()), n + labels.shape[0]
            pred = logits[:, -labels.shape[1] :, :][:, :-1].argmax(-1)
            target = labels[:, 1:]
            hits += int(((pred == target) & (target != -100)).sum())
    loss = loss_sum / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "accuracy": hits / max(tokens, 1),
        "num_examples": float(n),
    }


def node_examples(path: str, cfg: DataConfig) -> list:
    """A node's own instruction file as examples (cached per process: a warm worker reads it once).

    Every row is an Alpaca row or a chat-messages row of ``cfg``'s columns; a bad row is refused
    with fedpeft/instruct_files.py's errors naming the row and the fix.
    """
    from fedpeft.instruct_files import load_file_examples

    key = (path, cfg)
    if key not in _NODE_EXAMPLES:
        if not Path(path).expanduser().is_file():
            raise ConfigError(
                f"node-config data-path={path!r} is not a file on this node; give the path of its own "
                "instruction file (jsonl / json / csv / parquet)"
            )
        _NODE_EXAMPLES[key] = load_file_examples(dataclasses.replace(cfg, dataset=str(path), group_column=""))
        log.info("node data %s: %d instruction examples", path, len(_NODE_EXAMPLES[key]))
    return _NODE_EXAMPLES[key]


_NODE_EXAMPLES: dict[tuple, list] = {}


def partition_keys(examples: list) -> tuple[np.ndarray, int]:
    """The key partitions are drawn by: each example's label (label-word tasks), else its group's index."""
    if examples and all(ex.label >= 0 for ex in examples):
        return np.array([ex.label for ex in examples]), int(max(ex.label for ex in examples)) + 1
    groups = sorted({ex.group for ex in examples})
    index = {g: i for i, g in enumerate(groups)}
    return np.array([index[ex.group] for ex in examples]), max(len(groups), 1)


def load_instruction(cfg: ExperimentConfig):
    """The run's instruction splits (fedpeft/instruct.py), cached per process."""
    from fedpeft.instruct import load_instruction_splits

    key = (cfg.data, cfg.task.label_words, cfg.task.instruction, cfg.seed)
    if key not in _SPLITS:
        _SPLITS[key] = load_instruction_splits(
            cfg.data, label_words=cfg.task.label_word_list(), instruction=cfg.task.instruction, seed=cfg.seed
        )
    return _SPLITS[key]


_SPLITS: dict[tuple, object] = {}
_PARTS: dict[tuple, list] = {}


def lm_partitions(cfg: ExperimentConfig) -> list:
    """Example indices per partition (cached per process; a pure function of the config).

    ``partition.scheme = "dirichlet"`` skews the label (label-word tasks) or the natural group
    (e.g. the dialog corpus' category) across clients; ``natural-id`` gives each partition its own
    groups (fedpeft/partition.py).
    """
    key = (cfg.data, cfg.partition, cfg.task.label_words, cfg.task.instruction, cfg.seed)
    if key not in _PARTS:
        train = load_instruction(cfg).train
        keys, _ = partition_keys(train)
        groups = np.array([ex.group for ex in train]) if cfg.partition.scheme == "natural-id" else None
        _PARTS[key] = partition.partition_indices(keys, cfg.partition, cfg.seed, groups=groups)
    return _PARTS[key]


def load_lm_task(cfg: ExperimentConfig) -> CausalLMTask:
    """Build (or fetch from the process cache) the causal-LM task."""
    from fedpeft.causal_lm import build_lm, load_lm_tokenizer, resolve_lm_path

    splits = load_instruction(cfg)

    def build() -> nn.Module:
        model = build_lm(cfg.model, cfg.peft, cfg.seed)
        model.fedpeft_weight_bytes = backbone.measure_weight_bytes(model, cfg.model.quantization)
        model.fedpeft_initial_state = adapters.get_adapter_state(model)
        return model

    model = backbone.cached_model(("causal-lm", cfg.model, cfg.peft, cfg.seed), build)
    tokenizer = load_lm_tokenizer(resolve_lm_path(cfg.model.name))
    return CausalLMTask(cfg, model, tokenizer, splits, model.fedpeft_weight_bytes, model.fedpeft_initial_state)
