"""Start one experiment: check it and its run folder, run it on Flower's engine (or in-process), check it ended.

``simulate`` is what the CLI (simulations/run.py), the sweep (simulations/experiments/sweep.py) and the
benchmarks call; it lives apart from the CLI so that the sweep, which the CLI dispatches to, does not
import the CLI back (that was an import cycle). This is the only module that knows how Flower is
started. Local runs use Flower's simulation engine (Ray backend) through
``flwr.simulation.run_simulation``; the same command on the head node of a Ray cluster (``ray start
--head`` there, ``ray start --address=<head>:6379`` on the others) spreads the clients over the cluster,
because Ray attaches to a running cluster when one exists.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

from fedpeft.check import CheckReport, check_experiment
from fedpeft.config import ExperimentConfig
from fedpeft.results import default_run_dir, load_results
from fedpeft.rundir import RunDir, check_run_dir, prepare_run_dir
from simulations.cluster import log_ray_target
from simulations.front_door import RunFailed
from simulations.inprocess import num_nodes
from simulations.interrupt import RunInterrupted, stop_on_signals
from simulations.node_layout import engine_config

log = logging.getLogger("fedpeft")


def backend_config(cfg: ExperimentConfig) -> dict:
    """Ray resources per simulated client, from our config (not Flower's 2-CPU default)."""
    resources = {"num_cpus": cfg.simulation.num_cpus_per_client, "num_gpus": cfg.simulation.num_gpus_per_client}
    return {"client_resources": resources, "init_args": {"include_dashboard": False}}


def simulate(
    cfg: ExperimentConfig,
    run_dir: str | Path | None = None,
    *,
    plot: bool = True,
    client_mods: list | None = None,
    resume: bool = False,
    in_process: bool = False,
    overwrite: bool = False,
    checked: CheckReport | None = None,
) -> Path:
    """Check ``cfg`` and its run folder, then run it on Flower's simulation engine; return the results file.

    ``client_mods`` are Flower ClientApp mods (tests use one to make a client fail);
    ``resume`` continues the run in ``run_dir`` after its last checkpoint;
    ``in_process`` runs the same apps without Ray (simulations/inprocess.py);
    ``overwrite`` lets a folder holding an earlier run be cleared, once the check has passed;
    ``checked`` is the report of a check already run on ``cfg`` (the CLI's, with key sources).
    """
    flag = run_dir_flag(run_dir)
    run_dir = Path(run_dir) if run_dir else default_run_dir_of(cfg)
    if not resume:
        check_run_dir(run_dir, overwrite=overwrite, flag=flag)
    report = checked or check_experiment(cfg)
    for warning in report.warnings if checked is None else []:
        log.warning("%s", warning)
    if not resume:
        run_dir = prepare_run_dir(run_dir, overwrite=overwrite, flag=flag)

    from flwr.simulation import run_simulation

    from simulations.client_app import build_client_app
    from simulations.server_app import build_server_app

    flat = cfg.to_flat()
    # Users do not set HF_HUB_OFFLINE for the embedded default; nothing there needs the hub.
    if cfg.model.name == "embedded" and cfg.data.dataset == "embedded":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    if in_process:
        from simulations.inprocess import run_in_process

        results_path = run_in_process(cfg, run_dir, client_mods=client_mods, resume=resume)
        return _finish(cfg, results_path, plot, t0)
    # Ray starts its workers at nice 15, so any ordinary process on a shared machine starves the actors.
    os.environ.setdefault("RAY_worker_niceness", "0")
    engine_cfg = engine_config(cfg)  # past simulation.max-nodes clients, cohort nodes (simulations/node_layout.py)
    engine_flat = engine_cfg.to_flat()
    as_given = flat if engine_cfg is not cfg else None
    logging.getLogger("flwr").addFilter(_DropRunSimulationDeprecation())
    log_ray_target()  # which cluster the clients run on (simulations/cluster.py)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        with stop_on_signals():
            run_simulation(
                server_app=build_server_app(
                    engine_flat, run_dir.resolve(), resume=resume, checked=True, as_given=as_given
                ),
                # Clients learn the run folder (LST keeps each client's stored activations there).
                client_app=build_client_app({**engine_flat, "out-dir": str(run_dir.resolve())}, mods=client_mods),
                num_supernodes=num_nodes(engine_cfg),
                backend_config=backend_config(cfg),
            )
    return _finish(cfg, RunDir(run_dir).results, plot, t0)


def _finish(cfg: ExperimentConfig, results_path: Path, plot: bool, t0: float) -> Path:
    check_finished(results_path)
    log.info("simulation finished in %.1f s: %s", time.monotonic() - t0, results_path)
    if plot:
        from fedpeft.plot import plot_runs  # matplotlib: only when plotting
        from fedpeft.tracking import log_figure

        fig = plot_runs([results_path], RunDir(results_path.parent).figure, title=cfg.name)
        log_figure(load_results(results_path), Path(fig))  # the tracker's copy (tracking.backend)
        log.info("plot: %s", fig)
    return results_path


def default_run_dir_of(cfg: ExperimentConfig) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else default_run_dir(cfg.name, cfg.seed)


def run_dir_flag(run_dir: str | Path | None) -> str:
    return "--out" if run_dir else "the default run folder (set --out to choose another)"


def check_finished(results_path: Path) -> None:
    """Raise unless ``results_path`` records a completed run (interrupted and failed runs say why)."""
    if not results_path.exists():
        raise RunFailed(f"the simulation wrote no results; see the log above ({results_path.parent})")
    results = load_results(results_path)
    status = results.get("status")
    if status == "interrupted":
        raise RunInterrupted(
            f"interrupted after round {results.get('last_completed_round')}; results so far in {results_path}"
        )
    if status != "completed":
        raise RunFailed(f"the run {status}: {results.get('error', 'see the log above')} ({results_path})")


class _DropRunSimulationDeprecation(logging.Filter):
    """``run_simulation`` logs a deprecation notice pointing at ``flwr run``.

    We keep the Python API on purpose: it takes our resources and overrides in-process
    and returns when the run ends; ``flwr run .`` remains available for Flower's CLI.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return "run_simulation" not in msg and "deprecated feature" not in msg.lower()
