"""Server-update parts: how the aggregate moves the global adapter (the server optimizer).

``Step(lr)`` is FedAvg's plain step ``x + lr Delta``; ``Momentum`` is FedAvgM (Hsu et al.
2019); ``Adaptive`` is FedAdam / FedYogi / FedAdagrad (Reddi et al., ICLR 2021, Alg. 2), all
over the pseudo-gradient ``g = -Delta`` (math and equations: strategies/aggregate.py).
Flower's own FedOpt classes expect full weights, not deltas, so they are not reused.

Client-level DP noise (strategies/dp.py) is handed in as a ``noise`` callable and enters
between aggregation and the update: a non-linear optimizer steps on the *noised* mean
(post-processing of the Gaussian mechanism). For the linear ``Step`` adding ``lr`` times the
noise to the stepped state is the same release; it is done that way because it is how
fedpeft always drew it, so existing runs keep their bits.

Stateful updates checkpoint their moments (float64 arrays) so a resumed run is bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from fedpeft.state import State
from strategies import aggregate as agg
from strategies.aggregators import Aggregate

#: ``noise(state, scale) -> state + N(0, (scale * std)^2)``: one round's Gaussian mechanism
Noise = Callable[[State, float], State]

#: ``strategy.server-optimizer`` choices
OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")


class ServerUpdate(Protocol):
    """What a server-update part provides (see the module docstring)."""

    #: the ``strategy.server-optimizer`` name
    name: str
    #: the server learning rate
    lr: float
    #: keeps state across rounds (moments): refused with a re-factorising aggregator
    stateful: bool

    def apply(self, current: State, result: Aggregate, noise: Noise | None = None) -> State:
        """The new global state from this round's aggregate (``noise``: client-level DP)."""

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """JSON fields and named arrays of the part's state."""

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Undo :meth:`checkpoint_state`."""


def _update_of(result: Aggregate, name: str) -> State:
    if result.update is None:
        raise ValueError(
            f"strategy.server-optimizer={name!r} needs an aggregated delta; this aggregator re-factorises the "
            "adapter every round (FlexLoRA), so only 'sgd' applies"
        )
    return result.update


def _noised(update: State, noise: Noise | None) -> State:
    return update if noise is None else noise(update, 1.0)


class Step:
    """``x <- x + lr Delta`` (FedAvg with a server learning rate); a re-factorised state is taken as is."""

    name = "sgd"
    stateful = False

    def __init__(self, *, lr: float = 1.0) -> None:
        if not lr > 0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        self.lr = lr

    def apply(self, current: State, result: Aggregate, noise: Noise | None = None) -> State:
        """The plain step; DP noise of the mean enters scaled by ``lr`` (linear: the same release)."""
        new = result.state if result.state is not None else agg.sgd_step(current, result.update, self.lr)
        return new if noise is None else noise(new, self.lr)

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """No state."""
        return {}, {}

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """No state."""


def _check_beta(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")


def _save(prefix: str, state: State | None) -> dict[str, np.ndarray]:
    return {} if state is None else {f"{prefix}/{k}": v for k, v in state.items()}


def _load(prefix: str, arrays: dict[str, np.ndarray]) -> State | None:
    found = {
        k.removeprefix(f"{prefix}/"): v.astype(np.float64) for k, v in arrays.items() if k.startswith(prefix + "/")
    }
    return found or None


class Momentum:
    """FedAvgM: ``v <- beta v + g``, ``x <- x - lr v`` (Hsu et al. 2019), ``v`` starting at 0."""

    name = "momentum"
    stateful = True

    def __init__(self, *, lr: float, beta: float) -> None:
        _check_beta("strategy.server-momentum", beta)
        self.lr, self.beta = lr, beta
        self.velocity: State | None = None

    def apply(self, current: State, result: Aggregate, noise: Noise | None = None) -> State:
        """One FedAvgM step on the (noised) mean."""
        update = _noised(_update_of(result, self.name), noise)
        velocity = self.velocity if self.velocity is not None else agg.zeros_like(current)
        new, self.velocity = agg.momentum_step(current, update, velocity, lr=self.lr, beta=self.beta)
        return new

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The velocity (absent before the first aggregated round)."""
        return {"optimizer": self.name}, _save("velocity", self.velocity)

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Reload the velocity."""
        self.velocity = _load("velocity", arrays)


class Adaptive:
    """FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, Alg. 2): ``m`` from 0, ``v`` from ``tau^2``.

    Parameters
    ----------
    rule : str
        ``"adam"``, ``"yogi"`` or ``"adagrad"``.
    lr : float
        Server learning rate eta.
    beta1, beta2 : float
        Decay of the first and second moments, in [0, 1) (``beta2`` unused by adagrad).
    tau : float
        Adaptivity eps > 0.
    """

    stateful = True

    def __init__(self, *, rule: str, lr: float, beta1: float, beta2: float, tau: float) -> None:
        if rule not in ("adam", "yogi", "adagrad"):
            raise ValueError(f"adaptive rule must be 'adam', 'yogi' or 'adagrad', got {rule!r}")
        _check_beta("strategy.beta1", beta1)
        _check_beta("strategy.beta2", beta2)
        if not tau > 0:
            raise ValueError(f"strategy.tau must be > 0, got {tau}")
        self.name, self.lr, self.beta1, self.beta2, self.tau = rule, lr, beta1, beta2, tau
        self.first: State | None = None
        self.second: State | None = None

    def apply(self, current: State, result: Aggregate, noise: Noise | None = None) -> State:
        """One adaptive step on the (noised) mean."""
        update = _noised(_update_of(result, self.name), noise)
        first = self.first if self.first is not None else agg.zeros_like(current)
        second = self.second if self.second is not None else agg.zeros_like(current, self.tau**2)
        new, self.first, self.second = agg.adaptive_step(
            current, update, first, second,
            rule=self.name, lr=self.lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau,
        )  # fmt: skip
        return new

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Both moments (absent before the first aggregated round)."""
        return {"optimizer": self.name}, _save("m", self.first) | _save("v", self.second)

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Reload both moments."""
        self.first, self.second = _load("m", arrays), _load("v", arrays)


def build_server_update(
    name: str, *, lr: float, momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> ServerUpdate:
    """The ``strategy.server-optimizer`` part by name (see :data:`OPTIMIZERS`)."""
    if name == "sgd":
        return Step(lr=lr)
    if name == "momentum":
        return Momentum(lr=lr, beta=momentum)
    if name in ("adam", "yogi", "adagrad"):
        return Adaptive(rule=name, lr=lr, beta1=beta1, beta2=beta2, tau=tau)
    raise ValueError(f"strategy.server-optimizer must be one of {OPTIMIZERS}, got {name!r}")
