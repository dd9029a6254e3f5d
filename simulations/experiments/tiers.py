"""Per-tier table of a heterogeneous-rank sweep: bytes per client-round and client memory by LoRA rank.

    python -m simulations.experiments.tiers runs/sweeps/hetlora --out docs/results/hetlora/tiers.md

``fedpeft report`` gives each group's accuracy with its confidence interval; this adds what
differs between the devices of one fleet: for every group and every rank its clients
train, the median uplink and downlink payload bytes of one client-round (from the byte
ledger) and the client's training memory at that rank (results' ``training_bytes_by_rank``:
frozen backbone + trainable parameters, gradients and optimizer state; activations not included).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from fedpeft.ranks import training_bytes
from fedpeft.results import load_results
from fedpeft.rundir import RunDir


def tier_rows(sweep_dir: str | Path) -> list[dict]:
    """One row per (config name, rank): client-rounds seen, median bytes up / down, memory MB."""
    seen: dict[tuple[str, int], dict[str, list]] = defaultdict(lambda: {"up": [], "down": [], "mem": []})
    for path in RunDir.find_results(sweep_dir):
        results = load_results(path)
        if results.get("status") != "completed":
            continue
        cfg = results["config"]
        ranks = results.get("client_ranks") or [cfg["peft.lora-rank"]] * cfg["partition.num-partitions"]
        memory = results.get("training_bytes_by_rank") or {  # one rank: the same count from the run's own figures
            str(ranks[0]): training_bytes(
                results["backbone"]["total_bytes"], results["trainable_params"], cfg["train.optimizer"]
            )
        }
        for row in results["ledger"]:
            if row["kind"] != "train" or row["partition_id"] < 0:
                continue
            rank = int(ranks[row["partition_id"]])
            cell = seen[(cfg["name"], rank)]
            cell["up" if row["direction"] == "up" else "down"].append(row["payload_bytes"])
            if str(rank) in memory:
                cell["mem"].append(memory[str(rank)])
    return [
        {
            "name": name,
            "rank": rank,
            "client_rounds": len(cell["up"]),
            "uplink_bytes": statistics.median(cell["up"]) if cell["up"] else None,
            "downlink_bytes": statistics.median(cell["down"]) if cell["down"] else None,
            "training_mb": statistics.median(cell["mem"]) / 1e6 if cell["mem"] else None,
        }
        for (name, rank), cell in sorted(seen.items())
    ]


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| config | rank | client-rounds | uplink bytes / client-round | downlink bytes / client-round | training MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mem = "-" if r["training_mb"] is None else f"{r['training_mb']:.2f}"
        lines.append(
            f"| {r['name']} | {r['rank']} | {r['client_rounds']} | {r['uplink_bytes']:,.0f} | "
            f"{r['downlink_bytes']:,.0f} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--out", required=True, help="Markdown file to write")
    args = parser.parse_args(argv)
    text = markdown(tier_rows(args.sweep_dir))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
