"""``fedpeft sweep``: configs x grid x seeds, each run exactly a ``fedpeft simulate`` run.

    fedpeft sweep simulations/configs/fedau_bernoulli.toml --seeds 0-4 \\
        --grid strategy.name=fedavg,fedau --grid train.lr=0.003,0.01 --out runs/fedau
    fedpeft report runs/fedau --out docs/results/fedau

Each run writes its own ``results.json`` to ``OUT/<config name>/<grid label>/seed-<s>/``
(the label names the grid values, e.g. ``strategy.name=fedau,train.lr=0.01``; without
``--grid`` the level is left out). ``OUT/sweep.json`` lists the planned runs and their
status. A run whose results file says ``completed`` is skipped, so re-running the same
command resumes an interrupted sweep (a run cut off mid-way continues from its last
round's checkpoint, as ``fedpeft simulate --resume`` does; a failed one starts over;
Ctrl-C or SIGTERM stops the sweep, marking the current run ``interrupted``); a run folder holding results of a different config
is refused before anything starts. A run that raises is recorded as ``failed`` (its
results file keeps the error) and the sweep goes on; ``fedpeft report`` then shows that
group with fewer seeds.

The grid is a full cross product. Settings that go together (FedAvg with uniform weights
at one learning rate, FedAU at another) are separate sweeps into the same ``--out``, each
with its own ``--set name=...`` so their folders and report groups stay apart::

    fedpeft sweep fedau_bernoulli.toml --seeds 0-4 --out runs/fedau --set name=fedau-bernoulli-fedau \
        --set strategy.name=fedau --set train.lr=0.01

Engines: ``inprocess`` (default) drives the same ServerApp code through an in-memory
Grid in one process (``simulations/inprocess.py``); ``flower`` starts Flower's
simulation engine per run (``fedpeft simulate``), which parallelises clients itself, so it
runs one run at a time.

Parallel runs: ``--jobs N`` runs up to N in-process runs at once as Ray tasks (Ray comes
with ``flwr[simulation]``), each with ``simulation.torch-threads`` CPUs; the default is
the machine's cores divided by that. ``--jobs 1`` runs in this process, without Ray.
On a Ray cluster (``ray start --head`` on one machine, ``ray start --address=<head>:6379``
on the others, fedpeft installed on all), run the sweep on the head node with
``--ray-address auto``: runs spread over the cluster, and ``--out`` must be a folder every
node sees (a shared file system), since each run writes its results where it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

from fedpeft.config import DEFAULTS, ConfigError, ExperimentConfig
from fedpeft.results import load_results, write_results
from fedpeft.rundir import RunDir
from simulations.experiments.plan import PlannedRun, parse_grid, parse_seeds, plan_sweep
from simulations.quiet import VERBOSE_ENV

log = logging.getLogger("fedpeft.sweep")

ENGINES = ("inprocess", "flower")
MANIFEST = RunDir.SWEEP


def run_one(cfg: ExperimentConfig, run_dir: str | Path, engine: str = "inprocess", *, resume: bool = False) -> Path:
    """One run of ``cfg`` into ``run_dir``, exactly as ``fedpeft simulate [--in-process]`` runs it.

    Returns its results file; raises ``RunFailed`` when the run failed and ``RunInterrupted``
    on Ctrl-C or SIGTERM. ``resume`` continues the run in ``run_dir`` from its last checkpoint.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r} is unknown; choose one of {', '.join(ENGINES)}")
    from simulations.launch import simulate

    # a fresh start of a planned run clears an earlier failed attempt's files (after the check passed)
    return simulate(cfg, run_dir, plot=False, resume=resume, in_process=engine == "inprocess", overwrite=not resume)


def record_failure(run_dir: Path, flat: dict[str, Any], error: str, trace: str = "") -> None:
    """Mark ``run_dir``'s results ``failed`` with the error, keeping the rounds it finished."""
    try:
        results = load_results(run_dir)
    except (OSError, ValueError):
        results = {"config": flat, "rounds": []}
    results.update(status="failed", error=error[:2000], traceback=trace[-8000:])
    write_results(run_dir, results)


def execute(flat: dict[str, Any], run_dir: str, engine: str, resume: bool = False) -> dict[str, Any]:
    """Run one planned run: ``{status, wall_s, error?, accuracy?}`` (also a Ray task).

    A crash is recorded as ``failed`` and returned, so the sweep goes on; a Ctrl-C
    (``RunInterrupted``, ``KeyboardInterrupt``) propagates and stops the sweep.
    """
    from simulations.interrupt import RunInterrupted
    from simulations.quiet import quiet_run_logs

    quiet_run_logs(verbose=os.environ.get(VERBOSE_ENV) == "1")  # also in Ray's worker processes
    t0 = time.monotonic()
    try:
        path = run_one(ExperimentConfig.from_flat(flat), run_dir, engine, resume=resume)
        rounds = [r for r in load_results(path)["rounds"] if r.get("accuracy") is not None]
        accuracy = rounds[-1]["accuracy"] if rounds else None
        outcome = {"status": "completed", "wall_s": time.monotonic() - t0, "accuracy": accuracy, "resumed": resume}
        return outcome | _where()
    except RunInterrupted:
        raise
    except Exception as err:  # noqa: BLE001 - any crash of one run is recorded, the sweep goes on
        error = f"{type(err).__name__}: {err}"
        record_failure(Path(run_dir), flat, error, traceback.format_exc())
        return {"status": "failed", "wall_s": time.monotonic() - t0, "error": error}


def _where() -> dict[str, str]:
    """``{"ray_node": id}`` when this run is a Ray task (``--jobs N``, ``--ray-address``), else ``{}``."""
    import sys

    if "ray" not in sys.modules:  # an in-process sweep never imports Ray
        return {}
    import ray

    return {"ray_node": ray.get_runtime_context().get_node_id()} if ray.is_initialized() else {}


def resumable(run: PlannedRun, status: str) -> bool:
    """An interrupted or killed run with a checkpoint continues from it (simulations/resume.py)."""
    from simulations.resume import resume_config

    if status not in ("interrupted", "running"):
        return False
    try:
        resume_config(run.run_dir)
    except (ConfigError, OSError, ValueError):
        return False
    return True


def existing_status(run: PlannedRun) -> str:
    """``completed``, ``failed``, ``running`` (interrupted) or ``new``; refuses results of another config."""
    path = RunDir(run.run_dir).results
    if not path.is_file():
        return "new"
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "running"  # unreadable: rerun it
    # a key absent on one side is at its default there (a mode's keys exist only in that mode's runs)
    theirs = {k: v for k, v in {**DEFAULTS, **results.get("config", {})}.items() if k != "out-dir"}
    ours = {k: v for k, v in {**DEFAULTS, **run.cfg.to_flat()}.items() if k != "out-dir"}
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k, "<absent>") != ours.get(k, "<absent>"))
    if differ:
        shown = "; ".join(
            f"{k}: {theirs.get(k, '<absent>')!r} there, {ours.get(k, '<absent>')!r} planned" for k in differ
        )
        raise ConfigError(
            f"{path} holds a run of a different config than {run.source} plans for it ({shown[:1500]}); "
            "use another --out, or remove that run folder"
        )
    return str(results.get("status", "running"))


def run_sweep(
    plan: list[PlannedRun],
    out: Path,
    *,
    jobs: int = 1,
    engine: str = "inprocess",
    ray_address: str | None = None,
    command: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run every planned run not yet completed; returns the manifest entries (also in ``out/sweep.json``)."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r} is unknown; choose one of {', '.join(ENGINES)}")
    if engine == "flower" and (jobs > 1 or ray_address):
        raise ConfigError("--engine flower runs one run at a time (Flower parallelises clients); use --jobs 1")
    entries = {str(r.run_dir): r.manifest_entry(existing_status(r)) for r in plan}
    todo = [r for r in plan if entries[str(r.run_dir)]["status"] != "completed"]
    log.info("sweep: %d runs planned, %d already completed, %d to run", len(plan), len(plan) - len(todo), len(todo))
    manifest = _Manifest(out, entries, command or [], engine, jobs)
    manifest.write()
    resume = {r.run_dir for r in todo if resumable(r, entries[str(r.run_dir)]["status"])}
    if jobs == 1 or len(todo) <= 1 and not ray_address:
        for run in todo:
            manifest.start(run)
            try:
                outcome = execute(run.cfg.to_flat(), str(run.run_dir), engine, run.run_dir in resume)
            except BaseException:
                manifest.entries[str(run.run_dir)]["status"] = "interrupted"
                manifest.write()
                raise
            manifest.finish(run, outcome)
    else:
        _run_on_ray(todo, resume, manifest, jobs, engine, ray_address)
    return list(entries.values())


def _run_on_ray(
    todo: list[PlannedRun], resume: set[Path], manifest: _Manifest, jobs: int, engine: str, address: str | None
) -> None:
    import ray

    if address:
        ray.init(address=address)
    else:  # workers import this checkout's code, as the driver does
        # Ray starts its workers at nice 15 (RAY_worker_niceness), so on a shared machine any
        # ordinary process starves the sweep's runs (measured here: 8% of a core each next to one
        # nice-0 job). A local sweep is the user's foreground work: run it at the driver's priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=jobs, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        remote, queue, pending = ray.remote(execute), list(todo), {}
        while queue or pending:
            while queue and len(pending) < jobs:
                run = queue.pop(0)
                task = remote.options(num_cpus=run.cfg.simulation.torch_threads)
                pending[task.remote(run.cfg.to_flat(), str(run.run_dir), engine, run.run_dir in resume)] = run
                manifest.start(run)
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready)
            try:
                outcome = ray.get(ready)
            except ray.exceptions.RayError as err:  # the worker died (out of memory, killed)
                outcome = {"status": "failed", "wall_s": float("nan"), "error": f"{type(err).__name__}: {err}"}
                record_failure(run.run_dir, run.cfg.to_flat(), outcome["error"])
            manifest.finish(run, outcome)
    finally:
        ray.shutdown()


class _Manifest:
    """``out/sweep.json``: every planned run and its status, rewritten as runs finish; progress lines."""

    def __init__(self, out: Path, entries: dict[str, dict], command: list[str], engine: str, jobs: int) -> None:
        self.path = out / MANIFEST
        self.entries, self.command, self.engine, self.jobs = entries, command, engine, jobs
        self.to_run = sum(e["status"] != "completed" for e in entries.values())
        self.done = self.failed = 0
        self.t0 = time.monotonic()

    def start(self, run: PlannedRun) -> None:
        self.entries[str(run.run_dir)]["status"] = "running"
        self.write()

    def finish(self, run: PlannedRun, outcome: dict[str, Any]) -> None:
        self.entries[str(run.run_dir)].update(outcome)
        self.done += 1
        self.failed += outcome["status"] == "failed"
        self.write()
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.to_run - self.done)
        what = f"accuracy {outcome['accuracy']:.4f}" if outcome.get("accuracy") is not None else outcome.get("error")
        what += ", resumed from its checkpoint" if outcome.get("resumed") else ""
        log.info(
            "[%d/%d] %s: %s (%s) in %.0f s | %d failed so far | ETA %s",
            self.done, self.to_run, run.name, outcome["status"], what, outcome["wall_s"], self.failed, _duration(eta),
        )  # fmt: skip

    def write(self) -> None:
        """Rewrite the manifest atomically, keeping entries of earlier sweeps into the same folder."""
        old = {}
        if self.path.is_file():
            try:
                old = {e["dir"]: e for e in json.loads(self.path.read_text()).get("runs", [])}
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                old = {}
        old.update(self.entries)
        body = {"command": self.command, "engine": self.engine, "jobs": self.jobs, "runs": list(old.values())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(body, indent=2))
        tmp.replace(self.path)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h} h {rest // 60:02d} min" if h else f"{rest // 60} min {rest % 60:02d} s"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``fedpeft sweep`` arguments."""
    sw = sub.add_parser("sweep", help="configs x grid x seeds, resumable, in parallel (see simulations/experiments)")
    sw.add_argument("configs", nargs="+", help="experiment TOML files")
    sw.add_argument("--seeds", default="0", help="seeds: 0-4, 0,1,2 or 0-2,7 (default 0)")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="sweep a config key")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="fix a key")
    sw.add_argument("--jobs", type=int, help="runs at once (default: cores / simulation.torch-threads)")
    sw.add_argument("--out", default="runs/sweep", help="sweep folder (default runs/sweep)")
    sw.add_argument("--engine", choices=ENGINES, default="inprocess", help="in-process runner or Flower's engine")
    sw.add_argument("--quiet", action="store_true", help="warnings, errors and the summary only (CI logs)")
    sw.add_argument("--ray-address", help="attach to a Ray cluster (e.g. auto) instead of starting Ray locally")


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Plan, check (all before the first run starts), run; returns 1 if some run failed."""
    out = Path(args.out)
    plan = plan_sweep(args.configs, parse_seeds(args.seeds), parse_grid(args.grid), args.overrides, out)
    if args.jobs is None:
        threads = max(r.cfg.simulation.torch_threads for r in plan)
        args.jobs = 1 if args.engine == "flower" else max(1, (os.cpu_count() or 1) // threads)
    entries = run_sweep(plan, out, jobs=args.jobs, engine=args.engine, ray_address=args.ray_address, command=argv or [])
    failed = [e for e in entries if e["status"] == "failed"]
    print(f"{len(entries) - len(failed)} of {len(entries)} runs completed; manifest {out / MANIFEST}")
    for e in failed:
        print(f"failed: {e['dir']}: {e.get('error')}")
    return 1 if failed else 0
