"""Local first-order training and evaluation of the trainable PEFT parameters."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.backbone import compute_context
from fedpeft.batches import cycle_batches, planned_steps
from fedpeft.config import TrainConfig

log = logging.getLogger(__name__)

#: ``batch -> logits``; None means the model's full forward (:func:`forward_logits`).
LogitsFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    """What one client's local training reports."""

    mean_loss: float
    first_loss: float
    last_loss: float
    num_examples: int
    num_steps: int
    privacy: dict | None = None  # DP-SGD: epsilon, delta, noise multiplier, accountant history
    peak_cuda_bytes: int = 0  # on CUDA: torch's peak allocation during this local round (Task.local_update)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters only."""
    return build_param_optimizer([p for p in model.parameters() if p.requires_grad], cfg)


def build_param_optimizer(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params`` (a batched cohort builds one per client)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for a tokenized batch (labels are kept out of the model call)."""
    device = next(p for p in model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    with compute_context(model):
        return model(**inputs).logits


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], logits_fn: LogitsFn | None = None) -> torch.Tensor:
    """Mean cross-entropy of one batch (``logits_fn``: e.g. a prefix cache's forward).

    Token labels (2-D, a causal LM's) give the response-only loss of fedpeft/lm_batches.py.
    """
    logits = forward_logits(model, batch) if logits_fn is None else logits_fn(batch)
    if batch["labels"].dim() == 2:  # a causal LM's token targets, -100 on prompt and padding
        from fedpeft.lm_batches import response_loss

        return response_loss(logits, batch["labels"])
    return F.cross_entropy(logits.float(), batch["labels"].to(logits.device))


def train_local(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    cfg: TrainConfig,
    *,
    dropout_seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    logits_fn: LogitsFn | None = None,
    grad_hook: Callable[[], None] | None = None,
) -> TrainResult:
    """Run local steps; only parameters with ``requires_grad`` change.

    Dropout draws from torch's global generator (modules take no generator argument), so
    the steps run inside a forked global RNG seeded with ``dropout_seed``: the caller's RNG
    state is untouched and the run is reproducible. ``logits_fn`` replaces the model's full
    forward (fedpeft/prefix_cache.py); None keeps it. ``grad_hook`` runs between each
    backward and optimizer step (FedProx / SCAFFOLD terms, fedpeft/drift.py); None adds nothing.
    """
    optimizer = optimizer or build_optimizer(model, cfg)
    steps = planned_steps(len(loader), cfg.local_steps, cfg.local_epochs)
    losses: list[float] = []
    examples = 0
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(dropout_seed)
        for batch in itertools.islice(cycle_batches(loader), steps):
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(model, batch, logits_fn)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"local loss became {loss.item()} at step {len(losses)}; lower train.lr")
            loss.backward()
            if grad_hook is not None:
                grad_hook()
            optimizer.step()
            losses.append(loss.item())
            examples += int(batch["labels"].shape[0])
    model.eval()
    return TrainResult(
        mean_loss=sum(losses) / len(losses),
        first_loss=losses[0],
        last_loss=losses[-1],
        num_examples=examples,
        num_steps=len(losses),
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, logits_fn: LogitsFn | None = None) -> dict:
    """Mean loss, accuracy, per-class accuracy (recall) and balanced accuracy over ``loader``.

    Balanced accuracy is the mean of the per-class accuracies of the classes present.
    ``logits_fn`` replaces the model's full forward as in :func:`train_local`.
    """
    model.eval()
    total_loss, n = 0.0, 0
    hits = counts = None
    for batch in loader:
        logits = forward_logits(model, batch) if logits_fn is None else logits_fn(batch)
        labels = batch["labels"].to(logits.device)
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        if hits is None:
            hits = torch.zeros(logits.shape[-1], dtype=torch.long)
            counts = torch.zeros(logits.shape[-1], dtype=torch.long)
        correct = (logits.argmax(-1) == labels).cpu()
        hits += torch.bincount(labels.cpu()[correct], minlength=hits.numel())
        counts += torch.bincount(labels.cpu(), minlength=counts.numel())
        n += int(labels.shape[0])
    per_class = [float(h) / float(c) if c else None for h, c in zip(hits.tolist(), counts.tolist(), strict=True)]
    present = [a for a in per_class if a is not None]
    return {
        "loss": total_loss / n,
        "accuracy": float(hits.sum()) / n,
        "balanced_accuracy": sum(present) / len(present),
        "per_class_accuracy": per_class,
        "num_examples": float(n),
    }
