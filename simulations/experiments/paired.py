"""Paired differences between runs of different configs, seed by seed: "method A vs method B".

    python -m simulations.experiments.paired RUNS_DIR --baseline peft_full [--baseline peft_lora] [--metric accuracy]

``fedpeft report --baseline KEY=VALUE`` pairs groups that differ in one config key. Configs
that differ in several (a PEFT method with its own learning rate, SPSA vs FedAvg) are paired
here by config ``name`` instead: for each other name, the final-round ``metric`` minus the
baseline's on every seed both completed, with the two-sided 95% Student-t interval of the
mean difference (fedpeft/stats.py). Same seed = same partitions and participation draws.
Reads results.json files only.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from fedpeft.report import load_runs
from fedpeft.stats import mean_ci


def final_by_name(root: str | Path, metric: str = "accuracy") -> dict[str, dict[int, float]]:
    """``{config name: {seed: final-round metric}}`` of every completed run under ``root``."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for _, res in load_runs(root):
        if res.get("status") != "completed":
            continue
        seed = int(res["config"]["seed"])
        name = res["config"]["name"]
        if seed in out[name]:
            raise ValueError(f"two completed runs of {name!r} with seed {seed} under {root}; keep one")
        out[name][seed] = float(res["rounds"][-1][metric])
    return dict(out)


def paired(finals: dict[str, dict[int, float]], baseline: str) -> dict[str, tuple[float, float, int]]:
    """For every name but ``baseline``: mean, CI half-width and n of (name - baseline) over shared seeds."""
    if baseline not in finals:
        raise KeyError(f"no completed runs named {baseline!r}; names: {', '.join(sorted(finals))}")
    base = finals[baseline]
    out = {}
    for name, runs in sorted(finals.items()):
        seeds = sorted(set(runs) & set(base))
        if name != baseline and seeds:
            out[name] = mean_ci([runs[s] - base[s] for s in seeds])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="folder holding run folders (searched recursively)")
    parser.add_argument("--baseline", action="append", required=True, help="config name to pair against")
    parser.add_argument("--metric", default="accuracy", help="final-round metric (default accuracy)")
    args = parser.parse_args(argv)
    finals = final_by_name(args.runs, args.metric)
    for baseline in args.baseline:
        print(f"{args.metric}: name - {baseline}, paired over seeds (mean ± 95% t half-width)")
        for name, (mean, half, n) in paired(finals, baseline).items():
            ci = "no CI" if n < 2 else f"± {half:.3f}"
            print(f"  {name:28s} {mean:+.3f} {ci} (n={n})")


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
