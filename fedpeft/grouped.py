"""Per-client linear maps over one concatenated batch (the arithmetic of batched cohorts).

A batched cohort concatenates the current batch of K clients, client after client, and
runs the shared frozen backbone once. Each adapted layer then adds client k's own LoRA
term ``scale * B_k A_k x`` to the rows of client k, and the head applies client k's own
``W_k x + b_k``. :func:`grouped_chain` computes these with one ``torch.bmm`` per factor
over all clients (no Python loop over clients): the rows are laid out as (K, M, ...) with
M the largest client batch, zero rows filling the shorter ones (a reshape, no copy, when
every client brought the same number of rows).

:class:`CohortLoraLinear` and :class:`CohortHead` stand in for peft's LoRA layers and
head wrapper while a cohort trains (fedpeft/cohort.py swaps them in and back out); each
reads the per-client factors by reference and the current :class:`Segments` from a
shared :class:`CohortStep`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Segments:
    """Where each client's rows sit in a concatenated batch.

    Attributes
    ----------
    counts : tuple of int
        Rows per client, in concatenation order.
    client : Tensor
        (N,) position of each row's client in ``counts``.
    slot : Tensor or None
        (N,) row index in the padded (K * M) layout; ``None`` when all counts are equal.
    """

    counts: tuple[int, ...]
    client: torch.Tensor
    slot: torch.Tensor | None

    @classmethod
    def from_counts(cls, counts: list[int] | tuple[int, ...], device: torch.device | str = "cpu") -> Segments:
        """Segments for ``counts[k]`` consecutive rows of client k, k = 0..K-1."""
        if not counts or min(counts) < 1:
            raise ValueError(f"every client needs at least one row, got counts {list(counts)}")
        sizes = torch.tensor(list(counts), device=device)
        client = torch.repeat_interleave(torch.arange(len(counts), device=device), sizes)
        slot = None
        if len(set(counts)) > 1:
            starts = torch.cumsum(sizes, 0) - sizes
            pos = torch.arange(int(sizes.sum()), device=device) - starts[client]
            slot = client * max(counts) + pos
        return cls(tuple(int(c) for c in counts), client, slot)

    @property
    def width(self) -> int:
        """M: rows per client in the padded layout."""
        return max(self.counts)


def grouped_chain(x: torch.Tensor, weights: list[torch.Tensor], seg: Segments) -> torch.Tensor:
    """``x_i W_1[k]^T W_2[k]^T ...`` for each row i of client k = ``seg.client[i]``.

    Parameters
    ----------
    x : Tensor
        (N, ..., d_in); rows grouped by client as ``seg`` says.
    weights : list of Tensor
        Per-client factors in application order, each (K, d_out, d_in) like ``nn.Linear.weight``.
    seg : Segments
        The row layout of ``x``.
    """
    n, k, m = x.shape[0], len(seg.counts), seg.width
    inner = x.shape[1:-1]
    tokens = math.prod(inner)
    h = x.reshape(n, tokens, x.shape[-1])
    if seg.slot is not None:
        h = h.new_zeros(k * m, tokens, h.shape[-1]).index_copy(0, seg.slot, h)
    h = h.reshape(k, m * tokens, h.shape[-1])
    for w in weights:
        h = torch.bmm(h, w.transpose(1, 2))
    h = h.reshape(k * m, tokens, h.shape[-1])
    if seg.slot is not None:
        h = h.index_select(0, seg.slot)
    return h.reshape(n, *inner, h.shape[-1])


@dataclass
class CohortStep:
    """The current step: which clients are in the batch (indices into the cohort) and where."""

    active: list[int] = field(default_factory=list)
    segments: Segments | None = None

    def stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The active clients' tensors stacked on a new leading axis (gradients flow back)."""
        return torch.stack([tensors[i] for i in self.active])

    @property
    def seg(self) -> Segments:
        """The segments of the current batch (set before every forward)."""
        if self.segments is None:
            raise RuntimeError("CohortStep.segments is unset: set it before the forward pass")
        return self.segments


class CohortLoraLinear(nn.Module):
    """``base(x) + scaling * B_k A_k x`` per row, k the row's client (peft's LoRA math, dropout 0).

    ``lora_a[c]`` / ``lora_b[c]`` are client c's own (r, d_in) / (d_out, r) leaf tensors; they
    are held in plain lists, so they are not registered as this module's parameters.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        scaling: float,
        lora_a: list[torch.Tensor],
        lora_b: list[torch.Tensor],
        step: CohortStep,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = scaling
        self.lora_a, self.lora_b, self.step = lora_a, lora_b, step

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        a = self.step.stack(self.lora_a)
        b = self.step.stack(self.lora_b)
        # As peft does outside autocast: the LoRA term in the adapter's dtype, added in the base's.
        autocast = torch.is_autocast_enabled()
        if not autocast:
            x = x.to(a.dtype)
        seg = self.step.seg
        if seg.slot is None and not autocast and result.dtype == a.dtype:
            # Equal segments: one fused result + scaling * (x A^T) B^T, no scaled temporary
            # (not under autocast, where baddbmm would round the base result to the autocast dtype).
            k = len(seg.counts)
            h = torch.bmm(x.reshape(k, -1, x.shape[-1]), a.transpose(1, 2))
            out = torch.baddbmm(result.reshape(k, -1, result.shape[-1]), h, b.transpose(1, 2), alpha=self.scaling)
            return out.reshape(result.shape)
        delta = grouped_chain(x, [a, b], seg) * self.scaling
        return result + delta.to(result.dtype)


class CohortHead(nn.Module):
    """``W_k x + b_k`` per row, k the row's client (a trainable linear classification head)."""

    def __init__(self, weight: list[torch.Tensor], bias: list[torch.Tensor] | None, step: CohortStep) -> None:
        super().__init__()
        self.weight, self.bias, self.step = weight, bias, step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seg = self.step.seg
        out = grouped_chain(x, [self.step.stack(self.weight)], seg)
        if self.bias is not None:
            b = self.step.stack(self.bias)[seg.client]  # (N, d_out): one gathered row per example
            out = out + b.reshape(b.shape[0], *([1] * (out.dim() - 2)), b.shape[1])
        return out


@contextmanager
def swapped_modules(model: nn.Module, replacements: dict[str, nn.Module]):
    """Put ``replacements`` (``{submodule path: module}``) into ``model``; restore the originals on exit.

    The originals are put back as the same objects in the same places, so the model is
    left exactly as found (registration order included), even when the body raises.
    """
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, new in replacements.items():
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            originals.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)
        yield model
    finally:
        for parent, child, old in reversed(originals):
            setattr(parent, child, old)
