"""Shared-seed SPSA: the zeroth-order math that client AND server run.

Two-point SPSA (Spall 1992) with MeZO's in-place perturbation (Malladi et al. 2023):

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps),    theta <- theta - lr * g_hat * z,

where ``z = z(seed)`` is a standard-normal (or Rademacher) vector over the trainable
PEFT parameters only (never the quantized base) and ``g_hat`` is ``g`` after the
one-byte codec (:mod:`fedpeft.onebyte`). Seeds are derived, never sent:
``direction_seed(run seed, round, partition id, step)``.

Bit-exact agreement between clients and server rests on three rules:

1. ``z`` is drawn on the CPU in fp32 from one flat draw over the parameters in sorted-name
   order (so it does not depend on dict order or device), then split and moved.
2. The update is applied to a CPU fp32 *master* copy of theta with one function,
   :func:`apply_direction_`, whose coefficient is computed in float32 by
   :func:`step_coefficient`; the device copy used for forward passes is refreshed from it.
3. The in-place ``+eps z``, ``-2 eps z`` perturbation of the device copy is undone by copying
   the master back, not by ``+eps z``: in floating point ``theta + eps z - 2 eps z + eps z``
   is not ``theta``, and the few-ULP drift would make client and server disagree.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft import onebyte
from fedpeft.batches import cycle_batches
from fedpeft.rng import derive_seed, numpy_rng

log = logging.getLogger(__name__)

Shapes = Mapping[str, tuple[int, ...]]
Tensors = dict[str, torch.Tensor]
DISTRIBUTIONS = ("gaussian", "rademacher")
LR_SCHEDULES = ("constant", "inverse-sqrt")


def direction_seed(run_seed: int, round_: int, partition_id: int, step: int) -> int:
    """Seed of the perturbation of local step ``step`` of ``partition_id`` in ``round_``."""
    return derive_seed(run_seed, f"spsa-direction/{step}", round_, partition_id)


def rounding_rng(run_seed: int, round_: int, partition_id: int, step: int) -> np.random.Generator:
    """Generator for the codec's stochastic rounding of that step (auditable, never sent)."""
    return numpy_rng(run_seed, f"spsa-rounding/{step}", round_, partition_id)


def lr_at(lr: float, schedule: str, round_: int) -> float:
    """Learning rate of ``round_`` (1-based): ``constant`` or ``inverse-sqrt`` (lr / sqrt(round))."""
    if schedule == "constant":
        return float(lr)
    if schedule == "inverse-sqrt":
        return float(lr) / math.sqrt(max(round_, 1))
    raise ValueError(f"unknown spsa.lr-schedule {schedule!r}; choose one of {LR_SCHEDULES}")


def perturbation(seed: int, shapes: Shapes, distribution: str = "gaussian") -> Tensors:
    """The direction ``z(seed)``: CPU fp32 tensors, one flat draw in sorted-name order.

    Parameters
    ----------
    seed : int
        From :func:`direction_seed`.
    shapes : mapping of name -> shape
        The trainable PEFT parameters; their order does not matter.
    distribution : {"gaussian", "rademacher"}
    """
    names = sorted(shapes)
    sizes = [math.prod(shapes[n]) for n in names]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    total = sum(sizes)
    if distribution == "gaussian":
        flat = torch.randn(total, generator=gen, dtype=torch.float32)
    elif distribution == "rademacher":
        flat = torch.randint(0, 2, (total,), generator=gen, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
    else:
        raise ValueError(f"unknown spsa.distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    chunks = torch.split(flat, sizes)
    return {n: c.view(tuple(shapes[n])) for n, c in zip(names, chunks, strict=True)}


def step_coefficient(lr: float, g_hat: float, weight: float = 1.0) -> float:
    """``lr * g_hat * weight`` in float32 arithmetic (the same bits on every machine)."""
    return float(np.float32(lr) * np.float32(g_hat) * np.float32(weight))


def apply_direction_(params: Mapping[str, torch.Tensor], z: Tensors, coeff: float) -> None:
    """In place: ``p <- p - coeff * z`` for every tensor (``coeff`` from :func:`step_coefficient`)."""
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            p.add_(z[name].to(p.device, p.dtype), alpha=-coeff)


def perturb_(params: Mapping[str, torch.Tensor], z: Tensors, scale: float) -> None:
    """In place: ``p <- p + scale * z`` (the forward-pass copy only)."""
    with torch.no_grad():
        for name, p in params.items():
            p.add_(z[name].to(p.device, p.dtype), alpha=scale)


def copy_into_(params: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]) -> None:
    """In place: ``p <- source[name]`` (refresh the device copy from the master)."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(source[name].to(p.device, p.dtype))


@dataclass(frozen=True)
class Estimate:
    """One two-point SPSA estimate."""

    g: float
    loss_plus: float
    loss_minus: float


def spsa_estimate(
    loss_fn: Callable[[], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    master: Tensors,
    z: Tensors,
    eps: float,
    *,
    privatize: Callable[[np.ndarray], float] | None = None,
) -> Estimate:
    """``(L(theta + eps z) - L(theta - eps z)) / (2 eps)``, perturbing ``params`` in place.

    ``params`` must equal ``master`` on entry; on exit they equal it again, bit for bit
    (restored by copy, see the module docstring). With ``privatize`` (DPZero), ``loss_fn``
    returns per-example losses and ``privatize`` turns the per-example projected gradients
    into the released scalar.
    """
    with torch.no_grad():
        perturb_(params, z, eps)
        loss_plus = loss_fn().detach().double().cpu().numpy()
        perturb_(params, z, -2.0 * eps)
        loss_minus = loss_fn().detach().double().cpu().numpy()
    copy_into_(params, master)
    if privatize is None:
        g = (float(loss_plus) - float(loss_minus)) / (2.0 * eps)
    else:
        g = privatize(np.atleast_1d((loss_plus - loss_minus) / (2.0 * eps)))
    return Estimate(g, float(np.mean(loss_plus)), float(np.mean(loss_minus)))


def privatize_scalar(per_example_g: np.ndarray, clip: float, sigma: float, rng: np.random.Generator) -> float:
    """DPZero (Zhang et al. 2023): the released projected gradient of one batch.

    Each example's scalar is clipped to ``[-clip, clip]``; the mean over the B examples then
    moves by at most ``clip / B`` when one example changes, and Gaussian noise of std
    ``sigma * clip / B`` makes the step a Gaussian mechanism with noise multiplier ``sigma``
    (accounted by Opacus' RDP accountant like a DP-SGD step). The one-byte codec comes
    after, as post-processing, so it costs no privacy.
    """
    b = len(per_example_g)
    clipped = np.clip(np.asarray(per_example_g, dtype=np.float64), -clip, clip)
    return float(clipped.mean() + rng.normal(0.0, sigma * clip / b))


def dp_noise_rng(run_seed: int, round_: int, partition_id: int, step: int) -> np.random.Generator:
    """The generator for step ``step``'s DPZero noise (never shared with the rounding draws)."""
    return numpy_rng(run_seed, f"spsa-dpzero-noise/{step}", round_, partition_id)


@dataclass(frozen=True)
class LocalResult:
    """A client's round of SPSA steps: the codes it sends and what it saw."""

    codes: np.ndarray
    g: np.ndarray
    g_hat: np.ndarray
    losses: np.ndarray
    num_examples: int
    skipped: int


def run_local_steps(
    params: Mapping[str, torch.Tensor],
    master: Tensors,
    batches: Iterable,
    loss_fn: Callable[[object], torch.Tensor],
    *,
    run_seed: int,
    round_: int,
    partition_id: int,
    num_steps: int,
    eps: float,
    lr: float,
    scale: float,
    codec: str,
    distribution: str = "gaussian",
    dp_clip: float = 0.0,
    dp_sigma: float = 0.0,
) -> LocalResult:
    """``num_steps`` SPSA steps; each applies the DECODED estimate to ``master`` (and ``params``).

    ``params`` are the model's trainable parameters (any device); ``master`` is the CPU
    fp32 copy that defines theta. A NaN estimate is logged and sent as the zero code.
    """
    shapes = {n: tuple(t.shape) for n, t in master.items()}
    codes, gs, g_hats, losses, examples, skipped = [], [], [], [], 0, 0
    for step, batch in zip(range(num_steps), cycle_batches(batches), strict=False):
        z = perturbation(direction_seed(run_seed, round_, partition_id, step), shapes, distribution)
        privatize = None
        if dp_clip > 0:  # DPZero: loss_fn returns per-example losses
            rng = dp_noise_rng(run_seed, round_, partition_id, step)
            privatize = lambda g, rng=rng: privatize_scalar(g, dp_clip, dp_sigma, rng)  # noqa: E731
        est = spsa_estimate(lambda b=batch: loss_fn(b), params, master, z, eps, privatize=privatize)
        try:
            code = onebyte.encode(est.g, scale, codec=codec, rng=rounding_rng(run_seed, round_, partition_id, step))
        except onebyte.NonFiniteGradient:
            log.warning("round %d partition %d step %d: NaN estimate; sent a zero step", round_, partition_id, step)
            code, skipped = onebyte.zero_code(codec), skipped + 1
        g_hat = float(onebyte.decode(code, scale, codec=codec)[0])
        apply_direction_(master, z, step_coefficient(lr, g_hat))
        copy_into_(params, master)
        codes.append(code[0])
        gs.append(est.g)
        g_hats.append(g_hat)
        losses.append(0.5 * (est.loss_plus + est.loss_minus))
        examples += _batch_size(batch)
    return LocalResult(
        np.array(codes, dtype=onebyte.code_dtype(codec)),
        np.array(gs),
        np.array(g_hats, dtype=np.float32),
        np.array(losses),
        examples,
        skipped,
    )


def to_master(state: Mapping[str, np.ndarray]) -> Tensors:
    """An adapter state (``{name: ndarray}``) as CPU fp32 torch tensors (copies)."""
    return {n: torch.tensor(np.asarray(a, dtype=np.float32)) for n, a in state.items()}


def to_state(master: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """CPU fp32 tensors back to an adapter state (copies, in the master's order)."""
    return {n: t.detach().to("cpu", torch.float32).numpy().copy() for n, t in master.items()}


def state_hash(state: Mapping[str, np.ndarray | torch.Tensor]) -> bytes:
    """8-byte blake2b of the state: names, shapes and fp32 bytes, in sorted-name order."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(state):
        value = state[name]
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.digest()


def _batch_size(batch) -> int:
    if isinstance(batch, Mapping) and "labels" in batch:
        return int(batch["labels"].shape[0])
    return 1
