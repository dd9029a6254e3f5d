"""Quiet third-party loggers in the entry points (never in library code)."""

from __future__ import annotations

import logging


def quiet_libraries() -> None:
    """Hide transformers' load reports and progress bars, and bitsandbytes' CPU-kernel notice.

    bitsandbytes looks for the optional ``kernels`` package, which fetches code from the
    hub at run time; we do not install it on purpose, so its warning is noise.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
