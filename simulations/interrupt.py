"""Ctrl-C for a running experiment: the first stops it cleanly, the second exits at once.

Under Flower's simulation engine the ServerApp runs in a thread while the engine owns the
main thread, so a KeyboardInterrupt would land in the engine, not in the round loop. The
launcher therefore installs :func:`stop_on_sigint`: the first SIGINT sets :data:`STOP`;
the :class:`~simulations.grids.MeteringGrid` checks it before each round and while it
waits for replies, and raises :class:`RunInterrupted`; the ServerApp records the run as
``interrupted`` after its last completed round and returns, and Flower's engine then
stops Ray and every actor as at a normal end. A second SIGINT exits the process at once.
In the in-process runner the round loop owns the main thread, and Python's own
KeyboardInterrupt does the same job.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("fedpeft")

#: set by the first Ctrl-C; read by the metering grid
STOP = threading.Event()


class RunInterrupted(Exception):
    """The user interrupted the run (Ctrl-C); the current round is abandoned."""


def check_stop() -> None:
    """Raise :class:`RunInterrupted` once a stop was requested."""
    if STOP.is_set():
        raise RunInterrupted("interrupted by the user (Ctrl-C)")


@contextmanager
def stop_on_sigint() -> Iterator[None]:
    """Within the block, SIGINT requests a clean stop; a second SIGINT exits with status 130."""
    STOP.clear()

    def handle(signum, frame) -> None:
        if STOP.is_set():
            log.warning("second interrupt: exiting now")
            os._exit(130)
        STOP.set()
        log.warning("interrupt: abandoning the current round and writing results (Ctrl-C again to exit at once)")

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        STOP.clear()
