"""Server strategies: a :class:`PeftStrategy` built from parts, SPSA, and the wrappers.

``build_strategy(cfg, ctx)`` wires a config (strategies/build.py); ``ctx`` is a
:class:`StrategyContext` holding what the ServerApp knows (node selection, partition ids,
client count). Importing this package does not import torch (SPSA and DP import it when
built). Adding a strategy part: a pure function in strategies/aggregate.py, a part class
(weighting.py, aggregators.py or server_update.py), a hand-computed test, one line in
build.py and the config choice in ``CHOICES`` (fedpeft/config.py).
"""

from strategies.aggregators import Aggregate, Krum, Mean, Median, TrimmedMean
from strategies.base import FedPeftStrategy, StrategyContext
from strategies.build import NAMES, build_strategy
from strategies.delegating import Delegating
from strategies.dp import ClientLevelDP, SampleLevelDPReport, wrap_privacy
from strategies.fedau import FedAUWeights
from strategies.flexlora import FlexSVD
from strategies.hetlora import ZeroPad
from strategies.known_p_oracle import OracleWeights
from strategies.peft_strategy import PeftStrategy
from strategies.server_update import Adaptive, Momentum, Step
from strategies.spsa import SharedSeedSPSA
from strategies.weighting import ExampleWeights, UniformWeights

__all__ = [
    "NAMES",
    "Adaptive",
    "Aggregate",
    "ClientLevelDP",
    "Delegating",
    "ExampleWeights",
    "FedAUWeights",
    "FedPeftStrategy",
    "FlexSVD",
    "Krum",
    "Mean",
    "Median",
    "Momentum",
    "OracleWeights",
    "PeftStrategy",
    "SampleLevelDPReport",
    "SharedSeedSPSA",
    "Step",
    "StrategyContext",
    "TrimmedMean",
    "UniformWeights",
    "ZeroPad",
    "build_strategy",
    "wrap_privacy",
]
