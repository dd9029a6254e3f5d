"""Run an experiment in this process: the same ServerApp and ClientApp code, no Ray.

``run_in_process(cfg, run_dir)`` builds the very ClientApp that ``fedpeft simulate``
deploys, puts it behind an :class:`~simulations.grids.InMemoryGrid` (one node per
partition, each with its own Flower ``Context`` so per-client state such as SPSA
catch-up and DP accountants persists across rounds), and calls the ServerApp's
:func:`~simulations.server_app.run_experiment`, which drives ``Strategy.start``: one
round loop in the project. Clients run one after another on this process's threads;
sweeps get their parallelism by running several such runs at once
(simulations/experiments/sweep.py), benchmarks by comparing against Flower's engine
(simulations/bench/core.py). Tests check that its results equal ``fedpeft simulate``'s.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedpeft.config import ExperimentConfig
from fedpeft.results import default_run_dir
from fedpeft.rundir import RunDir
from simulations.cohort import num_workers


def num_nodes(cfg: ExperimentConfig) -> int:
    """Flower nodes a simulation of ``cfg`` needs: one per client, or one per cohort (simulation.cohort-size)."""
    return num_workers(cfg.partition.num_partitions, cfg.simulation.cohort_size)


def run_in_process(
    cfg: ExperimentConfig, run_dir: str | Path | None = None, *, client_mods: list | None = None, resume: bool = False
) -> Path:
    """Run ``cfg`` in this process (``resume``: continue the run in ``run_dir``); return its ``results.json``."""
    from simulations.client_app import build_client_app
    from simulations.grids import InMemoryGrid
    from simulations.server_app import run_experiment

    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg.name, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.name == "embedded" and cfg.data.dataset == "embedded":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    flat = cfg.to_flat()
    n = num_nodes(cfg)  # one per client, or one per cohort of clients
    grid = InMemoryGrid(
        build_client_app({"out-dir": str(run_dir.resolve())}, mods=client_mods),  # LST's client stores live there
        run_config=flat,
        node_configs=[{"partition-id": p, "num-partitions": n} for p in range(n)],
        reply_timeout_s=cfg.simulation.round_timeout_s,
    )
    run_experiment(grid, cfg, run_dir, resume=resume)
    return RunDir(run_dir).results
