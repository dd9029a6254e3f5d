"""Sample-level DP-SGD with Opacus on a PEFT model, and Opacus-based epsilon accounting.

DP-SGD (Abadi et al. 2016): per-sample gradients of the trainable PEFT parameters only
(the quantized base is frozen and has none), each clipped to L2 norm ``C``, summed,
Gaussian noise of std ``sigma * C`` added, divided by the expected batch size; batches
are Poisson-sampled with rate ``q = 1 / len(loader)``. Opacus does all of it; this
module only wires it to fedpeft's seeds and per-process model cache:

- ``make_private(wrap_model=False)`` attaches Opacus' hooks to the cached model
  itself; :func:`dp_sgd` removes them and every attribute Opacus adds to parameters
  (``GradSampleHooks.cleanup``) on exit, so later non-DP use of the cached model in
  the same process sees an ordinary module (tested).
- Noise and Poisson sampling draw from explicit generators (``derive_seed``).
- Epsilon comes from Opacus' RDP accountant only. A client's accountant history
  (``[(sigma, q, steps), ...]``) is carried across rounds by the caller (Flower's
  ``context.state``), see :func:`history_to_lists`.

A target ``(epsilon, delta)`` is turned into ``sigma`` with Opacus'
``get_noise_multiplier`` (what ``make_private_with_epsilon`` calls), over the planned
``num_rounds x local steps`` so a client that is online every round ends at most at the
target; ``make_private_with_epsilon`` itself counts steps as ``int(epochs / q)``,
which cannot express "local steps per round".
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from fedpeft.privacy_plan import (
    ACCOUNTANT,
    HistoryEntry,
    client_noise_multiplier,
    epsilon_from_history,
    plan_noise_multiplier,
    poisson_rate,
    sample_noise_multiplier,
)

log = logging.getLogger(__name__)

#: the planning and accounting functions live in fedpeft/privacy_plan.py (no torch); re-exported here
__all__ = [
    "ACCOUNTANT",
    "HistoryEntry",
    "client_noise_multiplier",
    "epsilon_from_history",
    "plan_noise_multiplier",
    "poisson_rate",
    "sample_noise_multiplier",
]


@dataclass
class DPSession:
    """What :func:`dp_sgd` yields: the wrapped optimizer and loader, and the accountant."""

    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    accountant: object
    noise_multiplier: float
    sample_rate: float
    history: list[HistoryEntry] = field(default_factory=list)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far (earlier rounds included), from Opacus' accountant."""
        return epsilon_from_history(self.history, delta)


@contextmanager
def dp_sgd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    *,
    noise_multiplier: float,
    clip_norm: float,
    history: list[HistoryEntry] | None = None,
    noise_seed: int,
    sampling_seed: int,
    poisson: bool = True,
    grad_sample_mode: str = "hooks",
) -> Iterator[DPSession]:
    """Make ``model``/``optimizer``/``loader`` private for the ``with`` block, then restore ``model``.

    Parameters
    ----------
    model : nn.Module
        The PEFT model (trained in place; Opacus' hooks are removed on exit).
    optimizer : torch.optim.Optimizer
        Over the trainable parameters of ``model`` only.
    loader : DataLoader
        The client's loader; with ``poisson`` its dataset is re-sampled with rate
        ``1 / len(loader)`` from a generator seeded by ``sampling_seed``.
    noise_multiplier, clip_norm : float
        ``sigma`` and ``C``.
    history : list, optional
        Accountant history of earlier rounds; the session's ``history`` extends it.
    noise_seed, sampling_seed : int
        Seeds of the noise and Poisson-sampling generators.
    poisson : bool
        False keeps ``loader``'s fixed batches (tests; the accounting then assumes a
        sampling that did not happen).
    grad_sample_mode : str
        Opacus' per-sample gradient engine: ``hooks`` or ``functorch``.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    device = next(p for p in model.parameters()).device
    noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
    if poisson:
        sample_gen = torch.Generator(device="cpu").manual_seed(sampling_seed)
        loader = DPDataLoader.from_data_loader(loader, generator=sample_gen)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # seeded noise is the point here
        engine = PrivacyEngine(accountant=ACCOUNTANT)
    engine.accountant.history = list(history or [])
    was_training = model.training
    model.train()  # Opacus validates train mode and only records activations in it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        hooks, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=clip_norm,
            poisson_sampling=False,  # the loader above already samples (with our generator)
            noise_generator=noise_gen,
            grad_sample_mode=grad_sample_mode,
            wrap_model=False,
        )
    session = DPSession(
        optimizer=dp_optimizer,
        loader=dp_loader,
        accountant=engine.accountant,
        noise_multiplier=noise_multiplier,
        sample_rate=1.0 / len(dp_loader),
    )
    try:
        with warnings.catch_warnings():
            # frozen inputs: the full backward hook fires on module outputs, which is what Opacus needs
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield session
    finally:
        session.history = [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
        hooks.cleanup()
        model.train(was_training)


def history_to_lists(history: list[HistoryEntry]) -> dict[str, list]:
    """Accountant history as three parallel lists (fits a Flower ``ConfigRecord``)."""
    return {
        "noise-multiplier": [float(s) for s, _, _ in history],
        "sample-rate": [float(q) for _, q, _ in history],
        "steps": [int(n) for _, _, n in history],
    }


def history_from_lists(record) -> list[HistoryEntry]:
    """Inverse of :func:`history_to_lists` (accepts a ``ConfigRecord`` or a dict)."""
    if not record:
        return []
    return [
        (float(s), float(q), int(n))
        for s, q, n in zip(record["noise-multiplier"], record["sample-rate"], record["steps"], strict=True)
    ]


def train_local_private(model: nn.Module, loader, cfg, *, partition_id: int, round_: int, history=None, logits_fn=None):
    """``train.train_local`` under DP-SGD with ``cfg.dp``; the result's ``privacy`` holds epsilon and history.

    ``logits_fn`` (a prefix cache's forward) calls the same hooked modules, so Opacus'
    per-sample gradients stay exact (tested).

    ``sigma`` is ``dp.noise-multiplier``, or planned from ``dp.target-epsilon`` for this
    client's partition size over ``num-rounds`` rounds (``fedpeft.privacy_plan``, the plan's own formula).
    """
    from fedpeft.rng import derive_seed
    from fedpeft.train import build_optimizer, train_local

    sigma = sample_noise_multiplier(cfg, len(loader.dataset))
    with dp_sgd(
        model,
        build_optimizer(model, cfg.train),
        loader,
        noise_multiplier=sigma,
        clip_norm=cfg.dp.clip_norm,
        history=history,
        noise_seed=derive_seed(cfg.seed, "dp-noise", round_, partition_id),
        sampling_seed=derive_seed(cfg.seed, "dp-poisson", round_, partition_id),
        grad_sample_mode=cfg.dp.grad_sample_mode,
    ) as session:
        result = train_local(
            model,
            session.loader,
            cfg.train,
            dropout_seed=derive_seed(cfg.seed, "dropout", round_, partition_id),
            optimizer=session.optimizer,
            logits_fn=logits_fn,
        )
    privacy = {
        "epsilon": session.epsilon(cfg.dp.delta),
        "delta": cfg.dp.delta,
        "noise-multiplier": sigma,
        "sample-rate": session.sample_rate,
        "history": session.history,
    }
    return dataclasses.replace(result, privacy=privacy)
