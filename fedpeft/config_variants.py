"""Config sections with modes: a frozen dataclass per mode, so a switched-off feature has no fields.

``cfg.dp`` is a :class:`NoPrivacy`, :class:`SamplePrivacy` or :class:`ClientPrivacy`, chosen by
``dp.mode``; ``cfg.participation`` one of six classes chosen by ``participation.model``. Readers
keep reading ``cfg.dp.clip_norm`` where the mode has one (branch on ``cfg.dp.mode`` first);
reading it under ``dp.mode = "none"`` is an ``AttributeError``, not a silently unused number.

The flat namespace still lists every variant's keys (Flower only passes run-config keys that
pyproject declares): ``ExperimentConfig.from_flat`` builds the variant that the switch names from
the keys it has, and fedpeft/dead_settings.py refuses a non-default setting of another mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from fedpeft.choices import GradSampleMode, PSource, setting


def switch(value: str, help: str) -> Any:  # noqa: A002
    """The mode field of a variant: fixed to ``value`` (not an ``__init__`` argument)."""
    return field(default=value, init=False, metadata={"help": help, "rule": ""})


@dataclass(frozen=True)
class Variants:
    """A section whose ``switch`` field picks one of ``classes`` (mode -> frozen dataclass)."""

    switch: str
    default: str
    classes: dict[str, type]

    def build(self, **kw: Any) -> Any:
        """The variant named by ``kw[switch]`` (default :attr:`default`) from the other fields in ``kw``."""
        return self.classes[kw.pop(self.switch, self.default)](**kw)

    def modes_with(self, attr: str) -> tuple[str, ...]:
        """The modes whose variant has field ``attr``."""
        return tuple(m for m, cls in self.classes.items() if attr in {f.name for f in fields(cls)})


# --- privacy: dp.mode ---------------------------------------------------------------------------

DP_MODE_HELP = (
    "none; sample (DP-SGD with Opacus on each client: each client's records are protected); client "
    "(DP-FedAvg: the server clips each client's delta to dp.clip-norm and noises the mean: whole clients)"
)


@dataclass(frozen=True)
class NoPrivacy:
    """``dp.mode = "none"``: no clipping, no noise, no accountant."""

    mode: Literal["none"] = switch("none", DP_MODE_HELP)


@dataclass(frozen=True)
class _Accounted:
    """What both private modes share: the noise, the clip and the accountant's target."""

    noise_multiplier: float = setting(
        1.0, "noise std / clip norm (sigma), used as given when dp.target-epsilon = 0", ">= 0"
    )
    clip_norm: float = setting(1.0, "L2 clip: per-example gradients (sample) or per-client deltas (client)", "> 0")
    target_epsilon: float = setting(
        0.0,
        "> 0: Opacus picks sigma so the planned run spends at most this epsilon at dp.delta",
        ">= 0 (0 = use dp.noise-multiplier)",
    )
    delta: float = setting(1e-5, "the delta of (epsilon, delta)-DP", "in (0, 1)")


@dataclass(frozen=True)
class SamplePrivacy(_Accounted):
    """``dp.mode = "sample"``: DP-SGD on each client (fedpeft/privacy.py; DPZero under SPSA)."""

    mode: Literal["sample"] = switch("sample", DP_MODE_HELP)
    grad_sample_mode: GradSampleMode = setting("hooks", "Opacus' per-sample gradient engine: hooks or functorch")


@dataclass(frozen=True)
class ClientPrivacy(_Accounted):
    """``dp.mode = "client"``: DP-FedAvg, clipping and noise on the server (strategies/dp.py)."""

    mode: Literal["client"] = switch("client", DP_MODE_HELP)
    max_weight: float = setting(0.0, "cap on aggregation weights (FedAU's omega)", ">= 0 (0 = no cap)")


DPConfig = NoPrivacy | SamplePrivacy | ClientPrivacy
DP = Variants("mode", "none", {"none": NoPrivacy, "sample": SamplePrivacy, "client": ClientPrivacy})


# --- participation: participation.model ----------------------------------------------------------

MODEL_HELP = (
    "who is online each round (the strategy never sees it, fedpeft/participation.py): always, uniform "
    "(a fixed-size sample), bernoulli / markov / cyclic (per-client p_n), trace (replay a saved matrix)"
)


@dataclass(frozen=True)
class AlwaysParticipation:
    """``participation.model = "always"``: every client every round."""

    model: Literal["always"] = switch("always", MODEL_HELP)


@dataclass(frozen=True)
class UniformParticipation:
    """``participation.model = "uniform"``: a uniform sample of fixed size each round."""

    model: Literal["uniform"] = switch("uniform", MODEL_HELP)
    fraction: float = setting(0.5, "share of clients sampled each round", "in (0, 1]")
    min_clients: int = setting(1, "at least this many clients a round", ">= 0")


@dataclass(frozen=True)
class _PerClientP:
    """Per-client probabilities p_n (fedpeft/probabilities.py), shared by bernoulli / markov / cyclic."""

    p_source: PSource = setting(
        "constant",
        "where p_n comes from: constant (p-mean), list (p-list), uniform (U(p-floor, 2 p-mean - p-floor)), "
        "label-correlated (Wang & Ji, ICLR 2024: favoured classes come more often)",
    )
    p_mean: float = setting(0.1, "the typical probability of being online", "in (0, 1]")
    p_floor: float = setting(0.02, "uniform / label-correlated: the lowest p_n", "in (0, 1]")
    p_list: str = setting("", "p-source = list: one probability in (0, 1] per partition, comma-separated")
    label_alpha: float = setting(0.1, "label-correlated: Dirichlet concentration of the class multiplier q", "> 0")


@dataclass(frozen=True)
class BernoulliParticipation(_PerClientP):
    """``participation.model = "bernoulli"``: client n online with probability p_n, independently each round."""

    model: Literal["bernoulli"] = switch("bernoulli", MODEL_HELP)


@dataclass(frozen=True)
class MarkovParticipation(_PerClientP):
    """``participation.model = "markov"``: a two-state chain per client with stationary rate p_n."""

    model: Literal["markov"] = switch("markov", MODEL_HELP)
    markov_rate: float = setting(0.05, "markov: the chain's switching rate (smaller = longer runs)", "in (0, 1]")


@dataclass(frozen=True)
class CyclicParticipation(_PerClientP):
    """``participation.model = "cyclic"``: on for round(L p_n) rounds of every cycle of L."""

    model: Literal["cyclic"] = switch("cyclic", MODEL_HELP)
    cycle_length: int = setting(100, "cyclic: rounds per cycle L", ">= 2")


@dataclass(frozen=True)
class TraceParticipation:
    """``participation.model = "trace"``: replay a saved (rounds, clients) matrix."""

    model: Literal["trace"] = switch("trace", MODEL_HELP)
    trace_file: str = setting(
        "", "a .npz / .npy trace (fedpeft.participation.save_trace) or an earlier run's results.json"
    )


ParticipationConfig = (
    AlwaysParticipation
    | UniformParticipation
    | BernoulliParticipation
    | MarkovParticipation
    | CyclicParticipation
    | TraceParticipation
)
PARTICIPATION = Variants(
    "model",
    "uniform",
    {
        "always": AlwaysParticipation,
        "uniform": UniformParticipation,
        "bernoulli": BernoulliParticipation,
        "markov": MarkovParticipation,
        "cyclic": CyclicParticipation,
        "trace": TraceParticipation,
    },
)
