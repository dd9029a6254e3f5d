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
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from fedpeft.config import ConfigError, DPConfig

log = logging.getLogger(__name__)

ACCOUNTANT = "rdp"

#: one accountant entry: (noise multiplier, sample rate, number of steps)
HistoryEntry = tuple[float, float, int]


def epsilon_from_history(history: list[HistoryEntry], delta: float) -> float:
    """Epsilon spent at ``delta`` by a sequence of DP-SGD steps (Opacus' RDP accountant)."""
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    accountant = create_accountant(mechanism=ACCOUNTANT)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta=delta))


def plan_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, what: str = "the planned run"
) -> float:
    """Smallest ``sigma`` (Opacus' search) so that ``steps`` steps at ``sample_rate`` spend ``target_epsilon``.

    Raises
    ------
    ConfigError
        If no noise multiplier reaches the target, with the settings to change.
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # huge sigmas push the optimal RDP order to the largest alpha
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=ACCOUNTANT,
            )
    except ValueError as err:
        raise ConfigError(
            f"dp.target-epsilon={target_epsilon} at dp.delta={delta} cannot be reached by any noise multiplier "
            f"for {what} ({steps} steps at sample rate {sample_rate:.4g}; Opacus says: {err}); "
            "raise dp.target-epsilon or dp.delta, take fewer steps (num-rounds; for DP-SGD also "
            "train.local-steps / train.local-epochs), or set dp.target-epsilon=0 and choose dp.noise-multiplier"
        ) from None
    return float(sigma)


def poisson_rate(num_examples: int, batch_size: int) -> float:
    """Opacus' sample rate ``1 / len(loader)`` for a loader of ``num_examples`` rows."""
    return 1.0 / math.ceil(num_examples / batch_size)


def local_steps_per_round(num_examples: int, batch_size: int, local_steps: int, local_epochs: int) -> int:
    """Local steps a client takes per round (``train.local-steps``, else epochs x batches)."""
    return local_steps if local_steps > 0 else local_epochs * math.ceil(num_examples / batch_size)


def client_noise_multiplier(dp: DPConfig, *, num_examples: int, batch_size: int, steps_per_round: int, num_rounds: int):
    """``sigma`` for a client with ``num_examples`` rows: ``dp.noise-multiplier`` or planned from the target."""
    if dp.target_epsilon <= 0:
        return dp.noise_multiplier
    return plan_noise_multiplier(
        target_epsilon=dp.target_epsilon,
        delta=dp.delta,
        sample_rate=poisson_rate(num_examples, batch_size),
        steps=num_rounds * steps_per_round,
        what=f"a client with {num_examples} examples online in all {num_rounds} rounds",
    )


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
    client's partition size over ``num-rounds`` rounds (see :func:`client_noise_multiplier`).
    """
    from fedpeft.rng import derive_seed
    from fedpeft.train import build_optimizer, train_local

    num_examples = len(loader.dataset)
    steps = local_steps_per_round(num_examples, cfg.train.batch_size, cfg.train.local_steps, cfg.train.local_epochs)
    sigma = client_noise_multiplier(
        cfg.dp,
        num_examples=num_examples,
        batch_size=cfg.train.batch_size,
        steps_per_round=steps,
        num_rounds=cfg.num_rounds,
    )
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
