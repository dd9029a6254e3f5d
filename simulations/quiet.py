"""Quiet third-party loggers in the entry points (never in library code)."""

from __future__ import annotations

import logging
import os
import sys


def quiet_libraries() -> None:
    """Hide transformers' load reports and progress bars, and bitsandbytes' CPU-kernel notice.

    bitsandbytes looks for the optional ``kernels`` package, which fetches code from the
    hub at run time; we do not install it on purpose, so its warning is noise. transformers
    is not imported here (a ClientApp process that only forwards to a warm worker must
    start fast): its environment switches are set instead, unless already imported.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
