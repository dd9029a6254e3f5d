"""Server strategies: one file each, registered here by the name used in configs.

Every strategy class has ``from_config(cfg, ctx)``; ``ctx`` is a :class:`StrategyContext`
holding what the ServerApp knows (node selection, partition ids, client count).
Adding a strategy: write ``strategies/<name>.py``, add one line below and the name to
``CHOICES["strategy.name"]`` in ``fedpeft/config.py``.
"""

from strategies.base import StrategyContext
from strategies.dp import ClientLevelDP, SampleLevelDPReport, wrap_privacy
from strategies.fedau import FedAU
from strategies.fedavg import FedAvgPEFT
from strategies.known_p_oracle import KnownPOracle
from strategies.spsa import SharedSeedSPSA

REGISTRY = {
    "fedavg": FedAvgPEFT,
    "fedau": FedAU,
    "known_p_oracle": KnownPOracle,  # an oracle: reads the true p_n
    "spsa": SharedSeedSPSA,
}


def build_strategy(cfg, ctx: StrategyContext):
    """The registered strategy named by ``cfg.strategy.name``, built from the config."""
    if cfg.strategy.name not in REGISTRY:
        raise ValueError(f"unknown strategy.name {cfg.strategy.name!r}; registered: {sorted(REGISTRY)}")
    # dp.mode wraps any strategy (client-level DP-FedAvg, or DP-SGD epsilon reports); see strategies/dp.py
    return wrap_privacy(REGISTRY[cfg.strategy.name].from_config(cfg, ctx), cfg, ctx)


__all__ = [
    "REGISTRY",
    "ClientLevelDP",
    "FedAU",
    "FedAvgPEFT",
    "KnownPOracle",
    "SampleLevelDPReport",
    "SharedSeedSPSA",
    "StrategyContext",
    "build_strategy",
]
