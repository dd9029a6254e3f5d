"""Quiet third-party loggers in the entry points (never in library code)."""

from __future__ import annotations

import logging
import os
import sys

#: set by ``--verbose``; inherited by Flower's Ray actors, which import the apps (and this) on their own
VERBOSE_ENV = "FEDPEFT_VERBOSE"
#: set by ``--quiet``; inherited by a sweep's Ray workers, which run whole experiments
QUIET_ENV = "FEDPEFT_QUIET"


#: fedpeft's and Flower's lines alike: ``2026-12-04 15:00:00,000 INFO fedpeft: round 1/5: ...``
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def use_one_log_format(level: int = logging.WARNING) -> None:
    """One handler and format for every logger: fedpeft's at INFO, Flower's through the same handler.

    Flower installs its own console handler (``INFO :      message``, no logger name, no
    time); it is removed here and Flower's records go to the root handler, so a log reads as
    one stream. Flower's logger is set to INFO, since its DEBUG lines would now reach the handler.
    """
    logging.basicConfig(level=level, format=LOG_FORMAT)
    logging.getLogger("fedpeft").setLevel(logging.INFO)
    flwr_logger = logging.getLogger("flwr")
    for handler in list(flwr_logger.handlers):
        flwr_logger.removeHandler(handler)
    flwr_logger.setLevel(logging.INFO)
    flwr_logger.propagate = True


def _filter_library_warnings() -> None:
    """FutureWarning / DeprecationWarning raised inside these libraries: by category and origin."""
    import warnings

    for module in ("ray", "torch", "transformers", "peft", "opacus", "bitsandbytes"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def quiet_libraries() -> None:
    """Hide transformers' load reports and progress bars, and bitsandbytes' CPU-kernel notice.

    bitsandbytes looks for the optional ``kernels`` package, which fetches code from the
    hub at run time; we do not install it on purpose, so its warning is noise. transformers
    is not imported here (a ClientApp process that only forwards to a warm worker must
    start fast): its environment switches are set instead, unless already imported.
    """
    if os.environ.get(VERBOSE_ENV) != "1":
        _filter_library_warnings()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


class _DropByOrigin(logging.Filter):
    """Drop records below WARNING that come from one library folder (``origin`` in the path)."""

    def __init__(self, origin: str) -> None:
        super().__init__()
        self.origin = origin

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self.origin not in record.pathname.replace("\\", "/")


class _DropActorShutdown(logging.Filter):
    """Flower warnings that say nothing wrong about a fedpeft run.

    Its Ray backend warns "Manually terminating ClientAppActor" at every normal end, and its
    FedAvg warns that federated evaluation is skipped (fedpeft evaluates on the server).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return "Manually terminating" not in text and "Federated evaluation will be skipped" not in text


#: Flower's Strategy.start narrates every round (config, aggregated metrics, a final dump of
#: every round's metrics); our progress line and results.json say the same, once.
STRATEGY_NARRATION = _DropByOrigin("flwr/serverapp/strategy/")
ACTOR_SHUTDOWN = _DropActorShutdown()


def quiet_run_logs(verbose: bool = False, quiet: bool = False) -> None:
    """The launcher's log policy: progress lines and warnings by default; ``verbose`` shows all.

    Filters are by origin (Flower's round-loop narration) and by category (library
    FutureWarning / DeprecationWarning from Ray, torch.jit and transformers), never global.
    ``quiet`` (CI logs) keeps warnings and errors only: no per-round, in-round or per-run lines.
    """
    flwr_logger = logging.getLogger("flwr")
    if quiet or os.environ.get(QUIET_ENV) == "1":
        os.environ[QUIET_ENV] = "1"
        logging.getLogger("fedpeft").setLevel(logging.WARNING)
        flwr_logger.setLevel(logging.WARNING)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    _filter_library_warnings()
    for target in (flwr_logger, *flwr_logger.handlers):  # Flower logs through its own handler
        target.addFilter(STRATEGY_NARRATION)
        target.addFilter(ACTOR_SHUTDOWN)
