"""(d) Cohort nodes vs one client per actor on Flower's simulation engine: wall, memory, parallel efficiency.

    python -m simulations.bench.cohort_engine [--config simulations/configs/quickstart.toml]
        [--rounds N] [--set KEY=VALUE ...] [--workers 1] [--out docs/results/bench/cohort_engine.json]

Runs one config (default: the quickstart) three times, each as its own ``fedpeft simulate``
process on the real engine (Ray), so wall time includes Python's imports and Ray's start-up
as a user sees them and each run's memory is its own process tree:

1. ``one-per-actor``: today's default, cohort-size 1, 1 CPU and 1 torch thread per client
   (as many actors as cores);
2. ``cohort-sequential``: cohort nodes, ``--workers`` worker nodes (default 1, one per
   machine) of ``cores / workers`` CPUs and torch threads each; a worker owns
   ``ceil(N / workers)`` partitions (simulations/cohort.py assigns contiguous blocks of
   ``cohort-size`` partitions, so one worker needs cohort-size = N) and trains a round's
   online clients one after another;
3. ``cohort-batched``: the same, the online clients trained in one batched LoRA step.

Per variant: wall total, the sum of the round walls (rounds 1..R), the rest (start-up,
round-0 evaluation, teardown), final accuracy, the peak PSS of the process tree (sampled
every 0.5 s), the process tree's CPU-seconds, and the clients' training CPU-seconds (each
reply's ``train-cpu-s``: process time around local training; a batched cohort's is split
evenly over its clients). Parallel efficiency = training CPU-seconds / (cores x round walls);
as threads that wait for work spin, the work efficiency divides the one-thread variant's
training CPU-seconds instead (the same steps in every variant).
The issue's targets (#13): efficiency >= 0.85, peak PSS <= 3 GiB, quickstart wall <= 100 s.
Only ratios taken in one run mean much on a shared machine; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from fedpeft.config import load_config, parse_override
from fedpeft.rundir import RunDir

QUICKSTART = "simulations/configs/quickstart.toml"
OUT = Path("docs/results/bench/cohort_engine.json")
TARGETS = {"efficiency": 0.85, "peak_pss_gib": 3.0, "wall_total_s": 100.0}
GIB = 1 << 30


def pss_tree(pid: int) -> tuple[int, float]:
    """PSS bytes and CPU-seconds (user + system) of process ``pid`` and all its descendants.

    Processes that end or deny access while being read count as zero.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0.0
    pss, cpu = 0, 0.0
    for proc in procs:
        try:
            pss += proc.memory_full_info().pss
            times = proc.cpu_times()
            cpu += times.user + times.system
        except psutil.Error:
            continue
    return pss, cpu


class TreeSampler:
    """Samples :func:`pss_tree` of ``pid`` every ``interval_s`` in a background thread; keeps the peaks.

    ``cpu_s`` is the largest tree CPU total seen (processes that exit between samples lose
    their last interval), a lower bound on the tree's CPU time.
    """

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_pss, self.cpu_s, self.samples = 0, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:  # at least one sample, however short the run
            pss, cpu = pss_tree(self.pid)
            self.peak_pss, self.cpu_s, self.samples = max(self.peak_pss, pss), max(self.cpu_s, cpu), self.samples + 1
            if self._stop.wait(self.interval_s):
                return


def parallel_efficiency(train_cpu_s: float, cores: int, round_wall_s: float) -> float:
    """Share of the cores' round time spent in client training: ``train_cpu_s / (cores * round_wall_s)``."""
    if cores <= 0 or round_wall_s <= 0:
        raise ValueError(f"cores={cores} and round_wall_s={round_wall_s} must be positive")
    return train_cpu_s / (cores * round_wall_s)


def variants(num_partitions: int, cores: int, workers: int = 1) -> dict[str, dict]:
    """The three variants' ``simulation.*`` overrides (module docstring)."""
    if not 1 <= workers <= cores:
        raise ValueError(f"--workers {workers}: pass 1..{cores} (one worker per core at most on this machine)")
    per_worker = cores // workers
    cohort = {
        "simulation.cohort-size": math.ceil(num_partitions / workers),
        "simulation.num-cpus-per-client": float(per_worker),
        "simulation.torch-threads": per_worker,
    }
    return {
        "one-per-actor": {
            "simulation.cohort-size": 1,
            "simulation.num-cpus-per-client": 1.0,
            "simulation.torch-threads": 1,
        },
        "cohort-sequential": {**cohort, "simulation.cohort-batched": False},
        "cohort-batched": {**cohort, "simulation.cohort-batched": True},
    }


def summarize(results: dict, wall_total_s: float, cores: int) -> dict:
    """The figures of one finished run (its ``results.json``) and its measured wall."""
    rounds = results["rounds"][1:]
    round_s = [r["wall_s"] for r in rounds]
    clients = [c for r in rounds for c in r.get("clients", [])]
    timed = bool(clients) and all("train-cpu-s" in c for c in clients)
    train_cpu = sum(c["train-cpu-s"] for c in clients) if timed else None
    return {
        "wall_total_s": wall_total_s,
        "rounds_s": sum(round_s),
        "startup_teardown_s": wall_total_s - sum(round_s),
        "round_s": round_s,
        "accuracy": results["rounds"][-1]["accuracy"],
        "client_trainings": len(clients),
        "train_cpu_s": train_cpu,
        "efficiency": None if train_cpu is None else parallel_efficiency(train_cpu, cores, sum(round_s)),
    }


def run_variant(config: str, overrides: dict, run_dir: Path, cores: int) -> dict:
    """``fedpeft simulate`` of ``config`` with ``overrides`` in its own process, sampled from here."""
    run_dir.mkdir(parents=True, exist_ok=True)
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={_toml(value)}")]
    cmd = [sys.executable, "-m", "simulations.run", "simulate", config, *sets]
    cmd += ["--out", str(run_dir / "run"), "--no-plot", "--overwrite"]
    log_path = run_dir / "simulate.log"
    t0 = time.perf_counter()
    with log_path.open("w") as log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT) as proc:
        with TreeSampler(proc.pid) as sampler:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; last lines of {log_path}:\n" + "\n".join(tail))
    results = json.loads(RunDir(run_dir / "run").results.read_text())
    out = summarize(results, wall, cores)
    out.update(peak_pss_gib=sampler.peak_pss / GIB, tree_cpu_s=sampler.cpu_s, pss_samples=sampler.samples)
    return out


def bench_cohort_engine(config: str, overrides: dict, workers: int, run_root: Path) -> dict:
    """(d) Every variant of ``config`` (with ``overrides``), one after another; the report."""
    cores = len(os.sched_getaffinity(0))
    cfg = load_config(config, overrides)  # a bad key fails here, before any run
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "overrides": overrides,
        "cores": cores,
        "workers": workers,
        "load_avg_at_start": os.getloadavg(),
        "targets": TARGETS,
        "variants": {},
    }
    for name, sim in variants(cfg.partition.num_partitions, cores, workers).items():
        row = run_variant(config, {**overrides, **sim}, run_root / name, cores)
        report["variants"][name] = {"overrides": sim, **row}
    add_work_efficiency(report["variants"], cores)
    return report


def add_work_efficiency(rows: dict[str, dict], cores: int) -> None:
    """Each row's ``work_efficiency``: the first variant's training CPU over ``cores x`` this row's round walls.

    The same config trains the same steps in every variant, and the first variant's clients
    each run one torch thread, so its CPU time is work done; with several threads, idle
    OpenMP threads spin and ``train_cpu_s`` counts that too (most on a busy machine).
    """
    work = next(iter(rows.values()))["train_cpu_s"]
    for row in rows.values():
        row["work_efficiency"] = None if work is None else parallel_efficiency(work, cores, row["rounds_s"])


ROWS = (
    ("wall_total_s", "wall total (s)", "{:.1f}"),
    ("rounds_s", "sum of round walls (s)", "{:.1f}"),
    ("startup_teardown_s", "start-up + teardown (s)", "{:.1f}"),
    ("accuracy", "final accuracy", "{:.4f}"),
    ("peak_pss_gib", "peak PSS, tree (GiB)", "{:.2f}"),
    ("tree_cpu_s", "process tree CPU (s)", "{:.1f}"),
    ("train_cpu_s", "client training CPU (s)", "{:.1f}"),
    ("efficiency", "parallel efficiency", "{:.2f}"),
    ("work_efficiency", "  same, variant 1's CPU", "{:.2f}"),
)


def format_table(report: dict) -> str:
    """Variants side by side, each figure with its ratio to the first variant."""
    names = list(report["variants"])
    lines = [f"(d) cohort nodes on Flower's engine, {report['cores']} cores: {report['config']} {report['overrides']}"]
    lines.append(f"    {'':26s}" + "".join(f"{n:>26s}" for n in names))
    for key, label, fmt in ROWS:
        cells = []
        for n in names:
            value, first = report["variants"][n][key], report["variants"][names[0]][key]
            text = "n/a" if value is None else fmt.format(value)
            if value is not None and first and n != names[0]:
                text += f" (x{value / first:.2f})"
            cells.append(f"{text:>26s}")
        lines.append(f"    {label:26s}" + "".join(cells))
    targets = report["targets"]
    lines.append(
        f"    targets: efficiency >= {targets['efficiency']}, peak PSS <= {targets['peak_pss_gib']} GiB, "
        f"quickstart wall <= {targets['wall_total_s']:.0f} s; load average at start {report['load_avg_at_start'][0]:.2f}"
    )
    return "\n".join(lines)


def _toml(value) -> str:
    """A value as ``--set`` parses it back (TOML literals: booleans lower-case)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """This benchmark's options (``prefix`` keeps them apart inside simulations/bench/core.py)."""
    parser.add_argument(f"--{prefix}config", default=QUICKSTART, help="experiment TOML (default the quickstart)")
    parser.add_argument(f"--{prefix}rounds", type=int, help="override num-rounds, to shorten the runs")
    parser.add_argument(
        f"--{prefix}set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument(f"--{prefix}workers", type=int, default=1, help="cohort worker nodes (default 1)")
    parser.add_argument(f"--{prefix}out", default=str(OUT), help=f"JSON to write (default {OUT})")


def run_from_args(args: argparse.Namespace, prefix: str = "") -> dict:
    """Run (d) with the options of :func:`add_arguments`; print the table and write the JSON."""
    opt = lambda name: getattr(args, (prefix + name).replace("-", "_"))  # noqa: E731
    overrides = dict(parse_override(text) for text in opt("set"))
    if opt("rounds") is not None:
        overrides["num-rounds"] = opt("rounds")
    out = Path(opt("out"))
    report = bench_cohort_engine(opt("config"), overrides, opt("workers"), Path("runs/bench/cohort_engine"))
    print(format_table(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run_from_args(parser.parse_args())


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
