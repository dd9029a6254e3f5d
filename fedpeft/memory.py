"""How much memory a client needs: frozen backbone, adapter, optimizer state, peak RSS.

A client holds the frozen (quantized) backbone, the trainable PEFT tensors with their
gradients and optimizer moments, and activations for one batch. The first three follow
from the model; activations and the Python/torch runtime show up in the process's peak
resident set (and, on CUDA, in torch's peak allocation).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch
from torch import nn

# fp32 tensors per trainable parameter besides the parameter itself: its gradient, plus
# AdamW's two moments (SGD without momentum keeps none).
OPTIMIZER_STATE_TENSORS = {"adamw": 2, "sgd": 0}


@dataclass(frozen=True)
class ClientMemory:
    """Bytes one client needs, split by what holds them."""

    device: str
    backbone_bytes: int
    adapter_bytes: int
    training_state_bytes: int
    peak_rss_bytes: int
    peak_cuda_bytes: int

    def as_dict(self) -> dict[str, int | str]:
        """Plain dict (for JSON)."""
        return dict(vars(self))


def tensor_bytes(tensors) -> int:
    """Storage bytes of ``tensors`` (each counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def split_bytes(model: nn.Module) -> tuple[int, int]:
    """(frozen bytes, trainable bytes) over the model's parameters and buffers.

    Quantized weights count at their packed size (bitsandbytes stores NF4 as uint8).
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad] + list(model.buffers())
    return tensor_bytes(frozen), tensor_bytes(trainable)


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def measure_client_memory(model: nn.Module, optimizer: str = "adamw") -> ClientMemory:
    """What this process's client model needs, plus the process's peaks so far."""
    frozen, trainable = split_bytes(model)
    device = next(model.parameters()).device
    per_param_extra = 1 + OPTIMIZER_STATE_TENSORS.get(optimizer, 2)
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return ClientMemory(
        device=str(device),
        backbone_bytes=frozen,
        adapter_bytes=trainable,
        training_state_bytes=trainable * per_param_extra,
        peak_rss_bytes=peak_rss_bytes(),
        peak_cuda_bytes=int(cuda_peak),
    )


def format_memory(m: ClientMemory) -> str:
    """One line in MB."""
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    text = (
        f"device {m.device}: backbone {mb(m.backbone_bytes)}, adapter {mb(m.adapter_bytes)}, "
        f"gradients+optimizer {mb(m.training_state_bytes)}, peak RSS {mb(m.peak_rss_bytes)}"
    )
    return text + (f", peak CUDA {mb(m.peak_cuda_bytes)}" if m.device.startswith("cuda") else "")
