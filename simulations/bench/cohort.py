"""Batched cohorts vs one client after another: client-steps per second on the embedded default.

    python -m simulations.bench.cohort [--steps 2] [--repeats 3] [--threads 2,1] [--sizes 4,8]

LoRA r=8 on NF4 MiniLM, batch 32 x up to 64 tokens (the embedded default, iid partitions of
``steps`` full batches each). For each torch thread count, K = 1 trains 4 clients one after
another (``train_cohort(..., batched=False)``, today's per-client path with all the threads)
and K = 4, 8 train K clients batched; the variants are interleaved within each repeat so
drift in machine speed hits all alike, and medians are reported with the ratio to K = 1.
The machine this runs on may be shared: compare ratios taken in one run, not absolutes;
client-steps per CPU-second (process time) is printed too, as it suffers less from neighbours.

A batched step's activations are K times larger: at K = 8 many exceed glibc's 32 MB mmap
ceiling and are page-faulted afresh each step. Starting the process with
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296`` speeds up such an
op alone (an 88 MB elementwise op: 95 -> 26 ms) but not a training step, and made the
2-thread runs several times slower here (``cohort-malloc.json``); the JSON records whether
they were set. Writes ``docs/results/bench/cohort[-<tag>].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from fedpeft.cohort import train_cohort
from fedpeft.config import ExperimentConfig
from fedpeft.task import set_threads
from fedpeft.tasks import load_task
from simulations.quiet import quiet_libraries

SEQUENTIAL_CLIENTS = 4
OUT_DIR = Path("docs/results/bench")
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def bench_config(steps: int, max_clients: int) -> ExperimentConfig:
    """The embedded default with ``max_clients`` iid partitions of ``steps`` full batches of 32."""
    return ExperimentConfig.from_flat(
        {
            "name": "bench-cohort",
            "partition.num-partitions": max_clients,
            "partition.scheme": "iid",
            "data.num-train-examples": max_clients * 32 * steps,
            "train.local-steps": steps,
        }
    )


def time_cohort(task, size: int, steps: int) -> tuple[float, float]:
    """Client-steps per second and per CPU-second: K = 1 trains 4 clients in turn, K > 1 K clients batched."""
    clients = SEQUENTIAL_CLIENTS if size == 1 else size
    jobs = [(task.initial_state, pid, 1) for pid in range(clients)]
    t0, c0 = time.perf_counter(), time.process_time()
    train_cohort(task, jobs, batched=size > 1)
    return clients * steps / (time.perf_counter() - t0), clients * steps / (time.process_time() - c0)


def run(steps: int, repeats: int, threads: list[int], sizes: list[int]) -> dict:
    """Medians of client-steps/s per (threads, K) and the ratio to K = 1 at the same threads."""
    task = load_task(bench_config(steps, max(sizes + [SEQUENTIAL_CLIENTS])))
    variants = [1, *sizes]
    figures: dict[str, dict] = {}
    for n in threads:
        set_threads(n)
        train_cohort(task, [(task.initial_state, 0, 1), (task.initial_state, 1, 1)], batched=True)  # warm-up
        samples: dict[int, list[tuple[float, float]]] = {k: [] for k in variants}
        for _ in range(repeats):
            for k in variants:
                samples[k].append(time_cohort(task, k, steps))
        wall = {k: statistics.median(s[0] for s in v) for k, v in samples.items()}
        cpu = {k: statistics.median(s[1] for s in v) for k, v in samples.items()}
        figures[str(n)] = {
            str(k): {
                "client_steps_per_s": wall[k],
                "ratio_to_sequential": wall[k] / wall[1],
                "client_steps_per_cpu_s": cpu[k],
                "cpu_ratio_to_sequential": cpu[k] / cpu[1],
                "samples_wall_cpu": samples[k],
            }
            for k in variants
        }
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads last",
        "setup": {"steps_per_client": steps, "repeats": repeats, "batch_size": 32, "max_seq_len": 64},
        "malloc_env": {k: os.environ.get(k, "") for k in MALLOC_ENV},
        "threads": figures,
    }


def print_table(result: dict) -> None:
    """Client-steps per second and per CPU-second with their ratios to K = 1, one block per thread count."""
    threads = list(result["threads"])
    print("K    " + "".join(f"{'threads=' + t + ': steps/s (x)  steps/cpu-s (x)':>44}" for t in threads))
    for k in result["threads"][threads[0]]:
        cells = ""
        for t in threads:
            r = result["threads"][t][k]
            cells += f"{r['client_steps_per_s']:>17.3f} ({r['ratio_to_sequential']:.2f}x)"
            cells += f"{r['client_steps_per_cpu_s']:>13.3f} ({r['cpu_ratio_to_sequential']:.2f}x)"
        print(f"{k:<5}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--sizes", default="4,8")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = parser.parse_args()
    quiet_libraries()
    result = run(
        args.steps,
        args.repeats,
        [int(v) for v in args.threads.split(",")],
        [int(v) for v in args.sizes.split(",")],
    )
    print_table(result)
    out = OUT_DIR / (f"cohort-{args.tag}.json" if args.tag else "cohort.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
