"""Core benchmark: quantized weight bytes, step time, Flower's simulation overhead, cohort nodes.

    python -m simulations.bench.core [--rounds 2] [--clients 4] [--examples 400] [--steps 8]
        [--only bytes,steps,overhead,cohort] [--cohort-rounds N] [--cohort-set KEY=VALUE ...]

Prints, side by side in one run (this machine is shared and noisy, so only ratios
taken here are meaningful):
(a) bytes of the backbone's linear layers for none / int8 / nf4 and their ratio to fp32;
(b) local training step time on nf4 and int8 vs fp32 (same batches, interleaved);
(c) wall time of Flower's simulation for R rounds x C clients divided by the wall time of
    exactly the same run in one process (simulations/inprocess.py: the same ServerApp,
    ClientApp and ``Strategy.start`` over an in-memory grid; start-up reported
    separately). Writes the figures to ``runs/bench/bench_core.json``.
(d) cohort nodes vs one client per actor on Flower's engine, the quickstart by default:
    wall, peak PSS, parallel efficiency (simulations/bench/cohort_engine.py; its options
    here carry a ``--cohort-`` prefix; its three quickstart runs take ~10 min: ``--only cohort``
    runs it alone, ``--only bytes,steps,overhead`` skips it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedpeft import adapters, backbone
from fedpeft.config import ExperimentConfig, TrainConfig
from fedpeft.results import load_results
from fedpeft.task import set_threads
from fedpeft.tasks import load_task
from fedpeft.train import train_local
from simulations.bench import cohort_engine
from simulations.inprocess import run_in_process
from simulations.quiet import quiet_libraries


def bench_bytes() -> dict:
    """(a) Linear-layer bytes per quantization and the ratio to fp32."""
    out = {}
    for q in ("none", "int8", "nf4"):
        model = backbone.load_backbone(ExperimentConfig().model.__class__(quantization=q), 2)
        wb = backbone.measure_weight_bytes(model, q)
        out[q] = {
            "linear_bytes": wb.weight_bytes,
            "fp32_linear_bytes": wb.fp32_weight_bytes,
            "model_bytes": wb.total_bytes,
        }
        out[q]["linear_ratio_to_fp32"] = wb.weight_bytes / wb.fp32_weight_bytes
        del model
    return out


def bench_steps(steps: int, repeats: int = 3) -> dict:
    """(b) Seconds per LoRA training step (batch 32, one thread) for each quantization."""
    tasks = {}
    for q in ("none", "int8", "nf4"):
        cfg = ExperimentConfig.from_flat(
            {"model.quantization": q, "partition.num-partitions": 1, "data.num-train-examples": 32 * steps}
        )
        tasks[q] = load_task(cfg)
    times: dict[str, list[float]] = {q: [] for q in tasks}
    for _ in range(repeats):  # interleave so drift in machine speed hits every variant alike
        for q, task in tasks.items():
            adapters.set_adapter_state(task.model, task.initial_state)
            loader = task.train_loader(task.partition(0), 1, 0)
            t0 = time.perf_counter()
            train_local(task.model, loader, TrainConfig(local_steps=steps), dropout_seed=0)
            times[q].append((time.perf_counter() - t0) / steps)
    best = {q: min(v) for q, v in times.items()}
    return {q: {"s_per_step": best[q], "ratio_to_fp32": best[q] / best["none"]} for q in best}


def bench_overhead(rounds: int, clients: int, examples: int, out_dir: Path) -> dict:
    """(c) Flower simulation vs the same run in one process, start-up separated."""
    from simulations.launch import simulate

    cfg = ExperimentConfig.from_flat(
        {
            "name": "bench-overhead",
            "num-rounds": rounds,
            "partition.num-partitions": clients,
            "partition.scheme": "iid",
            "participation.model": "always",
            "data.num-train-examples": examples,
        }
    )
    t0 = time.perf_counter()
    inproc = load_results(run_in_process(cfg, out_dir / "inprocess"))
    bare_s = time.perf_counter() - t0
    bare = {"round_s": [r["wall_s"] for r in inproc["rounds"][1:]], "accuracies": [inproc["rounds"][-1]["accuracy"]]}
    bare["train_s"] = sum(bare["round_s"])
    t0 = time.perf_counter()
    results = load_results(simulate(cfg, out_dir / "flower", plot=False))
    flower_total = time.perf_counter() - t0
    flower_rounds = sum(r["wall_s"] for r in results["rounds"][1:])
    # Round 1 of the simulation includes each Ray actor building its model (start-up);
    # the steady-state ratio compares rounds 2..R of both, measured the same way.
    flower_steady = sum(r["wall_s"] for r in results["rounds"][2:])
    bare_steady = sum(bare["round_s"][1:])
    return {
        "flower_round_s": [r["wall_s"] for r in results["rounds"][1:]],
        "inprocess_round_s": bare["round_s"],
        "ratio_steady_rounds": flower_steady / bare_steady if bare_steady else float("nan"),
        "rounds": rounds,
        "clients": clients,
        "inprocess_s": bare_s,
        "inprocess_train_s": bare["train_s"],
        "flower_rounds_s": flower_rounds,
        "flower_total_s": flower_total,
        "flower_startup_and_teardown_s": flower_total - flower_rounds,
        "ratio_flower_rounds_to_inprocess": flower_rounds / bare_s,
        "inprocess_accuracy": bare["accuracies"][-1],
        "flower_accuracy": results["rounds"][-1]["accuracy"],
    }


SECTIONS = ("bytes", "steps", "overhead", "cohort")


def parse_sections(text: str) -> list[str]:
    """``--only``'s comma-separated section names, checked."""
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"--only {text!r}: pick from {', '.join(SECTIONS)} (comma-separated)")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument(
        "--only", type=parse_sections, default=list(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}"
    )
    cohort_engine.add_arguments(parser, prefix="cohort-")
    args = parser.parse_args()
    quiet_libraries()
    set_threads(1)
    torch.manual_seed(0)
    out = Path(args.out)
    report = {}
    if "bytes" in args.only:
        report["bytes"] = bench_bytes()
        print("(a) backbone linear-layer bytes")
        for q, r in report["bytes"].items():
            print(
                f"    {q:5s} {r['linear_bytes'] / 1e6:7.2f} MB  ratio to fp32 {r['linear_ratio_to_fp32']:.3f}  (whole model {r['model_bytes'] / 1e6:.1f} MB)"
            )
    if "steps" in args.only:
        report["steps"] = bench_steps(args.steps)
        print("(b) LoRA training step, batch 32, 1 thread")
        for q, r in report["steps"].items():
            print(f"    {q:5s} {r['s_per_step']:.3f} s/step  ratio to fp32 {r['ratio_to_fp32']:.2f}")
    if "overhead" in args.only:
        report["overhead"] = bench_overhead(args.rounds, args.clients, args.examples, out)
        print_overhead(report["overhead"])
    if "cohort" in args.only:  # prints its table and writes its own JSON (--cohort-out)
        report["cohort"] = cohort_engine.run_from_args(args, prefix="cohort-")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_core.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'bench_core.json'}")


def print_overhead(o: dict) -> None:
    """(c)'s lines."""
    print(f"(c) {o['rounds']} rounds x {o['clients']} clients")
    print(f"    in-process (1 process, sequential) {o['inprocess_s']:.1f} s")
    print(
        f"    Flower simulation, rounds only      {o['flower_rounds_s']:.1f} s  ratio {o['ratio_flower_rounds_to_inprocess']:.2f}"
    )
    print(f"    Flower start-up + teardown          {o['flower_startup_and_teardown_s']:.1f} s")
    print(
        "    per round, Flower vs in-process     "
        + ", ".join(f"{f:.1f}/{b:.1f} s" for f, b in zip(o["flower_round_s"], o["inprocess_round_s"], strict=True))
        + f"  steady (rounds 2..R) ratio {o['ratio_steady_rounds']:.2f}"
    )


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
