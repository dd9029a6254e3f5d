"""A progress line inside long rounds: clients finished / sent, elapsed, ETA.

An LLM round takes minutes and the per-round line (simulations/recorder.py) only comes at
its end. The grids that collect replies (:class:`~simulations.grids.MeteringGrid` as
Flower's engine answers, :class:`~simulations.grids.InMemoryGrid` as each client returns)
feed a :class:`RoundProgress` as replies arrive; it logs one line at most every
``every_s`` seconds, and nothing for rounds shorter than that, so short runs stay as they
were. Lines go to the ``fedpeft.progress`` logger (``--quiet`` hides them with the rest of
fedpeft's info lines).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("fedpeft.progress")

#: seconds between two progress lines of the same round (and before the first one)
EVERY_S = 10.0


def _seconds(value: float) -> str:
    value = int(round(value))
    return f"{value // 60} min {value % 60:02d} s" if value >= 60 else f"{value} s"


class RoundProgress:
    """Counts replies of one batch of messages and logs a line every ``every_s`` seconds.

    Parameters
    ----------
    total : int
        Messages sent (the clients online this round).
    server_round : int
        The round they belong to (0: the set-up handshake).
    every_s : float, optional
        Seconds between lines (default :data:`EVERY_S`); no line before the first ``every_s`` have passed.
    clock : callable
        ``time.monotonic`` (tests pass a fake one).
    """

    def __init__(
        self,
        *,
        total: int,
        server_round: int,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.server_round, self.clock = total, server_round, clock
        self.every_s = EVERY_S if every_s is None else every_s
        self.t0 = self.last = clock()
        self.finished = 0

    def line(self) -> str:
        """The progress text now: ``round 3: 4/10 clients finished, 23 s elapsed, ETA 35 s``."""
        elapsed = self.clock() - self.t0
        what = f"round {self.server_round}" if self.server_round else "set-up"
        if self.finished:
            eta = f"ETA {_seconds(elapsed / self.finished * (self.total - self.finished))}"
        else:
            eta = "ETA unknown until a client finishes"
        return f"{what}: {self.finished}/{self.total} clients finished, {_seconds(elapsed)} elapsed, {eta}"

    def add(self, finished: int) -> None:
        """``finished`` more replies arrived (0: none, still waiting); log when a line is due."""
        self.finished += finished
        now = self.clock()
        if now - self.last >= self.every_s and self.finished < self.total:
            self.last = now
            log.info("%s", self.line())
