"""Byzantine table: final test accuracy per aggregator x attacker fraction, paired against FedAvg's mean.

Reads a ``fedpeft sweep`` folder of ``byzantine_{mean,median,trimmed,krum}.toml`` runs gridded over
``faults.byzantine-fraction`` (README "Results"; docs/results/byzantine/README.md) and prints a Markdown
table: mean +- 95% CI over seeds, the per-seed values, and the paired difference against the mean
aggregator at the same fraction (same seeds, so the same partitions and attackers).

    python -m simulations.experiments.byzantine_table runs/byzantine > docs/results/byzantine/table.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedpeft.results import load_results
from fedpeft.stats import format_ci, mean_ci
from simulations.front_door import run_main

AGGREGATORS = ("mean", "median", "trimmed", "krum")


def final_accuracy(run_dir: Path) -> float:
    """The last round's test accuracy of a completed run (an incomplete run is an error, not a gap)."""
    results = load_results(run_dir)
    if results.get("status") != "completed":
        raise ValueError(f"{run_dir} is not completed (status {results.get('status')!r}); rerun the sweep to finish it")
    return float(results["rounds"][-1]["accuracy"])


def table(sweep_dir: Path) -> str:
    """The Markdown table of one sweep folder."""
    fractions = sorted(
        {p.name.split("=", 1)[1] for p in sweep_dir.glob("byzantine_mean/faults.byzantine-fraction=*")}, key=float
    )
    if not fractions:
        raise ValueError(f"no byzantine_mean/faults.byzantine-fraction=* runs under {sweep_dir}")
    lines = [
        "| attackers | aggregator | final test accuracy | seeds 0-4 | Δ vs mean (paired) |",
        "|---|---|---|---|---|",
    ]
    for fraction in fractions:
        acc = {}
        for agg in AGGREGATORS:
            folder = sweep_dir / f"byzantine_{agg}" / f"faults.byzantine-fraction={fraction}"
            seeds = sorted(folder.glob("seed-*"), key=lambda p: int(p.name.split("-")[1]))
            acc[agg] = [final_accuracy(s) for s in seeds]
        for agg in AGGREGATORS:
            values = acc[agg]
            m, h, n = mean_ci(values)
            per_seed = " ".join(f"{v:.3f}".lstrip("0") for v in values)
            delta = ""
            if agg != "mean":
                dm, dh, dn = mean_ci([a - b for a, b in zip(values, acc["mean"], strict=True)])
                delta = format_ci(dm, dh, dn, "+.3f")
            lines.append(f"| {float(fraction):.0%} | {agg} | {format_ci(m, h, n, '.3f')} | {per_seed} | {delta} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep's --out folder")
    args = parser.parse_args(argv)
    sys.stdout.write(table(args.sweep_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
