"""The task a client or the server works on: model, tokenizer, data, partitions.

Glue between config and the pure pieces, cached per process (see backbone.py for why
the cache lives in an importable module).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpeft import adapters, backbone, data, partition, prefix_cache
from fedpeft.config import ExperimentConfig
from fedpeft.rng import torch_generator

log = logging.getLogger(__name__)


@dataclass
class Task:
    """A PEFT model on its frozen backbone, with its tokenizer and data."""

    cfg: ExperimentConfig
    model: nn.Module
    tokenizer: object
    splits: data.Splits
    weight_bytes: backbone.WeightBytes
    initial_state: adapters.State

    def partition(self, partition_id: int) -> data.TextData:
        """This client's rows of the training pool."""
        parts = partitions(self.cfg)
        if not 0 <= partition_id < len(parts):
            raise ValueError(f"partition-id {partition_id} outside 0..{len(parts) - 1}")
        return self.splits.train.subset(parts[partition_id])

    def client_rows(self, partition_id: int, data_path: str = "") -> data.TextData:
        """This client's training rows: its own file if ``data_path`` is set, else its partition.

        ``data_path`` comes from a SuperNode's ``--node-config data-path=/path/file.csv``. With
        ``evaluate.fraction-clients`` > 0 the client's held-out rows (fedpeft/holdout.py) are left out.
        """
        rows = self._own_rows(partition_id, data_path)
        if self.cfg.evaluate.fraction_clients <= 0:
            return rows
        return rows.subset(self._holdout_split(rows, partition_id)[0])

    def client_holdout(self, partition_id: int, data_path: str = "") -> data.TextData:
        """This client's held-out rows for per-client evaluation (``evaluate.fraction-clients`` > 0)."""
        rows = self._own_rows(partition_id, data_path)
        return rows.subset(self._holdout_split(rows, partition_id)[1])

    def _own_rows(self, partition_id: int, data_path: str) -> data.TextData:
        if data_path:
            return _node_data(data_path, self.cfg.data, self.splits.train.label_names)
        return self.partition(partition_id)

    def _holdout_split(self, rows: data.TextData, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        from fedpeft.holdout import split_holdout

        return split_holdout(
            len(rows), self.cfg.evaluate.holdout_fraction, seed=self.cfg.seed, partition_id=partition_id
        )

    def label_histograms(self) -> np.ndarray:
        """(partitions, labels) label counts, e.g. for label-correlated participation."""
        labels = self.splits.train.labels
        return partition.label_histograms(labels, partitions(self.cfg), len(self.splits.train.label_names))

    def train_loader(self, rows: data.TextData, round_: int, partition_id: int):
        """Shuffled batches for local training, seeded by (seed, round, partition)."""
        gen = torch_generator(self.cfg.seed, "batches", round_, partition_id)
        return self.shuffled_loader(rows, batch_size=self.cfg.train.batch_size, generator=gen)

    def shuffled_loader(self, rows: data.TextData, *, batch_size: int, generator: torch.Generator):
        """Batches of ``batch_size`` rows in the order ``generator`` shuffles them (SPSA's own batches too)."""
        return data.build_loader(
            rows,
            self.tokenizer,
            max_seq_len=self.cfg.data.max_seq_len,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
        )

    def local_update(
        self,
        global_state: adapters.State,
        partition_id: int,
        round_: int,
        *,
        dp_history=None,
        data_path: str = "",
        correction=None,
    ):
        """One client's round: load the global adapter, train locally, return (delta, result).

        The cached model is overwritten from ``global_state`` first, so earlier clients
        served by this process leave no trace. With ``dp.mode="sample"`` the steps are
        DP-SGD (fedpeft/privacy.py); ``dp_history`` is this client's accountant history
        from earlier rounds and ``result.privacy`` the updated one. On CUDA,
        ``result.peak_cuda_bytes`` is torch's peak allocation during this round (the peak
        statistics are reset at its start), the model included. ``correction`` (a
        :class:`fedpeft.drift.DriftCorrection`) adds FedProx's / SCAFFOLD's terms to each gradient.
        """
        from fedpeft.drift import gradient_hook
        from fedpeft.rng import derive_seed
        from fedpeft.train import train_local

        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        adapters.set_adapter_state(self.model, global_state)
        rows = self.client_rows(partition_id, data_path)
        loader = self.train_loader(rows, round_, partition_id)
        hook = None
        if correction is not None:
            hook = gradient_hook(adapters.trainable_parameters(self.model), global_state, correction)
        store = self.lst_store(partition_id) if self.cfg.peft.method == "lst" else None
        if store is not None:  # the first round computes every row's ladder inputs; later ones find them all
            store.fill(self.model, loader)
        logits_fn = store.logits_fn(self.model) if store is not None else self.logits_fn()
        if self.cfg.train.logit_adjust != 0:  # local loss only; evaluation keeps the raw logits
            logits_fn = self._adjusted(logits_fn, rows)
        if self.cfg.dp.mode == "sample":
            from fedpeft.privacy import train_local_private

            if hook is not None:  # validation refuses it first; Opacus would overwrite the corrected gradient
                raise ValueError("FedProx / SCAFFOLD terms are not applied under dp.mode='sample'")

            result = train_local_private(
                self.model,
                loader,
                self.cfg,
                partition_id=partition_id,
                round_=round_,
                history=dp_history,
                logits_fn=logits_fn,
            )
        else:
            result = train_local(
                self.model,
                loader,
                self.cfg.train,
                dropout_seed=derive_seed(self.cfg.seed, "dropout", round_, partition_id),
                logits_fn=logits_fn,
                grad_hook=hook,
            )
        if store is not None:  # the next round of this client reads it, wherever it runs
            store.save()
        delta = adapters.compute_delta(adapters.get_adapter_state(self.model), global_state)
        if device.type == "cuda":
            result = dataclasses.replace(result, peak_cuda_bytes=int(torch.cuda.max_memory_allocated(device)))
        return delta, result

    def _adjusted(self, logits_fn, rows: data.TextData):
        """``logits_fn`` (None: the full forward) plus ``train.logit-adjust`` * log(the rows' label prior)."""
        from fedpeft.logit_adjust import adjusted_logits_fn, label_log_prior
        from fedpeft.train import forward_logits

        forward = logits_fn if logits_fn is not None else (lambda batch: forward_logits(self.model, batch))
        log_prior = label_log_prior(rows.labels, len(self.splits.train.label_names))
        return adjusted_logits_fn(forward, log_prior, self.cfg.train.logit_adjust)

    def client_ranks(self) -> list[int]:
        """Every partition's LoRA rank, from ``clients.rank-profile`` (fedpeft/ranks.py)."""
        from fedpeft import ranks

        return ranks.client_ranks(self.cfg, self.training_bytes)

    def training_bytes(self, rank: int) -> int:
        """A client's training memory at LoRA ``rank`` (see fedpeft/ranks.py); the active adapter is kept."""
        from fedpeft import ranks

        active = self.model.peft_config[self.model.active_adapter].r
        adapters.use_rank(self.model, rank)
        trainable = adapters.num_trainable(self.model)
        adapters.use_rank(self.model, active)
        return ranks.training_bytes(self.weight_bytes.total_bytes, trainable, self.cfg.train.optimizer)

    def lst_store(self, partition_id: int | None = None):
        """LST's activation store (fedpeft/lst_store.py) of a client, or of evaluation sets (None).

        A client's store lives in ``<run folder>/lst-store/``; the run folder is ``out-dir``,
        which the launcher sets to ``--out`` for the ClientApp (default ``runs/<name>/seed-<seed>``).
        """
        from fedpeft import lst_store
        from fedpeft.results import default_run_dir

        cfg = self.cfg
        fingerprint = lst_store.store_fingerprint(cfg.model, self.model.side.plan.layers)
        max_bytes = cfg.train.lst_store_mb * 2**20
        if partition_id is None:
            return lst_store.eval_store(fingerprint=fingerprint, max_bytes=max_bytes)
        run_dir = Path(cfg.out_dir) if cfg.out_dir else default_run_dir(cfg.name, cfg.seed)
        return lst_store.client_store(
            store_dir=run_dir / lst_store.STORE_FOLDER,
            fingerprint=fingerprint,
            partition_id=partition_id,
            max_bytes=max_bytes,
        )

    def logits_fn(self):
        """The frozen-prefix cache's forward when ``train.prefix-cache = "auto"`` can use one, else None.

        None (the model's full forward) for ``off``, for methods that train the lowest layer
        or the embeddings (``k = 0``: LoRA on every layer, IA3, prompt, BitFit, full), for
        architectures outside the BERT family and for left-padding tokenizers.
        """
        if self.cfg.peft.method == "lst":  # the side network on stored ladder inputs
            return self.lst_store().logits_fn(self.model)
        cache = getattr(self.model, "fedpeft_prefix_cache", None)
        if self.cfg.train.prefix_cache == "off" or cache is None:
            return None
        if getattr(self.tokenizer, "padding_side", "right") != "right":
            return None
        return cache.logits

    def evaluate(self, state: adapters.State, loader=None) -> dict:
        """Loss and accuracy of the model at ``state`` over ``loader`` (default: the test set)."""
        from fedpeft.train import evaluate

        adapters.set_adapter_state(self.model, state)
        return evaluate(self.model, loader if loader is not None else self.test_loader(), self.logits_fn())

    def test_loader(self):
        """The fixed held-out set, in order."""
        return self._eval_loader(self.splits.test)

    def validation_loader(self):
        """The validation rows (``data.num-val-examples`` > 0), in order; None without them."""
        return None if self.splits.validation is None else self._eval_loader(self.splits.validation)

    def _eval_loader(self, rows: data.TextData):
        return data.build_loader(
            rows,
            self.tokenizer,
            max_seq_len=self.cfg.data.max_seq_len,
            batch_size=self.cfg.train.eval_batch_size,
            shuffle=False,
        )


def model_key(cfg: ExperimentConfig, num_labels: int) -> tuple:
    """What makes two cached models interchangeable (the seed fixes the initial adapter)."""
    return (cfg.model, cfg.peft, num_labels, cfg.seed)


def describe_model(cfg: ExperimentConfig, num_labels: int) -> str:
    """The model in words: ``embedded, NF4-quantized, LoRA r=8 on query,value, 2 labels``."""
    quant = {"none": "not quantized", "int8": "int8-quantized", "nf4": "NF4-quantized"}[cfg.model.quantization]
    method = {"lora": "LoRA", "ia3": "IA3", "prompt": "prompt tuning", "bitfit": "BitFit", "head": "head only"}
    peft = method.get(cfg.peft.method, "full fine-tuning")
    if cfg.peft.method == "lora":
        peft += f" r={cfg.peft.lora_rank} on {cfg.peft.target_modules}" + (
            " (FFA: A frozen)" if cfg.peft.lora_variant == "ffa" else ""
        )
    elif cfg.peft.method == "prompt":
        peft += f" ({cfg.peft.num_virtual_tokens} virtual tokens)"
    return f"{cfg.model.name}, {quant}, {peft}, {num_labels} labels"


def load_classification_task(cfg: ExperimentConfig) -> Task:
    """Build (or fetch from the process cache) a sequence-classification task (``task.kind = "classification"``).

    Callers use :func:`fedpeft.tasks.load_task`, which picks the kind.
    """
    splits = data.load_splits(cfg.data)
    num_labels = len(splits.train.label_names)
    holder: dict[str, backbone.WeightBytes] = {}

    def build() -> nn.Module:
        base = backbone.load_backbone(cfg.model, num_labels, seed=cfg.seed, label_names=splits.train.label_names)
        holder["bytes"] = backbone.measure_weight_bytes(base, cfg.model.quantization)
        model = adapters.inject_adapters(base, cfg.peft, seed=cfg.seed)
        model.fedpeft_weight_bytes = holder["bytes"]
        model.fedpeft_initial_state = adapters.get_adapter_state(model)
        # Filled lazily; only ever used when train.prefix-cache allows it (Task.logits_fn).
        model.fedpeft_prefix_cache = prefix_cache.build_prefix_cache(model)
        model.eval()
        return model

    model = backbone.cached_model(model_key(cfg, num_labels), build, describe_model(cfg, num_labels))
    tokenizer = data.load_tokenizer(backbone.resolve_model_path(cfg.model.name))
    return Task(cfg, model, tokenizer, splits, model.fedpeft_weight_bytes, model.fedpeft_initial_state)


_NODE_DATA: dict[tuple, data.TextData] = {}


def _node_data(path: str, cfg, label_names: tuple[str, ...]) -> data.TextData:
    # Cached per process: a warm ClientApp worker serves every round from one read.
    key = (path, cfg, label_names)
    if key not in _NODE_DATA:
        _NODE_DATA[key] = data.load_node_data(path, cfg, label_names)
    return _NODE_DATA[key]


_PARTS: dict[tuple, list] = {}


def partitions(cfg: ExperimentConfig) -> list:
    """Row indices per partition (cached per process; pure function of the config)."""
    key = (cfg.data, cfg.partition, cfg.seed)
    if key not in _PARTS:
        splits = data.load_splits(cfg.data)
        _PARTS[key] = partition.partition_indices(splits.train.labels, cfg.partition, cfg.seed)
    return _PARTS[key]


def set_threads(n: int) -> None:
    """Torch intra-op threads and numpy's BLAS threads for this process (1 per simulated client by default).

    BLAS is limited too because the server's numpy work (FlexLoRA's SVDs, FedAvg's sums) otherwise
    starts one busy-waiting OpenBLAS thread per core next to the clients: measured here, a FlexLoRA
    round took 12.8 s median under load with default BLAS threads and 0.04-0.07 s with one
    (docs/benchmarks.md). threadpoolctl is the documented way to set it after numpy is imported.
    """
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    global _BLAS_LIMIT
    if _BLAS_LIMIT != n:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n, user_api="blas")
        _BLAS_LIMIT = n


_BLAS_LIMIT: int | None = None
