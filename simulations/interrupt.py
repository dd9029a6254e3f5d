"""Ctrl-C or SIGTERM for a running experiment: the first stops it cleanly, the second exits at once.

SIGTERM is what ``kill``, a batch scheduler or a container stop sends, and a sweep started
in the background (``fedpeft sweep ... &``) ignores SIGINT, so both signals mean the same:
stop after the current round's work is abandoned, record the run as ``interrupted`` with
its checkpoint, and leave it resumable (``fedpeft simulate --resume`` or the same sweep).

Under Flower's simulation engine the ServerApp runs in a thread while the engine owns the
main thread, so a KeyboardInterrupt would land in the engine, not in the round loop. The
launcher therefore installs :func:`stop_on_signals`: the first SIGINT or SIGTERM sets
:data:`STOP`; the :class:`~simulations.grids.MeteringGrid` checks it before each round and
while it waits for replies, and raises :class:`RunInterrupted`; the ServerApp records the
run as ``interrupted`` after its last completed round and returns, and Flower's engine then
stops Ray and every actor as at a normal end. A second signal exits the process at once.
In the in-process runner the round loop owns the main thread: Python's own
KeyboardInterrupt does the job for Ctrl-C, and :func:`sigterm_as_ctrl_c` turns SIGTERM into
the same KeyboardInterrupt.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("fedpeft")

#: set by the first Ctrl-C or SIGTERM; read by the metering grid
STOP = threading.Event()

#: the signals that stop a run cleanly
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """The user interrupted the run (Ctrl-C or SIGTERM); the current round is abandoned."""


def check_stop() -> None:
    """Raise :class:`RunInterrupted` once a stop was requested."""
    if STOP.is_set():
        raise RunInterrupted("interrupted (Ctrl-C or SIGTERM)")


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT or SIGTERM requests a clean stop; a second one exits with status 128 + signal."""
    STOP.clear()

    def handle(signum, frame) -> None:
        name = signal.Signals(signum).name
        if STOP.is_set():
            log.warning("second interrupt (%s): exiting now", name)
            os._exit(128 + signum)
        STOP.set()
        log.warning("%s: abandoning the current round and writing results (send it again to exit at once)", name)

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        STOP.clear()


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread, exactly as Ctrl-C does.

    Outside the main thread (signal handlers can only be set there) the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        log.warning("SIGTERM: stopping as on Ctrl-C")
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
