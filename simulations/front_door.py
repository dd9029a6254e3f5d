"""One front door for every command a user runs: the same errors, the same exit statuses.

``fedpeft simulate / check / plot / report / sweep / deploy ...`` and the bench and
experiment scripts (``python -m simulations.bench.scale`` ...) all end through
:func:`run_main`: bad input (``ConfigError``, ``ValueError``, a missing file) prints one
line ``fedpeft: error: <what and the fix>`` and exits 2, never a traceback; an interrupt
(Ctrl-C, SIGTERM) exits 130; a run that failed exits 1. The checks themselves stay beside
what they check (config validation, ``fedpeft check``, results loading); this module only
decides how a refusal reaches the user.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fedpeft.config import ConfigError
from simulations.interrupt import RunInterrupted, sigterm_as_ctrl_c

#: bad input: the message names the fix
BAD_INPUT = (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)


class RunFailed(RuntimeError):
    """The run ended without aggregating any client update (or without results)."""


def exit_status(err: BaseException) -> int:
    """2 bad input, 130 interrupted, 1 failed run; anything else is a bug and is re-raised by the caller."""
    if isinstance(err, BAD_INPUT):
        return 2
    if isinstance(err, RunInterrupted | KeyboardInterrupt):
        return 130
    if isinstance(err, RunFailed):
        return 1
    raise err


def run_main(main: Callable[..., int | None], *args) -> int:
    """Call ``main(*args)`` (an entry point returning an exit status or None) behind the front door."""
    with sigterm_as_ctrl_c():  # kill, a batch scheduler or a container stop: the same as Ctrl-C
        try:
            return int(main(*args) or 0)
        except SystemExit as done:  # argparse's usage errors (2) and --help (0)
            return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
        except (*BAD_INPUT, RunInterrupted, KeyboardInterrupt, RunFailed) as err:
            status = exit_status(err)
            if status == 130:
                print(f"fedpeft: {str(err) or 'interrupted'}", file=sys.stderr)
            else:
                print(f"fedpeft: error: {err}", file=sys.stderr)
            return status


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (node counts, jobs, clients)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; pass one >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1; pass a count of at least 1")
    return value
