"""The privacy plan: every noise multiplier a run uses, computed in one place from explicit inputs.

``plan_privacy(cfg, sizes, online)`` (config, partition sizes, the participation trace) is
computed once by the ServerApp and by ``fedpeft check``; the ServerApp hands it to the
strategy through ``StrategyContext.privacy_plan`` (strategies load no data). Sample-level
clients know only their own partition, so they call :func:`sample_noise_multiplier`, the
very function the plan evaluates for every partition size: one formula, one place.

- Client-level DP (DP-FedAvg): sigma is ``dp.noise-multiplier``, or planned with Opacus so
  ``num-rounds`` releases at the largest planned sample rate ``max_t m_t / N`` spend at most
  ``dp.target-epsilon``. The rate is an approximation: clients are drawn by the
  participation model (e.g. a fixed-size sample), while the accountant analyses Poisson
  sampling.
- Sample-level DP (DP-SGD, DPZero): per client, sigma for ``num-rounds x local steps`` at
  Opacus' sample rate ``1 / ceil(n / B)``, so a client online every round ends at most at
  the target.

Opacus is imported only when a function needs it (no torch at import).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedpeft.batches import planned_steps
from fedpeft.config import ConfigError

if TYPE_CHECKING:
    from fedpeft.config import ClientPrivacy, ExperimentConfig, SamplePrivacy

ACCOUNTANT = "rdp"

#: one accountant entry: (noise multiplier, sample rate, number of steps)
HistoryEntry = tuple[float, float, int]


def epsilon_from_history(history: list[HistoryEntry], delta: float) -> float:
    """Epsilon spent at ``delta`` by a sequence of noisy steps (Opacus' RDP accountant)."""
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


def client_noise_multiplier(
    dp: SamplePrivacy | ClientPrivacy, *, num_examples: int, batch_size: int, steps_per_round: int, num_rounds: int
):
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


def sample_schedule(cfg: ExperimentConfig, num_examples: int) -> tuple[int, int]:
    """``(batch size, noisy steps per round)`` of a sample-level DP client with ``num_examples`` rows.

    DPZero (``strategy.name = "spsa"``) takes ``spsa.local-steps`` steps of ``spsa.batch-size``;
    DP-SGD takes ``train.local-steps`` (else epochs x batches) of ``train.batch-size``.
    """
    if cfg.strategy.name == "spsa":
        return cfg.spsa.batch_size, cfg.spsa.local_steps
    batch = cfg.train.batch_size
    return batch, planned_steps(math.ceil(num_examples / batch), cfg.train.local_steps, cfg.train.local_epochs)


def sample_noise_multiplier(cfg: ExperimentConfig, num_examples: int) -> float:
    """The sigma of a sample-level DP client with ``num_examples`` rows (what every such client uses)."""
    batch, steps = sample_schedule(cfg, num_examples)
    return client_noise_multiplier(
        cfg.dp, num_examples=num_examples, batch_size=batch, steps_per_round=steps, num_rounds=cfg.num_rounds
    )


@dataclass(frozen=True)
class PrivacyPlan:
    """Every noise multiplier of a run and the epsilon it plans to spend.

    Attributes
    ----------
    mode : str
        ``dp.mode``: ``none``, ``sample`` or ``client``.
    delta : float
        The delta epsilon is reported at.
    client_sigma, client_rate : float
        Client-level DP: the server's sigma and the largest planned fraction of clients online.
    sample_sigmas : dict
        Sample-level DP: partition size -> sigma of a client with that many rows.
    epsilon : float
        Planned epsilon (client level: the whole run; sample level: the worst client online every round).
    zeroth_order : bool
        Sample-level DP by DPZero (SPSA clients) rather than DP-SGD.
    """

    mode: str
    delta: float = 0.0
    client_sigma: float = 0.0
    client_rate: float = 0.0
    sample_sigmas: dict[int, float] = field(default_factory=dict)
    epsilon: float = 0.0
    zeroth_order: bool = False

    def text(self) -> str:
        """One line for ``fedpeft check``."""
        if self.mode == "none":
            return "off"
        if self.mode == "client":
            return (
                f"client-level, sigma {self.client_sigma:.4g} at sample rate {self.client_rate:.3g}: "
                f"epsilon {self.epsilon:.3g} at delta {self.delta:g}"
            )
        sigmas = list(self.sample_sigmas.values())
        return (
            f"sample-level ({'DPZero' if self.zeroth_order else 'DP-SGD'}), sigma {min(sigmas):.4g}..{max(sigmas):.4g}: "
            f"epsilon at most {self.epsilon:.3g} at delta {self.delta:g} for a client online every round"
        )


def plan_privacy(cfg: ExperimentConfig, sizes: tuple[int, ...] | list[int], online: np.ndarray) -> PrivacyPlan:
    """The run's privacy plan, or a :class:`ConfigError` naming the fix when a target is unreachable.

    Parameters
    ----------
    cfg : ExperimentConfig
        The run's config.
    sizes : sequence of int
        Every partition's number of training rows.
    online : np.ndarray
        (rounds, clients) boolean participation trace (``fedpeft.participation.trace``).
    """
    dp = cfg.dp
    if dp.mode == "none":
        return PrivacyPlan(mode="none")
    if dp.mode == "client":
        rate = float(max(online.sum(axis=1).max(), 1) / cfg.partition.num_partitions)
        sigma = dp.noise_multiplier
        if dp.target_epsilon > 0:
            sigma = plan_noise_multiplier(
                target_epsilon=dp.target_epsilon, delta=dp.delta, sample_rate=rate, steps=cfg.num_rounds,
                what=f"{cfg.num_rounds} rounds of client-level DP",
            )  # fmt: skip
        eps = epsilon_from_history([(sigma, rate, cfg.num_rounds)], dp.delta)
        return PrivacyPlan(mode="client", delta=dp.delta, client_sigma=sigma, client_rate=rate, epsilon=eps)
    if dp.delta >= 1.0 / min(sizes):
        raise ConfigError(
            f"dp.delta={dp.delta:g} is not below 1 / (smallest partition = {min(sizes)} examples): such a delta "
            f"lets a client reveal a record outright; set dp.delta < {1.0 / min(sizes):.3g}"
        )
    sigmas, epsilons = {}, []
    for n in sorted(set(sizes)):
        batch, steps = sample_schedule(cfg, n)
        sigmas[n] = sample_noise_multiplier(cfg, n)
        epsilons.append(epsilon_from_history([(sigmas[n], poisson_rate(n, batch), steps * cfg.num_rounds)], dp.delta))
    return PrivacyPlan(
        mode="sample",
        delta=dp.delta,
        sample_sigmas=sigmas,
        epsilon=max(epsilons),
        zeroth_order=cfg.strategy.name == "spsa",
    )
