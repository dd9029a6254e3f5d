"""Logit adjustment of the local loss against label skew (``train.logit-adjust``).

Under label skew each client's local optimum is "predict my own majority class", and the
mean of those updates drifts towards the population's majority. The logit-adjusted loss
(Menon et al., ICLR 2021, "Long-tail learning via logit adjustment"; in federated learning
FedLC, Zhang et al., ICML 2022) trains on ``logits + tau * log(prior)``, where ``prior`` is
the client's own label distribution: a class the client sees often already gets a head start
in the loss, so the update need not move the model towards it, and an absent class (floored
prior, a large negative offset) is barely pushed down. Only local training uses it;
evaluation scores the raw logits.

Hand-written because it is three lines over the logits: no library ships it as a loss for
Hugging Face sequence classifiers, and the offset must come from each client's own rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

#: prior given to a class the client holds no row of: log(1e-3) = -6.9 instead of -inf
PRIOR_FLOOR = 1e-3


def label_log_prior(labels: np.ndarray, num_classes: int, *, floor: float = PRIOR_FLOOR) -> torch.Tensor:
    """log of the label frequencies of ``labels`` (a client's rows), each at least ``floor``.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels in ``0 .. num_classes - 1``.
    num_classes : int
        Number of classes of the task (the logits' width).
    floor : float
        Smallest prior, so an absent class gets a finite offset.

    Returns
    -------
    torch.Tensor
        ``(num_classes,)`` float32 log priors.
    """
    if len(labels) == 0:
        raise ValueError("logit adjustment needs the client's labels; it holds no rows")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    prior = np.maximum(counts / counts.sum(), floor)
    return torch.tensor(np.log(prior), dtype=torch.float32)


def adjusted(logits: torch.Tensor, log_prior: torch.Tensor, tau: float) -> torch.Tensor:
    """``logits + tau * log_prior`` (``log_prior`` per class, or per row and class), in float32."""
    return logits.float() + tau * log_prior.to(logits.device)


def adjusted_logits_fn(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], log_prior: torch.Tensor, tau: float
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Wrap a ``batch -> logits`` forward so local training sees the adjusted logits."""

    def fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return adjusted(forward(batch), log_prior, tau)

    return fn
