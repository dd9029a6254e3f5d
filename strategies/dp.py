"""Differential privacy around any fedpeft strategy: client-level DP-FedAvg and DP-SGD reports.

Client-level DP (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models", Alg. 1 with a fixed-size mean): each accepted client delta
is clipped to L2 norm ``C``, the wrapped strategy averages the clipped deltas with equal
weights, and Gaussian noise of std ``sigma * C / m`` (``m`` clients aggregated) is added
to that mean before the server step::

    theta <- theta + server_lr * (mean_i clip(delta_i, C) + N(0, (sigma C / m)^2 I)).

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping``: it clips
``reply - current_global``, i.e. it assumes replies are full weights; our replies are
already deltas, so it would clip ``delta - theta``. It also adds the noise to whatever
the inner strategy returns (here the new global state, so the noise would not scale
with ``server_lr``), draws it from the global ``np.random``, and its accountant needs a
fixed ``num_sampled_clients`` and no subsampling amplification. This wrapper keeps its
shape (wrap, clip replies, delegate, add noise) and fixes those four points: deltas are
clipped as they are, the noise is ``server_lr`` times the noise on the mean, it comes
from ``numpy_rng(seed, "dp-client-noise", round)``, and epsilon comes from Opacus' RDP
accountant with the realised sample rate ``q_t = m_t / N`` of each round.

Weighting: equal weights are required (``strategy.weighting = "uniform"``, enforced by
the config): example counts are private and would make the sensitivity unbounded.
The wrapper calibrates the noise to the largest aggregation coefficient it observes
through the strategy's ``aggregation_weights`` hook: ``max_i w_i / sum_j w_j`` for a
normalised weighted mean (``1/m`` for the uniform mean of FedAvgPEFT), and
``omega_max / N`` for FedAU, whose update ``(1/N) sum_i omega_i delta_i`` is not
normalised: FedAU's per-client sensitivity is ``omega_max * C / N``. The noise therefore
grows with the largest omega, so omega must be capped when client-level DP is on:
``dp.max-weight`` caps every weight the hook returns (the capped weights are the ones
the strategy aggregates with), on top of FedAU's own ``k_cap`` (omega <= K). A strategy
that aggregates without the hook is not covered by this calibration.

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

from fedpeft import privacy
from fedpeft.adapters import State
from fedpeft.config import ConfigError
from fedpeft.records import record_to_state, state_to_record
from fedpeft.rng import numpy_rng

log = logging.getLogger(__name__)


def clip_delta(delta: State, clip_norm: float) -> tuple[State, float]:
    """``delta * min(1, C / ||delta||_2)`` over all tensors together, and the original norm."""
    norm = math.sqrt(sum(float(np.sum(np.square(v.astype(np.float64)))) for v in delta.values()))
    if not math.isfinite(norm) or norm <= clip_norm:
        return delta, norm  # non-finite deltas are left for the strategy to reject
    scale = clip_norm / norm
    return {k: (v.astype(np.float64) * scale).astype(np.float32) for k, v in delta.items()}, norm


def noise_std(noise_multiplier: float, clip_norm: float, coefficients: list[float]) -> float:
    """``sigma * C * max_i c_i`` for the aggregate ``sum_i c_i delta_i``: ``sigma * C / m`` for a plain mean."""
    return float(noise_multiplier * clip_norm * max(coefficients))


def aggregation_coefficients(strategy, weights: list[float]) -> list[float]:
    """``c_i`` in ``update = sum_i c_i delta_i``: ``w_i / N`` for FedAU, ``w_i / sum_j w_j`` otherwise."""
    from strategies.fedau import FedAU

    w = np.asarray(weights, dtype=np.float64)
    scale = 1.0 / strategy.num_clients if isinstance(strategy, FedAU) else 1.0 / w.sum()
    return [float(x) for x in w * scale]


def add_noise(state: State, std: float, rng: np.random.Generator) -> State:
    """``state + N(0, std^2)`` per entry, drawn from ``rng`` in key order."""
    return {k: (v.astype(np.float64) + rng.normal(0.0, std, v.shape)).astype(np.float32) for k, v in state.items()}


class _Wrapper:
    """Delegates everything to ``strategy``; subclasses add to ``round_report["extra"]``."""

    def __init__(self, *, strategy) -> None:
        self.strategy = strategy
        self.extra: dict = {}

    def __getattr__(self, name: str):
        return getattr(self.__dict__["strategy"], name)

    @property
    def round_report(self) -> dict:
        report = dict(self.strategy.round_report)
        report["extra"] = {**report.get("extra", {}), **self.extra}
        return report

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> list[Message]:
        """The wrapped strategy's train messages."""
        return list(self.strategy.configure_train(server_round, arrays, config, grid))


class ClientLevelDP(_Wrapper):
    """DP-FedAvg around a strategy whose replies are PEFT deltas (see the module docstring).

    Parameters
    ----------
    strategy : FedAvgPEFT or subclass
        Aggregates the clipped deltas; its ``aggregation_weights`` hook is observed.
    noise_multiplier, clip_norm : float
        ``sigma`` and ``C``.
    num_clients : int
        ``N``, for the sample rate ``m / N`` of the accountant.
    delta : float
        The delta at which epsilon is reported.
    seed : int
        Run seed; the noise of round ``t`` comes from ``numpy_rng(seed, "dp-client-noise", t)``.
    max_weight : float, optional
        Cap on every aggregation weight (FedAU's omega); ``None`` leaves them as they are.
    """

    def __init__(
        self,
        *,
        strategy,
        noise_multiplier: float,
        clip_norm: float,
        num_clients: int,
        delta: float,
        seed: int,
        max_weight: float | None = None,
    ):
        super().__init__(strategy=strategy)
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.num_clients = num_clients
        self.delta = delta
        self.seed = seed
        self.history: list[privacy.HistoryEntry] = []
        self._num_sampled = 0
        self._weights: list[float] = []
        if hasattr(strategy, "aggregation_weights"):
            inner = strategy.aggregation_weights

            def observed(server_round, accepted):
                weights = [float(w) for w in inner(server_round, accepted)]
                self._weights = [min(w, max_weight) for w in weights] if max_weight else weights
                return self._weights

            strategy.aggregation_weights = observed  # the hook FedAvgPEFT offers; we only watch it

    def configure_train(self, server_round, arrays, config, grid):
        """Remember the round's sample size ``m`` (for the accountant's ``q = m / N``)."""
        messages = super().configure_train(server_round, arrays, config, grid)
        self._num_sampled = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip every delta, let the strategy average, add calibrated noise, account the release."""
        replies = list(replies)
        norms = []
        for msg in replies:
            if msg.has_error() or "arrays" not in msg.content.array_records:
                continue
            clipped, norm = clip_delta(record_to_state(msg.content.array_records["arrays"]), self.clip_norm)
            norms.append(norm)
            msg.content["arrays"] = state_to_record(clipped)
        self._weights = []
        new_arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self.extra = {"dp_clip_norms": norms}
        if new_arrays is None:
            return None, metrics
        weights = self._weights or [1.0] * len(self.strategy.round_report["aggregated"])
        std = noise_std(self.noise_multiplier, self.clip_norm, aggregation_coefficients(self.strategy, weights))
        server_lr = float(getattr(self.strategy, "server_lr", 1.0))
        rng = numpy_rng(self.seed, "dp-client-noise", server_round)
        noisy = add_noise(record_to_state(new_arrays), server_lr * std, rng)
        rate = min(1.0, max(self._num_sampled, len(weights)) / self.num_clients)
        self.history.append((self.noise_multiplier, rate, 1))
        epsilon = privacy.epsilon_from_history(self.history, self.delta)
        self.extra.update(
            {
                "epsilon": epsilon,
                "delta": self.delta,
                "dp_noise_multiplier": self.noise_multiplier,
                "dp_noise_std": std,
                "dp_sample_rate": rate,
                "dp_clipped": int(sum(n > self.clip_norm for n in norms)),
            }
        )
        log.info(
            "round %d: client-level DP noise std %.4g, epsilon %.3f at delta %g", server_round, std, epsilon, self.delta
        )
        return state_to_record(noisy), metrics

    def state_for_results(self) -> dict:
        """The accountant history beside the wrapped strategy's own state."""
        inner = self.strategy.state_for_results() if hasattr(self.strategy, "state_for_results") else {}
        return {**inner, "dp_accountant_history": [list(h) for h in self.history]}


class SampleLevelDPReport(_Wrapper):
    """Adds the epsilons that DP-SGD clients report (metric ``epsilon``) to each round's row."""

    def __init__(self, *, strategy, delta: float) -> None:
        super().__init__(strategy=strategy)
        self.delta = delta
        self.latest: dict[int, float] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Delegate, then report max/mean epsilon of this round and the worst so far."""
        replies = list(replies)
        out = self.strategy.aggregate_train(server_round, replies)
        this_round = []
        for msg in replies:
            if msg.has_error():
                continue
            metrics = next(iter(msg.content.metric_records.values()), {})
            if "epsilon" in metrics:
                pid = self.strategy.partition_of(msg.metadata.src_node_id)
                self.latest[pid] = float(metrics["epsilon"])
                this_round.append(float(metrics["epsilon"]))
        self.extra = {"delta": self.delta}
        if this_round:
            self.extra.update({"epsilon_max": max(this_round), "epsilon_mean": float(np.mean(this_round))})
        if self.latest:
            self.extra["epsilon"] = max(self.latest.values())
        return out


def planned_client_rate(cfg, ctx) -> float:
    """Largest fraction of clients online in any planned round (for planning sigma)."""
    from fedpeft.participation import trace

    if ctx.environment is None:
        return 1.0
    matrix = trace(ctx.environment, cfg.num_rounds, ctx.num_clients)
    return float(max(matrix.sum(axis=1).max(), 1) / ctx.num_clients)


def wrap_privacy(strategy, cfg, ctx):
    """``strategy`` wrapped for ``cfg.dp.mode`` (unchanged for ``none``); checks budgets up front."""
    dp = cfg.dp
    if dp.mode == "none":
        return strategy
    zeroth_order = getattr(strategy, "client_mode", "first-order") == "spsa"
    if dp.mode == "client" and zeroth_order:
        raise ConfigError(
            "dp.mode='client' clips array deltas, but SPSA clients send one-byte codes; "
            "use dp.mode='sample' with strategy.name='spsa' (DPZero: clip + noise each projected gradient)"
        )
    if dp.mode == "client":
        sigma = dp.noise_multiplier
        if dp.target_epsilon > 0:
            sigma = privacy.plan_noise_multiplier(
                target_epsilon=dp.target_epsilon,
                delta=dp.delta,
                sample_rate=planned_client_rate(cfg, ctx),
                steps=cfg.num_rounds,
                what=f"{cfg.num_rounds} rounds of client-level DP",
            )
        log.info("client-level DP: sigma %.4f, C %g, delta %g", sigma, dp.clip_norm, dp.delta)
        return ClientLevelDP(
            strategy=strategy,
            noise_multiplier=sigma,
            clip_norm=dp.clip_norm,
            num_clients=ctx.num_clients,
            delta=dp.delta,
            seed=cfg.seed,
            max_weight=dp.max_weight or None,
        )
    if getattr(strategy, "client_mode", "first-order") not in ("first-order", "spsa"):
        raise ConfigError(f"dp.mode='sample' has no recipe for strategy.name={cfg.strategy.name!r}")
    from fedpeft.task import partitions

    for rows in partitions(cfg):  # fail at start-up, not inside a client
        if zeroth_order:  # DPZero: spsa.local-steps steps of spsa.batch-size per round
            batch, steps = cfg.spsa.batch_size, cfg.spsa.local_steps
        else:
            batch = cfg.train.batch_size
            steps = privacy.local_steps_per_round(len(rows), batch, cfg.train.local_steps, cfg.train.local_epochs)
        privacy.client_noise_multiplier(
            dp, num_examples=len(rows), batch_size=batch, steps_per_round=steps, num_rounds=cfg.num_rounds
        )
    return SampleLevelDPReport(strategy=strategy, delta=dp.delta)
