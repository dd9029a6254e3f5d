"""Accuracy vs epsilon from DP runs' results files: a markdown table and one figure.

    python -m simulations.experiments.plot_dp RUN_DIR... --out docs/figures/dp_accuracy_vs_epsilon.png

Reads results.json only (never trains). A run's mode is its ``dp.mode``; its epsilon is
the last round's ``epsilon`` (the worst client so far for ``sample``, the server's
accountant for ``client``); runs with ``dp.mode = none`` are drawn as epsilon = inf.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedpeft.results import load_results


def summarise(path: str | Path) -> dict:
    """Mode, target and spent epsilon, delta, noise multiplier and final accuracy of one run."""
    path = Path(path)
    res = load_results(path / "results.json" if path.is_dir() else path)
    cfg, last = res["config"], res["rounds"][-1]
    mode = cfg["dp.mode"]
    sigma = last.get("dp_noise_multiplier", last.get("train_metrics", {}).get("dp-noise-multiplier", math.nan))
    return {
        "mode": mode,
        "target": cfg["dp.target-epsilon"] if mode != "none" else math.inf,
        "epsilon": last.get("epsilon", math.inf) if mode != "none" else math.inf,
        "delta": cfg["dp.delta"],
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


def plot(rows: list[dict], out: str | Path, title: str | None = None) -> Path:
    """Accuracy vs epsilon (log x), one line per DP mode, the non-private run as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in (("sample", "o"), ("client", "s")):
        pts = sorted((r["epsilon"], r["accuracy"]) for r in rows if r["mode"] == mode)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=f"{mode}-level DP")
    for r in rows:
        if r["mode"] == "none":
            ax.axhline(r["accuracy"], color="k", linestyle="--", label="no DP (epsilon = inf)")
    chance = min((r["accuracy_round0"] for r in rows), default=None)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="round 0 (untrained)")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon spent (delta = {rows[0]['delta']:g})")
    ax.set_ylabel("held-out accuracy after the last round")
    ax.set_title(title or "Accuracy vs privacy budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    rows = [summarise(r) for r in args.runs]
    print(table(rows))
    print(f"wrote {plot(rows, args.out, args.title)}")


if __name__ == "__main__":
    main()
