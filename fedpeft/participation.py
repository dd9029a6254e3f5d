"""Who is online in round t: the environment's model, never shown to the strategy.

Each model is a pure, seeded function ``online(round_) -> sorted partition ids``
(rounds start at 1); ``trace(model, rounds, clients)`` precomputes the (rounds,
clients) boolean matrix that is saved with the run so every strategy in a comparison
replays the same trace. The heterogeneous models follow the environment of Wang & Ji,
ICLR 2024 (arXiv 2306.03401) and its reference code:

- ``bernoulli``: client n is online in round t with probability p_n, independently;
- ``markov``: a two-state chain per client with P(off->on) = a and
  P(on->off) = a (1/p_n - 1) (both divided by the latter when it exceeds 1), so its
  stationary on-probability is p_n; the initial state is Bernoulli(p_n) and the chain
  steps *before* each round is read;
- ``cyclic``: on for max(1, round(L p_n)) rounds, then off for max(1, L - on) rounds,
  starting off with a random phase in [0, off);
- ``trace``: replay a saved matrix (a real availability trace, or another run's).

Every model exposes ``probabilities`` (p_n). Only the known-p *oracle* baseline may
read them; the adaptive strategies see nothing but who replied.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from fedpeft.config import ParticipationConfig
from fedpeft.probabilities import build_probabilities
from fedpeft.rng import numpy_rng


@dataclass(frozen=True)
class Always:
    """Every client is online in every round."""

    num_clients: int

    @property
    def probabilities(self) -> np.ndarray:
        """p_n = 1."""
        return np.ones(self.num_clients)

    def online(self, round_: int) -> list[int]:
        """All partition ids."""
        return list(range(self.num_clients))


@dataclass(frozen=True)
class Uniform:
    """A uniformly random ``fraction`` of clients (at least ``min_clients``) each round."""

    num_clients: int
    fraction: float
    min_clients: int
    seed: int

    def __post_init__(self) -> None:
        if self.min_clients > self.num_clients:  # no silent clamp: the run could never pick that many
            raise ValueError(
                f"participation.min-clients={self.min_clients} is more than the {self.num_clients} clients; "
                f"set participation.min-clients <= partition.num-partitions={self.num_clients}"
            )

    @property
    def size(self) -> int:
        """Clients online per round."""
        return min(self.num_clients, max(self.min_clients, int(round(self.fraction * self.num_clients))))

    @property
    def probabilities(self) -> np.ndarray:
        """p_n = size / N for everyone."""
        return np.full(self.num_clients, self.size / self.num_clients)

    def online(self, round_: int) -> list[int]:
        """Sorted sample without replacement, seeded by (seed, round)."""
        rng = numpy_rng(self.seed, "participation-uniform", round_)
        return sorted(int(i) for i in rng.choice(self.num_clients, size=self.size, replace=False))


def _ids(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)]


def _check_round(round_: int) -> None:
    if round_ < 1:
        raise ValueError(f"rounds start at 1, got {round_}")


@dataclass(frozen=True)
class Bernoulli:
    """Client n online with probability p_n in every round, independently over rounds and clients."""

    probabilities: np.ndarray
    seed: int

    def online(self, round_: int) -> list[int]:
        """One uniform draw per client from a generator seeded by (seed, round)."""
        _check_round(round_)
        u = numpy_rng(self.seed, "participation-bernoulli", round_).random(len(self.probabilities))
        return _ids(u < self.probabilities)


@dataclass(frozen=True)
class Markov:
    """On/off chain per client whose stationary on-probability is p_n.

    The draws for round t come from a generator seeded by (seed, t), and states up to
    the largest round asked for are cached, so ``online`` is a pure function of the
    round whatever order it is called in.
    """

    probabilities: np.ndarray
    seed: int
    rate: float = 0.05
    _states: list = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def transitions(self) -> tuple[np.ndarray, np.ndarray]:
        """(P(off->on), P(on->off)) per client, rescaled so that neither exceeds 1."""
        up = np.full(len(self.probabilities), float(self.rate))
        down = self.rate * (1.0 / self.probabilities - 1.0)
        big = down > 1.0
        up[big] = up[big] / down[big]
        down[big] = 1.0
        return up, down

    def online(self, round_: int) -> list[int]:
        """Clients whose chain is on after ``round_`` transitions."""
        _check_round(round_)
        if not self._states:
            u0 = numpy_rng(self.seed, "participation-markov", 0).random(len(self.probabilities))
            self._states.append(u0 < self.probabilities)
        up, down = self.transitions
        while len(self._states) <= round_:
            t = len(self._states)
            u = numpy_rng(self.seed, "participation-markov", t).random(len(self.probabilities))
            on = self._states[-1]
            self._states.append(np.where(on, u >= down, u < up))
        return _ids(self._states[round_])


@dataclass(frozen=True)
class Cyclic:
    """On/off blocks: off for a random phase, then on ``on`` rounds, off ``off`` rounds, repeating."""

    probabilities: np.ndarray
    seed: int
    cycle_length: int = 100

    @cached_property
    def on_rounds(self) -> np.ndarray:
        """max(1, round(L p_n)) rounds on per cycle."""
        return np.maximum(1, np.round(self.cycle_length * self.probabilities)).astype(np.int64)

    @cached_property
    def off_rounds(self) -> np.ndarray:
        """max(1, L - on) rounds off per cycle."""
        return np.maximum(1, self.cycle_length - self.on_rounds)

    @cached_property
    def phases(self) -> np.ndarray:
        """Initial off rounds, uniform in [0, off) per client."""
        rng = numpy_rng(self.seed, "participation-cyclic")
        return np.array([rng.integers(b) for b in self.off_rounds], dtype=np.int64)

    def online(self, round_: int) -> list[int]:
        """Closed form of the countdown: on iff (t - 1 - phase) mod (on + off) < on, after the phase."""
        _check_round(round_)
        s = round_ - 1 - self.phases
        return _ids((s >= 0) & (np.mod(s, self.on_rounds + self.off_rounds) < self.on_rounds))


@dataclass(frozen=True)
class Replay:
    """Replays a saved (rounds, clients) matrix; ``probabilities`` are its column means unless given."""

    matrix: np.ndarray
    given_probabilities: np.ndarray | None = None

    @property
    def probabilities(self) -> np.ndarray:
        """The saved p_n, else each client's empirical rate over the whole trace (an oracle's view)."""
        if self.given_probabilities is not None:
            return self.given_probabilities
        return self.matrix.mean(axis=0)

    def online(self, round_: int) -> list[int]:
        """Row ``round_ - 1`` of the matrix."""
        _check_round(round_)
        if round_ > len(self.matrix):
            raise ValueError(f"the participation trace has {len(self.matrix)} rounds; round {round_} was asked for")
        return _ids(self.matrix[round_ - 1])


def build_participation(cfg: ParticipationConfig, num_clients: int, seed: int, label_hist: np.ndarray | None = None):
    """The participation model named by ``participation.model``.

    ``label_hist`` ((clients, labels) counts) is needed only for label-correlated p_n.
    """
    if cfg.model == "always":
        return Always(num_clients)
    if cfg.model == "uniform":
        return Uniform(num_clients, cfg.fraction, cfg.min_clients, seed)
    if cfg.model == "trace":
        matrix, probs = load_trace(cfg.trace_file)
        if matrix.shape[1] != num_clients:
            raise ValueError(f"{cfg.trace_file} has {matrix.shape[1]} clients, the experiment {num_clients}")
        return Replay(matrix, probs)
    probs = build_probabilities(cfg, num_clients, seed, label_hist)
    if cfg.model == "bernoulli":
        return Bernoulli(probs, seed)
    if cfg.model == "markov":
        return Markov(probs, seed, cfg.markov_rate)
    if cfg.model == "cyclic":
        return Cyclic(probs, seed, cfg.cycle_length)
    raise ValueError(f"unknown participation.model {cfg.model!r}")


def trace(model, num_rounds: int, num_clients: int) -> np.ndarray:
    """(rounds, clients) boolean matrix; row t-1 is round t."""
    matrix = np.zeros((num_rounds, num_clients), dtype=bool)
    for t in range(1, num_rounds + 1):
        matrix[t - 1, model.online(t)] = True
    return matrix


def save_trace(path: str | Path, matrix: np.ndarray, probabilities: np.ndarray | None = None) -> Path:
    """Write a trace (and optionally its p_n) as ``.npz``; returns the path."""
    path = Path(path)
    arrays = {"participation": np.asarray(matrix, dtype=bool)}
    if probabilities is not None:
        arrays["probabilities"] = np.asarray(probabilities, dtype=np.float64)
    with path.open("wb") as fh:
        np.savez_compressed(fh, **arrays)
    return path


def load_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(matrix, p_n or None) from ``.npz`` (:func:`save_trace`), ``.npy`` or a ``results.json``.

    A results file's ``participation_trace`` (and ``participation_probabilities`` when
    present) is read, so any earlier run's environment can be replayed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"participation.trace-file={str(path)!r} not found; give a .npz / .npy trace or an earlier run's results.json"
        )
    try:
        matrix, probs = _read_trace(path)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"participation.trace-file={str(path)!r} is not a participation trace ({type(err).__name__}: {err}); "
            "write one with fedpeft.participation.save_trace (.npz) or pass a results.json of an earlier run"
        ) from None
    if matrix.ndim != 2 or 0 in matrix.shape or not np.isin(matrix, (0, 1)).all():
        raise ValueError(
            f"participation.trace-file={str(path)!r} must hold a (rounds, clients) matrix of 0/1, "
            f"got shape {matrix.shape}" + ("" if np.isin(matrix, (0, 1)).all() else " with values other than 0/1")
        )
    if probs is not None and (probs.shape != (matrix.shape[1],) or not np.all((probs > 0) & (probs <= 1))):
        raise ValueError(
            f"participation.trace-file={str(path)!r}: its probabilities must be {matrix.shape[1]} values in (0, 1], "
            f"one per client column"
        )
    return matrix.astype(bool), probs


def _read_trace(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        probs = data.get("participation_probabilities")
        matrix = np.asarray(data["participation_trace"])
        return matrix, None if probs is None else np.asarray(probs, dtype=np.float64)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    with np.load(path, allow_pickle=False) as data:
        probs = data["probabilities"] if "probabilities" in data.files else None
        return data["participation"], probs
