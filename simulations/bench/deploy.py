"""Deployment vs simulation: per-round wall time and what each ClientApp message costs.

    nice -n 10 python -m simulations.bench.deploy [--nodes 2] [--rounds 3] [--json OUT.json]

Runs one small experiment three ways on this machine and prints the figures side by side:
Flower's simulation engine (Ray actors keep the model), the deployment runtime on
loopback (TLS + node authentication) with warm ClientApp workers, and the deployment
runtime without them (every ``flwr-clientapp`` process imports and builds everything).
Per message it splits the ClientApp process's cost into Flower's own start (process,
FAB install, message pull), importing our ClientApp module, the hand-off to the warm
worker, and the worker's handler time (the training itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpeft.config import ExperimentConfig
from fedpeft.results import load_results
from fedpeft.rundir import RunDir
from simulations.deploy.loopback import Loopback, run_config_overrides, wait_for_results

FLOWER_CLIENTAPP = "import flwr.supernode.runtime.run_clientapp"


def bench_config(nodes: int, rounds: int) -> ExperimentConfig:
    """The default experiment on a small slice: every node trains 4 local steps each round."""
    return ExperimentConfig().replace(
        {
            "name": "bench-deploy",
            "num-rounds": rounds,
            "data.num-train-examples": 64 * nodes,
            "data.num-test-examples": 64,
            "partition.num-partitions": nodes,
            "partition.scheme": "iid",
            "partition.min-partition-size": 8,
            "participation.model": "always",
            "train.local-steps": 4,
            "train.batch-size": 16,
            "simulation.round-timeout-s": 600.0,
        }
    )


def import_seconds(code: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter running ``code`` (imports only)."""
    times = []
    for _ in range(repeats):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def run_simulation(cfg: ExperimentConfig, root: Path) -> dict:
    """Flower's simulation engine (Ray), as ``fedpeft simulate`` runs it."""
    from simulations.launch import simulate

    return load_results(simulate(cfg, root / "sim", plot=False))


def run_deployment(cfg: ExperimentConfig, root: Path, *, warm: bool) -> tuple[dict, list[dict]]:
    """A loopback deployment (TLS + auth); returns the results and the warm workers' per-message rows."""
    out = root / "run"
    with Loopback(root) as dep:
        dep.start_superlink()
        for i in range(cfg.partition.num_partitions):
            dep.register(i)
        for i in range(cfg.partition.num_partitions):
            node = {"partition-id": i, "num-partitions": cfg.partition.num_partitions}
            dep.start_supernode(i, {**node, "warm-worker": str(dep.worker_dir)} if warm else node)
        dep.submit({**run_config_overrides(cfg), "out-dir": str(out.resolve())})
        results = wait_for_results(RunDir(out).results, timeout_s=1800)
    rows = [json.loads(line) for f in dep.worker_dir.glob("*.stats.jsonl") for line in f.read_text().splitlines()]
    return results, rows


def round_walls(results: dict) -> list[float]:
    """Wall seconds of rounds 1..R."""
    return [r["wall_s"] for r in results["rounds"][1:]]


def summarise(sim: dict, warm: tuple[dict, list[dict]], cold: dict, imports: dict[str, float]) -> dict:
    """The figures the README quotes."""
    warm_results, rows = warm
    trains = sorted((r for r in rows if r["message_type"] == "train"), key=lambda r: r["time"])
    nodes = warm_results["config"]["partition.num-partitions"]
    first, steady = trains[:nodes], trains[nodes:] or trains  # round 1 may still find the model loading
    ours_import = imports["flower+fedpeft"] - imports["flower"]
    age = statistics.median(r["process_age_s"] for r in steady if r["process_age_s"] is not None)
    handoff = statistics.median(r["mod_s"] - r["worker_s"] for r in steady)
    return {
        "round_wall_s": {
            "simulation": round_walls(sim),
            "deployment_warm": round_walls(warm_results),
            "deployment_cold": round_walls(cold),
        },
        "startup_s": {
            "simulation": sim["startup_s"],
            "deployment_warm": warm_results["startup_s"],
            "deployment_cold": cold["startup_s"],
        },
        "per_message_s": {
            "process_age_at_handler": age,
            "flower_own_start_estimate": age - ours_import,
            "fedpeft_module_import": ours_import,
            "warm_worker_handoff": handoff,
            "overhead_beyond_flower": ours_import + handoff,
            "worker_handler_round_1": statistics.median(r["worker_s"] for r in first),
            "worker_handler_steady": statistics.median(r["worker_s"] for r in steady),
        },
        "imports_s": imports,
    }


def print_table(s: dict) -> None:
    """Side-by-side figures and ratios."""
    walls = s["round_wall_s"]
    mean = {k: statistics.mean(v[1:] or v) for k, v in walls.items()}  # steady rounds (after round 1)
    print("\nper-round wall time (s), rounds 1..R:")
    for k, v in walls.items():
        print(f"  {k:17s} {' '.join(f'{x:6.1f}' for x in v)}   steady mean {mean[k]:6.1f}")
    print(f"  ratio deployment_warm / simulation: {mean['deployment_warm'] / mean['simulation']:.2f}")
    print(f"  ratio deployment_cold / simulation: {mean['deployment_cold'] / mean['simulation']:.2f}")
    print(f"  ratio deployment_cold / deployment_warm: {mean['deployment_cold'] / mean['deployment_warm']:.2f}")
    print("start-up to the first round (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["startup_s"].items()))
    print("per ClientApp message, warm worker, steady rounds (s):")
    for k, v in s["per_message_s"].items():
        print(f"  {k:28s} {v:6.2f}")


def main(argv: list[str] | None = None) -> int:
    """Run the three set-ups and print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = bench_config(args.nodes, args.rounds)
    root = Path(tempfile.mkdtemp(prefix="fpb-"))
    imports = {
        "flower": import_seconds(FLOWER_CLIENTAPP),
        "flower+fedpeft": import_seconds(f"{FLOWER_CLIENTAPP}; import simulations.client_app"),
    }
    t0 = time.monotonic()
    sim = run_simulation(cfg, root / "sim")
    print(f"simulation done in {time.monotonic() - t0:.0f} s", flush=True)
    t0 = time.monotonic()
    warm = run_deployment(cfg, root / "warm", warm=True)
    print(f"deployment (warm workers) done in {time.monotonic() - t0:.0f} s", flush=True)
    t0 = time.monotonic()
    cold, _ = run_deployment(cfg, root / "cold", warm=False)
    print(f"deployment (no warm workers) done in {time.monotonic() - t0:.0f} s", flush=True)
    summary = {"config": run_config_overrides(cfg), **summarise(sim, warm, cold, imports)}
    print_table(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
