"""Checkpoints after every round, and resuming a killed run from the last one.

After each round the ServerApp writes ``checkpoint.json`` (round, strategy state, byte
ledger) and ``checkpoint.npz`` (the global adapter and any strategy arrays, e.g. SPSA's fp32
master) into the run folder, atomically (both written to temporary files, then renamed one
after the other with Ctrl-C / SIGTERM held, so the pair always belongs to one round).
``fedpeft simulate --resume RUN_DIR`` rebuilds the run from them: the same config (read back
from ``results.json``), the global adapter, FedAU's intervals, SPSA's log / hashes / scale,
the client-level DP accountant and the ledger; rounds continue at r + 1 with the same seeds,
so every later round draws what it would have drawn. What a restart loses on the clients is
rebuilt by the protocol (SPSA clients get the full adapter once: extra downlink, the same
updates). Per-client DP-SGD accountants live in the clients' Flower state and are lost with
it, so sample-level DP runs are refused rather than resumed with an understated epsilon.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedpeft.config import ConfigError, ExperimentConfig
from fedpeft.results import load_results
from fedpeft.rundir import RunDir
from strategies.base import FedPeftStrategy
from strategies.delegating import Delegating

META = RunDir.CHECKPOINT_META
ARRAYS = RunDir.CHECKPOINT_ARRAYS


def write_checkpoint(
    run_dir: Path, server_round: int, global_state: dict, strategy: FedPeftStrategy, ledger_rows: list
) -> None:
    """Write round ``server_round``'s checkpoint (see the module docstring)."""
    meta, arrays = strategy.checkpoint_state()
    payload = {f"global/{k}": v for k, v in global_state.items()} | {f"strategy/{k}": v for k, v in arrays.items()}
    tmp = run_dir / (ARRAYS + ".tmp.npz")
    np.savez(tmp, **payload)
    tmp_meta = run_dir / (META + ".tmp")
    tmp_meta.write_text(json.dumps({"round": server_round, "strategy": meta, "ledger": ledger_rows}))
    with _signals_held():  # a Ctrl-C / SIGTERM between the two renames would pair round r+1's arrays with r's JSON
        os.replace(tmp, run_dir / ARRAYS)
        os.replace(tmp_meta, run_dir / META)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block (main thread: the in-process runner's KeyboardInterrupt).

    The handlers are swapped for one that only records the signal, and a recorded signal is raised
    again, to the restored handler, when the block ends. (A thread signal mask would not do: a
    process-directed signal goes to any thread that does not block it, and Ray's and gRPC's threads
    do not, so the main thread's handler would still run inside the block.)
    """
    if threading.current_thread() is not threading.main_thread():  # Flower's engine: the handler only sets a flag
        yield
        return
    pending: list[int] = []

    def record(signum, frame) -> None:
        pending.append(signum)

    previous = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):  # delivered now, once each
            signal.raise_signal(s)


def read_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(meta, global state, strategy arrays)`` of the last checkpoint in ``run_dir``."""
    meta = json.loads((run_dir / META).read_text())
    with np.load(run_dir / ARRAYS) as data:
        arrays = {k: data[k] for k in data.files}
    state = {k.removeprefix("global/"): v for k, v in arrays.items() if k.startswith("global/")}
    extra = {k.removeprefix("strategy/"): v for k, v in arrays.items() if k.startswith("strategy/")}
    return meta, state, extra


def resume_config(run_dir: str | Path) -> ExperimentConfig:
    """The config of the run in ``run_dir``, checked to be resumable; errors name the fix."""
    run_dir = Path(run_dir)
    path = RunDir(run_dir).results
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no results.json there; resume a folder a run wrote")
    results = load_results(path)
    if results.get("status") == "completed":
        raise ConfigError(f"--resume {run_dir}: that run completed; nothing to resume (use --overwrite to redo it)")
    if not (run_dir / META).is_file() or not (run_dir / ARRAYS).is_file():
        raise ConfigError(f"--resume {run_dir}: no checkpoint (the run stopped before its first round ended)")
    cfg = ExperimentConfig.from_flat(results["config"])
    if cfg.dp.mode == "sample":
        raise ConfigError(
            "--resume: dp.mode='sample' keeps each client's DP-SGD accountant in the clients' Flower state, which a "
            "restart loses; resuming would under-report epsilon. Rerun the experiment from the start instead"
        )
    if cfg.strategy.control_variates == "scaffold":
        raise ConfigError(
            "--resume: SCAFFOLD keeps each client's control variate c_i in the clients' Flower state, which a "
            "restart loses (the server's c is checkpointed, the c_i are not); rerun the experiment from the start"
        )
    return cfg


class Resumed(Delegating):
    """Runs ``strategy`` from round ``offset + 1``: every hook sees the true round number.

    ``Strategy.start`` always counts rounds from 1; this wrapper adds ``offset`` to the
    round each hook receives, so a resumed run configures, aggregates and reports round
    r + 1 where the killed run stopped after round r.
    """

    def __init__(self, *, strategy: FedPeftStrategy, offset: int) -> None:
        super().__init__(strategy=strategy)
        self.offset = offset

    def summary(self) -> None:
        """The wrapped strategy's summary."""
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Delegated with the true round."""
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Delegated with the true round."""
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Delegated with the true round."""
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        """Delegated with the true round."""
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)
