"""Differential privacy around any fedpeft strategy: client-level DP-FedAvg and DP-SGD reports.

Client-level DP (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models", Alg. 1 with a fixed-size mean): each accepted client delta
is clipped to L2 norm ``C`` (a copy: the replies are not touched), the wrapped
:class:`~strategies.peft_strategy.PeftStrategy` aggregates the clipped deltas with equal
weights, and Gaussian noise of std ``sigma * C / m`` (``m`` clients aggregated) is added
to that mean *before* the server update::

    Delta~ = mean_i clip(delta_i, C) + N(0, (sigma C / m)^2 I);   theta <- server_update(theta, Delta~).

A server optimizer (FedAvgM, FedAdam, ...) therefore steps on the noised mean: everything
after the release is post-processing. For the plain step ``theta + server_lr Delta~`` the
noise is added to the stepped state scaled by ``server_lr`` (the same release, and the
bits fedpeft always drew; strategies/server_update.py).

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping``: it clips
``reply - current_global``, i.e. it assumes replies are full weights; our replies are
already deltas, so it would clip ``delta - theta``. It also adds the noise to whatever
the inner strategy returns (here the new global state, so the noise would not scale
with ``server_lr``), draws it from the global ``np.random``, and its accountant needs a
fixed ``num_sampled_clients`` and no subsampling amplification. This wrapper keeps its
shape (wrap, clip replies, delegate, add noise) and fixes those four points: deltas are
clipped as they are, the noise is added to the mean before the server update, it comes
from ``numpy_rng(seed, "dp-client-noise", round)``, and epsilon comes from Opacus' RDP
accountant with the realised sample rate ``q_t = m_t / N`` of each round. Sigma comes
from the run's privacy plan (fedpeft/privacy_plan.py, passed as ``StrategyContext.privacy_plan``),
the one ``fedpeft check`` prints: this module loads no data.

Weighting: equal weights are required (``strategy.weighting = "uniform"``, enforced by
the config): example counts are private and would make the sensitivity unbounded.
The wrapper calibrates the noise to the largest aggregation coefficient ``c_i`` in
``update = sum_i c_i delta_i``, which every fedpeft strategy reports in the metric
``max-coefficient`` (the aggregator part's ``Aggregate.max_coefficient``):
``1/m`` for the uniform mean, ``omega_max / N`` for FedAU, whose update
``(1/N) sum_i omega_i delta_i`` is not normalised (per-client sensitivity
``omega_max * C / N``). The noise therefore grows with the largest omega, so omega must
be capped when client-level DP is on: ``dp.max-weight`` is passed to the strategy, which
caps every weight before aggregating, on top of FedAU's own ``k_cap`` (omega <= K). An
aggregator without a sensitivity bound (median, trimmed mean, Krum, the rank-sliced ones)
is refused when the wrapper is built: the noise would otherwise be calibrated to nothing.

Both wrappers are :class:`~strategies.delegating.Delegating` strategies (each hook
delegated by name, as Flower's ``DifferentialPrivacyServerSideFixedClipping`` does), so
``ClientLevelDP(strategy=...).start(grid, ...)`` runs Flower's own round loop with
clipping, noise and accounting on every round.

Sample-level DP (DP-SGD on each client, fedpeft/privacy.py) needs nothing on the
server except the report: :class:`SampleLevelDPReport` adds each round's max and mean
of the epsilons the clients report, and the worst epsilon any client has spent so far.

Accounting caveat (both modes): Opacus' RDP accountant analyses Poisson subsampling
(add/remove neighbours); clients here are drawn by the participation model (e.g. a
fixed-size uniform sample) and Opacus' DP-SGD normalises by the expected batch size,
so the reported epsilon is the standard approximation, not a proof for every
participation model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedpeft.config import ConfigError
from fedpeft.rng import numpy_rng
from fedpeft.state import State
from strategies.base import FedPeftStrategy, Reporter, no_report
from strategies.delegating import Delegating
from strategies.peft_strategy import PeftStrategy
from strategies.server_update import Noise

log = logging.getLogger(__name__)


def clip_delta(delta: State, clip_norm: float) -> tuple[State, float]:
    """``delta * min(1, C / ||delta||_2)`` over all tensors together, and the original norm."""
    norm = math.sqrt(sum(float(np.sum(np.square(v.astype(np.float64)))) for v in delta.values()))
    if not math.isfinite(norm) or norm <= clip_norm:
        return delta, norm  # non-finite deltas are left for the strategy to reject
    scale = clip_norm / norm
    return {k: (v.astype(np.float64) * scale).astype(np.float32) for k, v in delta.items()}, norm


def noise_std(noise_multiplier: float, clip_norm: float, max_coefficient: float) -> float:
    """``sigma * C * max_i c_i`` for the aggregate ``sum_i c_i delta_i``: ``sigma * C / m`` for a plain mean."""
    return float(noise_multiplier * clip_norm * max_coefficient)


def add_noise(state: State, std: float, rng: np.random.Generator) -> State:
    """``state + N(0, std^2)`` per entry, drawn from ``rng`` in key order."""
    return {k: (v.astype(np.float64) + rng.normal(0.0, std, v.shape)).astype(np.float32) for k, v in state.items()}


class ClientLevelDP(Delegating):
    """DP-FedAvg around a strategy whose replies are PEFT deltas (see the module docstring).

    It is the :class:`~strategies.peft_strategy.Privacy` the strategy's ``aggregate_round``
    calls: :meth:`clip` for each accepted delta, :meth:`noise` once the aggregate is known.

    Parameters
    ----------
    strategy : PeftStrategy
        Aggregates the clipped deltas; its aggregator reports the largest coefficient.
    noise_multiplier, clip_norm : float
        ``sigma`` and ``C``.
    num_clients : int
        ``N``, for the sample rate ``m / N`` of the accountant.
    delta : float
        The delta at which epsilon is reported.
    seed : int
        Run seed; the noise of round ``t`` comes from ``numpy_rng(seed, "dp-client-noise", t)``.
    report : callable, optional
        Round-report callback (strategies/base.py): clip norms, noise std, epsilon.
    """

    strategy: PeftStrategy

    def __init__(
        self,
        *,
        strategy: PeftStrategy,
        noise_multiplier: float,
        clip_norm: float,
        num_clients: int,
        delta: float,
        seed: int,
        report: Reporter | None = None,
    ) -> None:
        super().__init__(strategy=strategy)
        refusal = strategy.client_dp_refusal()
        if refusal:
            raise ConfigError(refusal)
        if noise_multiplier < 0 or clip_norm <= 0 or num_clients < 1:
            raise ValueError("need noise_multiplier >= 0, clip_norm > 0 and num_clients >= 1")
        self.report = report if report is not None else no_report
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.num_clients = num_clients
        self.delta = delta
        self.seed = seed
        self.history: list[tuple[float, float, int]] = []
        self._num_sampled = 0
        self._norms: list[float] = []
        self._std = 0.0

    def summary(self) -> None:
        """Log sigma, C and delta, then the wrapped strategy's settings."""
        log.info("client-level DP: sigma %.4f, C %g, delta %g", self.noise_multiplier, self.clip_norm, self.delta)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Remember the round's sample size ``m`` (for the accountant's ``q = m / N``)."""
        messages = super().configure_train(server_round, arrays, config, grid)
        self._num_sampled = len(messages)
        return messages

    def clip(self, delta: State) -> State:
        """A copy of ``delta`` clipped to ``C`` (its norm is reported); the reply itself is untouched."""
        clipped, norm = clip_delta(delta, self.clip_norm)
        self._norms.append(norm)
        return clipped

    def noise(self, server_round: int, max_coefficient: float) -> Noise:
        """Round ``server_round``'s noise: std ``sigma * C * max_i c_i`` on the mean, from the round's seed."""
        self._std = noise_std(self.noise_multiplier, self.clip_norm, max_coefficient)
        rng = numpy_rng(self.seed, "dp-client-noise", server_round)
        std = self._std
        return lambda state, scale: add_noise(state, scale * std, rng)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy aggregates clipped copies, noise enters before its server update; account the release."""
        from fedpeft.privacy_plan import epsilon_from_history  # Opacus' accountant (imports torch)

        self._norms = []
        new_arrays, metrics = self.strategy.aggregate_round(server_round, replies, privacy=self)
        norms = list(self._norms)
        fields: dict = {"dp_clip_norms": norms, "delta": self.delta}
        if new_arrays is None:
            self.report(server_round, fields)
            return None, metrics
        std = self._std
        rate = min(1.0, max(self._num_sampled, int(metrics.get("num-clients", 0))) / self.num_clients)
        self.history.append((self.noise_multiplier, rate, 1))
        epsilon = epsilon_from_history(self.history, self.delta)
        fields.update(
            {
                "epsilon": epsilon,
                "dp_noise_multiplier": self.noise_multiplier,
                "dp_noise_std": std,
                "dp_sample_rate": rate,
                "dp_clipped": int(sum(n > self.clip_norm for n in norms)),
            }
        )
        self.report(server_round, fields)
        log.info(
            "round %d: client-level DP noise std %.4g, epsilon %.3f at delta %g", server_round, std, epsilon, self.delta
        )
        metrics = MetricRecord({**dict(metrics), "epsilon": epsilon, "dp-noise-std": std})
        return new_arrays, metrics

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The accountant history (every released round) beside the wrapped strategy's checkpoint."""
        meta, arrays = super().checkpoint_state()
        return {**meta, "dp_history": [list(h) for h in self.history]}, arrays

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Restore the accountant history and the wrapped strategy."""
        super().restore_state(meta, arrays)
        self.history = [(float(s), float(q), int(n)) for s, q, n in meta["dp_history"]]

    def state_for_results(self) -> dict:
        """The accountant history beside the wrapped strategy's own state."""
        return {**super().state_for_results(), "dp_accountant_history": [list(h) for h in self.history]}


class SampleLevelDPReport(Delegating):
    """Reports the epsilons that DP-SGD / DPZero clients report (metric ``epsilon``) each round.

    The clients do the privacy work (fedpeft/privacy.py); the server only keeps each
    partition's latest epsilon and reports this round's max and mean and the worst so far.
    """

    def __init__(self, *, strategy: FedPeftStrategy, delta: float, report: Reporter | None = None) -> None:
        super().__init__(strategy=strategy)
        self.report = report if report is not None else no_report
        self.delta = delta
        self.latest: dict[int, float] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Delegate, then report max/mean epsilon of this round and the worst so far."""
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        this_round = []
        for msg in replies:
            if msg.has_error():
                continue
            client = next(iter(msg.content.metric_records.values()), {})
            eps = client.get("epsilon")
            if isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0:
                self.latest[self.partition_of(msg.metadata.src_node_id)] = float(eps)
                this_round.append(float(eps))
        fields: dict = {"delta": self.delta}
        if this_round:
            fields.update({"epsilon_max": max(this_round), "epsilon_mean": float(np.mean(this_round))})
        if self.latest:
            fields["epsilon"] = max(self.latest.values())
        self.report(server_round, fields)
        if metrics is not None and "epsilon" in fields:
            metrics = MetricRecord({**dict(metrics), "epsilon": fields["epsilon"]})
        return arrays, metrics


def wrap_privacy(strategy: FedPeftStrategy, cfg, ctx) -> FedPeftStrategy:
    """``strategy`` wrapped for ``cfg.dp.mode`` (unchanged for ``none``), with sigma from ``ctx.privacy_plan``.

    The plan (fedpeft/privacy_plan.py) was computed once, from the config, the partition
    sizes and the participation trace, before any round; an unreachable target has already
    failed there, naming the fix.
    """
    dp = cfg.dp
    if dp.mode == "none":
        return strategy
    if dp.mode == "client" and strategy.client_dp_refusal():
        raise ConfigError(strategy.client_dp_refusal())
    plan = ctx.privacy_plan
    if plan is None or plan.mode != dp.mode:
        raise ValueError(
            f"dp.mode={dp.mode!r} needs the run's privacy plan: pass "
            "StrategyContext(privacy_plan=fedpeft.privacy_plan.plan_privacy(cfg, partition sizes, online trace))"
        )
    if dp.mode == "client":
        return ClientLevelDP(
            strategy=strategy,
            noise_multiplier=plan.client_sigma,
            clip_norm=dp.clip_norm,
            num_clients=ctx.num_clients,
            delta=dp.delta,
            seed=cfg.seed,
            report=ctx.report,
        )
    if strategy.client_mode not in ("first-order", "spsa"):
        raise ConfigError(f"dp.mode='sample' has no recipe for strategy.name={cfg.strategy.name!r}")
    return SampleLevelDPReport(strategy=strategy, delta=dp.delta, report=ctx.report)
