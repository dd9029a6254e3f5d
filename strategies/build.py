"""``build_strategy(cfg, ctx)``: the one place a config becomes a strategy.

``strategy.name`` picks the weighting and the aggregator family; ``strategy.aggregator``
swaps in a robust aggregator; ``strategy.server-optimizer`` picks the server update; then
``dp.mode`` wraps the result (strategies/dp.py). SPSA is its own strategy (its replies are
one-byte codes, not deltas). Which combinations exist: docs/strategies.md; the config
refuses the others before anything starts (fedpeft/validation.py), and the parts refuse
them again here so a strategy built in code cannot hold one either.
"""

from __future__ import annotations

from fedpeft.config import ConfigError
from fedpeft.ranks import client_ranks
from strategies.aggregators import Aggregator, Krum, Mean, Median, TrimmedMean
from strategies.base import FedPeftStrategy, StrategyContext
from strategies.client_drift import ClientDrift
from strategies.client_eval import PerClientEvaluation
from strategies.dp import wrap_privacy
from strategies.fedau import FedAUWeights
from strategies.flexlora import FlexSVD
from strategies.hetlora import ZeroPad
from strategies.known_p_oracle import OracleWeights
from strategies.memory import MIFA, FedVarp
from strategies.peft_strategy import PeftStrategy
from strategies.server_update import build_server_update
from strategies.spsa import SharedSeedSPSA
from strategies.weighting import Weighting, build_weighting

#: ``strategy.name`` choices
NAMES = ("fedavg", "fedau", "known_p_oracle", "spsa", "hetlora", "flexlora")


def build_aggregator(cfg, ctx: StrategyContext) -> Aggregator:
    """The aggregator part of ``cfg.strategy`` (``name`` and ``aggregator``)."""
    s = cfg.strategy
    if s.aggregator != "mean" and s.name != "fedavg":
        raise ConfigError(
            f"strategy.aggregator={s.aggregator!r} combines with strategy.name='fedavg' only (FedAU / oracle weights "
            "with a median or Krum are undefined, the rank-sliced ones have their own); set strategy.aggregator='mean'"
        )
    if s.aggregator == "median":
        return Median()
    if s.aggregator == "trimmed-mean":
        return TrimmedMean(beta=s.trim_fraction)
    if s.aggregator == "krum":
        return Krum(f=s.krum_f, m=s.krum_m)
    if s.aggregator == "mifa":
        return MIFA(num_clients=ctx.num_clients)
    if s.aggregator == "fedvarp":
        return FedVarp(num_clients=ctx.num_clients)
    if s.name in ("fedau", "known_p_oracle"):
        return Mean(num_clients=ctx.num_clients)
    if s.name in ("hetlora", "flexlora"):
        ranks = ctx.client_ranks or client_ranks(cfg)
        if s.name == "hetlora":
            return ZeroPad(ranks=ranks, max_rank=cfg.peft.lora_rank)
        return FlexSVD(ranks=ranks, max_rank=cfg.peft.lora_rank, server_lr=s.server_lr)
    return Mean()


def build_weighting_part(cfg, ctx: StrategyContext) -> Weighting:
    """The weighting part: FedAU's estimate, the oracle's true ``1/p_n``, or ``strategy.weighting``."""
    if cfg.strategy.name == "fedau":
        return FedAUWeights(k_cap=cfg.strategy.k_cap)
    if cfg.strategy.name == "known_p_oracle":
        if ctx.environment is None:
            raise ValueError(
                "strategy 'known_p_oracle' reads the true probabilities p_n from the participation model: "
                "pass StrategyContext(environment=...)"
            )
        return OracleWeights(probabilities=ctx.environment.probabilities)
    return build_weighting(cfg.strategy.weighting)


def build_peft_strategy(cfg, ctx: StrategyContext) -> PeftStrategy:
    """The :class:`PeftStrategy` of ``cfg`` (every ``strategy.name`` but ``spsa``), unwrapped."""
    s = cfg.strategy
    server_update = build_server_update(
        s.server_optimizer, lr=s.server_lr, momentum=s.server_momentum, beta1=s.beta1, beta2=s.beta2, tau=s.tau
    )
    return PeftStrategy(
        weighting=build_weighting_part(cfg, ctx),
        aggregator=build_aggregator(cfg, ctx),
        server_update=server_update,
        node_selector=ctx.node_selector,
        partition_of=ctx.partition_of,
        report=ctx.report,
        max_weight=(cfg.dp.max_weight or None) if cfg.dp.mode == "client" else None,
        client_drift=build_client_drift(cfg, ctx),
        client_evaluation=build_client_evaluation(cfg, ctx),
    )


def build_client_drift(cfg, ctx: StrategyContext) -> ClientDrift:
    """FedProx's mu (``train.prox-mu``) and SCAFFOLD (``strategy.control-variates``) for the clients."""
    return ClientDrift(
        prox_mu=cfg.train.prox_mu, scaffold=cfg.strategy.control_variates == "scaffold", num_clients=ctx.num_clients
    )


def build_client_evaluation(cfg, ctx: StrategyContext) -> PerClientEvaluation | None:
    """Per-client evaluation when ``evaluate.fraction-clients`` > 0, on the rounds the server scores."""
    if cfg.evaluate.fraction_clients <= 0:
        return None
    every, last = cfg.train.eval_every, cfg.num_rounds
    return PerClientEvaluation(
        fraction=cfg.evaluate.fraction_clients,
        num_clients=ctx.num_clients,
        seed=cfg.seed,
        eval_rounds=lambda r: r % every == 0 or r == last,
        partition_of=ctx.partition_of,
        report=ctx.report,
    )


def build_strategy(cfg, ctx: StrategyContext) -> FedPeftStrategy:
    """The strategy ``cfg`` describes, wrapped for ``dp.mode``."""
    if cfg.strategy.name not in NAMES:
        raise ValueError(f"unknown strategy.name {cfg.strategy.name!r}; choices: {', '.join(NAMES)}")
    if cfg.strategy.name == "spsa":
        strategy: FedPeftStrategy = SharedSeedSPSA.from_config(cfg, ctx)
    else:
        strategy = build_peft_strategy(cfg, ctx)
    return wrap_privacy(strategy, cfg, ctx)
