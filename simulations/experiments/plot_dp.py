"""Accuracy vs epsilon from DP runs' results files: a markdown table and one figure.

    python -m simulations.experiments.plot_dp RUN_DIR_OR_SWEEP_DIR... --out docs/results/dp/accuracy_vs_epsilon.png

Reads results.json only (never trains). A run's mode is its ``dp.mode``; its epsilon is
the last round's ``epsilon`` (the worst client so far for ``sample``, the server's
accountant for ``client``); runs with ``dp.mode = none`` are drawn as epsilon = inf.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedpeft.results import load_results
from fedpeft.rundir import RunDir


def summarise(path: str | Path) -> dict:
    """Mode, target and spent epsilon, delta, noise multiplier and final accuracy of one run."""
    path = Path(path)
    res = load_results(RunDir.results_of(path))
    cfg, last = res["config"], res["rounds"][-1]
    mode = cfg["dp.mode"]
    sigma = last.get("dp_noise_multiplier", last.get("train_metrics", {}).get("dp-noise-multiplier", math.nan))
    return {
        "name": cfg.get("name", "?"),
        "mode": mode,
        "target": cfg["dp.target-epsilon"] if mode != "none" else math.inf,
        "epsilon": last.get("epsilon", math.inf) if mode != "none" else math.inf,
        "delta": cfg["dp.delta"] if mode != "none" else math.nan,  # a run without DP has no dp.* but its mode
        "sigma": sigma if mode != "none" else 0.0,
        "accuracy": last["accuracy"],
        "accuracy_round0": res["rounds"][0]["accuracy"],
        "rounds": len(res["rounds"]) - 1,
        "wall_s": res.get("wall_s", math.nan),
    }


def table(rows: list[dict]) -> str:
    """Markdown table, one row per run."""
    lines = [
        "| DP | target epsilon | epsilon spent | delta | sigma | final accuracy | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["mode"], -r["target"])):
        lines.append(
            f"| {r['mode']} | {r['target']:g} | {r['epsilon']:.2f} | {r['delta']:g} | {r['sigma']:.2f} "
            f"| {r['accuracy']:.3f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def grouped(rows: list[dict], level: float = 0.95) -> list[dict]:
    """Runs of one (config name, DP mode, target epsilon) pooled over seeds: mean epsilon spent, accuracy ± CI."""
    from fedpeft.stats import mean_ci

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["name"], r["mode"], r["target"]), []).append(r)
    out = []
    for (name, mode, target), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        mean, half, n = mean_ci([r["accuracy"] for r in runs], level)
        out.append(
            {
                "name": name,
                "mode": mode,
                "target": target,
                "epsilon": max(r["epsilon"] for r in runs),
                "accuracy": mean,
                "half_width": 0.0 if math.isnan(half) else half,
                "n": n,
                "accuracy_round0": min(r["accuracy_round0"] for r in runs),
            }
        )
    return out


def plot(rows: list[dict], out: str | Path, title: str | None = None) -> Path:
    """Accuracy vs epsilon spent (log x), mean ± 95% CI over seeds per DP setting; no-DP runs as dashed bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = {}
    for g in grouped(rows):
        if g["mode"] == "none":
            continue
        key = (g["name"], g["mode"])
        pts = sorted(
            (h["epsilon"], h["accuracy"], h["half_width"], h["n"])
            for h in grouped(rows)
            if (h["name"], h["mode"]) == key
        )
        if key in colors:
            continue
        eps, acc, half, n = zip(*pts, strict=True)
        line = ax.errorbar(
            eps, acc, yerr=half, marker="o", capsize=3, label=f"{g['name']}: {g['mode']}-level DP (n={min(n)})"
        )
        colors[key] = line[0].get_color()
    for g in grouped(rows):
        if g["mode"] == "none":
            color = next((c for (name, _), c in colors.items() if name == g["name"]), "k")
            ax.axhline(g["accuracy"], color=color, linestyle="--", label=f"{g['name']}: no DP (n={g['n']})")
            ax.axhspan(g["accuracy"] - g["half_width"], g["accuracy"] + g["half_width"], color=color, alpha=0.1)
    start = min((r["accuracy_round0"] for r in rows), default=None)
    if start is not None:
        ax.axhline(start, color="grey", linestyle=":", label=f"round 0: the zero-shot start ({start:.3f})")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    from fedpeft.plot import save_figure

    ax.xaxis.set_major_locator(FixedLocator([0.5, 1, 2, 3, 5, 8, 10, 20]))  # plain numbers, not 2x10^0
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel(f"epsilon spent (delta = {rows[0]['delta']:g}; worst client for sample-level)")
    ax.set_ylabel("held-out accuracy after the last round")
    ax.set_title(title or "Accuracy vs privacy budget (mean ± 95% CI over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no point hidden
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    runs = [
        p
        for r in args.runs
        for p in (RunDir.find_results(r) if Path(r).is_dir() and not RunDir(r).results.exists() else [r])
    ]
    rows = [summarise(r) for r in runs]
    print(table(rows))
    print(f"wrote {plot(rows, args.out, args.title)}")


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
