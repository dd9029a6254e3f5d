"""GPU benchmark: step time and memory per quantization x compute dtype, batched cohorts, clients per round.

    python -m simulations.bench.gpu                       # on a CUDA machine: under 5 minutes on one GPU
    python -m simulations.bench.gpu --device cpu --quick  # a smoke run of the same code on a CPU

Prints, and writes as JSON (``docs/results/bench/gpu.json``):
(a) a LoRA r=8 training step on MiniLM (batch 32 x 64 tokens): median seconds and peak device
    memory for every quantization (none / int8 / nf4) and compute dtype (float32 / bfloat16),
    each measured in a fresh process so no model of another variant shares the memory;
(b) client-steps per second at cohort sizes 1 (one client after another), 8 and 32 (batched,
    fedpeft/cohort.py), interleaved over repeats, with the ratio to 1;
(c) the largest cohort (doubling) whose batched training step stays within ``--budget-gb``.
The machine may be shared: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

OUT = Path("docs/results/bench/gpu.json")
QUANTIZATIONS = ("none", "int8", "nf4")
DTYPES = ("float32", "bfloat16")


def step_config(device: str, quantization: str, dtype: str, clients: int = 1, steps: int = 3):
    """The embedded default on ``device``: ``clients`` iid partitions of ``steps`` batches of 32."""
    from fedpeft.config import ExperimentConfig

    return ExperimentConfig.from_flat(
        {
            "name": "bench-gpu",
            "model.device": device,
            "model.quantization": quantization,
            "model.compute-dtype": dtype,
            "partition.num-partitions": clients,
            "partition.scheme": "iid",
            "data.num-train-examples": clients * 32 * steps,
            "train.local-steps": steps,
        }
    )


def measure_one(device: str, quantization: str, dtype: str, steps: int) -> dict:
    """(a) in this process: median seconds per step (after a warm-up step) and peak device bytes."""
    import torch

    from fedpeft.tasks import load_task
    from fedpeft.train import train_local

    task = load_task(step_config(device, quantization, dtype, steps=steps + 1))
    loader = task.train_loader(task.partition(0), 1, 0)
    cfg = task.cfg.train
    train_local(task.model, loader, cfg.__class__(local_steps=1), dropout_seed=0)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_local(task.model, loader, cfg.__class__(local_steps=1), dropout_seed=0)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    return {
        "quantization": quantization,
        "compute_dtype": dtype,
        "s_per_step": statistics.median(times),
        "peak_bytes": peak,
    }


def measure_fresh(device: str, quantization: str, dtype: str, steps: int) -> dict:
    """:func:`measure_one` in a fresh Python process (its memory is that variant's alone)."""
    cmd = [sys.executable, "-m", "simulations.bench.gpu", "--one", quantization, dtype, "--device", device]
    out = subprocess.run([*cmd, "--steps", str(steps)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"quantization": quantization, "compute_dtype": dtype, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cohort_rates(device: str, sizes: list[int], steps: int, repeats: int) -> dict:
    """(b) client-steps per second by cohort size (1 = one client after another), medians, ratio to 1."""
    from fedpeft.cohort import train_cohort
    from fedpeft.tasks import load_task

    task = load_task(step_config(device, "nf4", "auto", clients=max(sizes), steps=steps))
    samples: dict[int, list[float]] = {k: [] for k in sizes}
    for _ in range(repeats):
        for k in sizes:
            jobs = [(task.initial_state, pid, 1) for pid in range(k)]
            t0 = time.perf_counter()
            train_cohort(task, jobs, batched=k > 1)
            samples[k].append(k * steps / (time.perf_counter() - t0))
    rate = {k: statistics.median(v) for k, v in samples.items()}
    return {str(k): {"client_steps_per_s": rate[k], "ratio_to_1": rate[k] / rate[sizes[0]]} for k in sizes}


def largest_cohort(device: str, budget_bytes: int, limit: int) -> dict:
    """(c) the largest doubling cohort whose batched step fits the budget (CUDA peak bytes)."""
    import torch

    from fedpeft.cohort import train_cohort
    from fedpeft.tasks import load_task

    fits, peaks, k = 0, {}, 2
    while k <= limit:
        task = load_task(step_config(device, "nf4", "auto", clients=k, steps=1))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            train_cohort(task, [(task.initial_state, pid, 1) for pid in range(k)], batched=True)
        except torch.cuda.OutOfMemoryError:
            break
        peaks[str(k)] = int(torch.cuda.max_memory_allocated())
        if peaks[str(k)] > budget_bytes:
            break
        fits, k = k, k * 2
    return {"largest_cohort_within_budget": fits, "peak_bytes_by_cohort": peaks, "budget_bytes": budget_bytes}


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, default=40.0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every part")
    parser.add_argument("--one", nargs=2, metavar=("QUANT", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    from simulations.quiet import quiet_libraries

    quiet_libraries()
    if args.one:  # the child of measure_fresh
        print(json.dumps(measure_one(args.device, *args.one, args.steps)))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device; run with --device cpu for a smoke run", file=sys.stderr)
        return 2
    steps = 1 if args.quick else args.steps
    sizes = [1, 2] if args.quick else [1, 8, 32]
    quants = ("nf4",) if args.quick or args.device == "cpu" else QUANTIZATIONS
    dtypes = ("float32",) if args.device == "cpu" else DTYPES
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "steps": [measure_fresh(args.device, q, d, steps) for q in quants for d in dtypes],
        "cohorts": cohort_rates(args.device, sizes, steps, 1 if args.quick else args.repeats),
    }
    if args.device == "cuda":
        result["capacity"] = largest_cohort(args.device, int(args.budget_gb * 2**30), 4096)
    for row in result["steps"]:
        print(
            f"step {row['quantization']:5s} {row['compute_dtype']:9s}",
            row.get("s_per_step", row.get("error")),
            row.get("peak_bytes"),
        )
    for k, row in result["cohorts"].items():
        print(f"cohort {k:>3}: {row['client_steps_per_s']:.2f} client-steps/s ({row['ratio_to_1']:.2f}x)")
    if "capacity" in result:
        print("largest cohort within budget:", result["capacity"]["largest_cohort_within_budget"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
