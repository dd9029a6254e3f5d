"""Table and figure for the FedAU sweep (reads the JSON lines of ``simulations/fedau_sweep.py``).

The learning rate of each method is the one with the best final accuracy on the tuning
config and seed; every other config and seed reuses it. Besides accuracy, the table gives
the share of the total aggregation weight that went to the rare class's examples,
computed exactly from the saved trace, p_n and label histograms (no training), next to
the share the client-average objective asks for: it says how much of the participation
skew each method undid within the run's horizon.

    python -m simulations.fedau_report docs/results/fedau/*.jsonl \\
        --figure docs/figures/fedau_accuracy.png --table docs/results/fedau/table.md
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from strategies.fedau import fedau_weight_trace

LABELS = {"fedavg": "FedAvg (participants, uniform)", "fedau": "FedAU", "known_p_oracle": "known-p ORACLE"}


def load_rows(paths: list[str]) -> list[dict]:
    """All runs from the JSON-lines files."""
    return [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]


def select_lrs(rows: list[dict], config: str, seed: int) -> dict[str, float]:
    """Per method, the lr with the best final accuracy on (config, seed); ties go to the smaller lr."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r["config"] == config and r["seed"] == seed:
            score = (r["accuracy"], -r["lr"])
            if r["method"] not in best or score > best[r["method"]]:
                best[r["method"]] = score
    return {m: -neg_lr for m, (_, neg_lr) in best.items()}


def balanced_accuracy(row: dict) -> float:
    """Mean of the per-class accuracies (what the client-average objective cares about more)."""
    return float(np.mean(row["per_class_accuracy"]))


def plot_curves(rows: list[dict], lrs: dict[str, float], config: str, path: str) -> None:
    """Accuracy and rare-class accuracy vs round (runs saved with --eval-every), mean and min-max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for j, method in enumerate(LABELS):
        runs = [r for r in rows if r["config"] == config and r["method"] == method and r.get("curve")]
        runs = [r for r in runs if np.isclose(r["lr"], lrs.get(method, np.nan))]
        if not runs:
            continue
        x = np.array([c[0] for c in runs[0]["curve"]])
        acc = 100 * np.array([[c[1] for c in r["curve"]] for r in runs])
        rare = 100 * np.array([[c[2][r["rare_class"]] for c in r["curve"]] for r in runs])
        for ax, vals in zip(axes, [acc, rare], strict=True):
            ax.plot(x, vals.mean(axis=0), "o-", color=f"C{j}", label=f"{LABELS[method]} (lr {lrs[method]:g})")
            ax.fill_between(x, vals.min(axis=0), vals.max(axis=0), color=f"C{j}", alpha=0.15)
    for ax, title in zip(axes, ["held-out accuracy", "accuracy on the least-participating class"], strict=True):
        ax.set_title(f"{config.removeprefix('fedau_')}: {title}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def rare_weight_share(row: dict) -> tuple[float, float]:
    """(share of aggregation weight on the rare class over the run, the client-average target share)."""
    part = np.asarray(row["participation_trace"], dtype=bool)
    hist = np.asarray(row["label_histograms"], dtype=np.float64)
    mix = hist / hist.sum(axis=1, keepdims=True)
    weights = method_weights(row["method"], part, row["probabilities"], row.get("k_cap", 100000))
    per_class = weights.sum(axis=0) @ mix
    rare = row["rare_class"]
    return float(per_class[rare] / per_class.sum()), float(mix.mean(axis=0)[rare])


def method_weights(method: str, part: np.ndarray, probabilities: np.ndarray, k_cap: int = 100000) -> np.ndarray:
    """(rounds, clients) aggregation weight of each participation under ``method`` (0 where absent)."""
    if method == "fedau":
        return fedau_weight_trace(part, k_cap)
    if method == "known_p_oracle":
        return part / np.asarray(probabilities)
    return part / np.maximum(part.sum(axis=1, keepdims=True), 1)


def share_curves(config_paths: list[str], seeds: list[int], num_rounds: int) -> dict[tuple[str, str], np.ndarray]:
    """(pattern, method) -> (seeds, rounds) cumulative rare-class weight share; "target" holds the goal.

    Needs only the data labels, partitions and participation models: no training.
    """
    from fedpeft import participation as participation_lib
    from fedpeft.config import load_config
    from fedpeft.data import load_splits
    from fedpeft.partition import label_histograms
    from fedpeft.task import partitions
    from simulations.fedau_sweep import class_participation

    curves: dict[tuple[str, str], list] = defaultdict(list)
    for path in config_paths:
        for seed in seeds:
            cfg = load_config(path).replace({"seed": seed})
            labels = load_splits(cfg.data).train.labels
            hist = label_histograms(labels, partitions(cfg), int(labels.max()) + 1)
            n = cfg.partition.num_partitions
            env = participation_lib.build_participation(cfg.participation, n, seed, label_hist=hist)
            part = participation_lib.trace(env, num_rounds, n)
            mix = hist / hist.sum(axis=1, keepdims=True)
            rare = int(np.argmin(class_participation(env.probabilities, hist)))
            pattern = cfg.participation.model
            for method in LABELS:
                per_class = np.cumsum(method_weights(method, part, env.probabilities), axis=0) @ mix
                curves[(pattern, method)].append(per_class[:, rare] / np.maximum(per_class.sum(axis=1), 1e-12))
            curves[(pattern, "target")].append(np.full(num_rounds, mix.mean(axis=0)[rare]))
    return {k: np.array(v) for k, v in curves.items()}


def plot_share(curves: dict[tuple[str, str], np.ndarray], path: str, trained_rounds: int) -> None:
    """One panel per pattern: cumulative rare-class weight share vs rounds, mean and min-max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = sorted({p for p, _ in curves})
    fig, axes = plt.subplots(1, len(patterns), figsize=(4 * len(patterns), 3.5), sharey=True)
    for ax, pattern in zip(np.atleast_1d(axes), patterns, strict=True):
        for j, method in enumerate(LABELS):
            c = curves[(pattern, method)]
            x = np.arange(1, c.shape[1] + 1)
            ax.plot(x, c.mean(axis=0), color=f"C{j}", label=LABELS[method])
            ax.fill_between(x, c.min(axis=0), c.max(axis=0), color=f"C{j}", alpha=0.15)
        ax.plot(x, curves[(pattern, "target")].mean(axis=0), "k--", label="client-average target")
        ax.axvline(trained_rounds, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(pattern)
        ax.set_xlabel("rounds (grey: the trained runs' horizon)")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("rare-class share of aggregation weight")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def summarise(rows: list[dict], lrs: dict[str, float]) -> dict[tuple[str, str], dict]:
    """(config, method) -> mean/std of accuracy, rare-class accuracy and weight share over seeds."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] in lrs and np.isclose(r["lr"], lrs[r["method"]]):
            groups[(r["config"], r["method"])].append(r)
    out = {}
    for key, runs in sorted(groups.items()):
        acc = np.array([r["accuracy"] for r in runs])
        rare = np.array([r["rare_class_accuracy"] for r in runs])
        balanced = np.array([balanced_accuracy(r) for r in runs])
        shares = np.array([rare_weight_share(r) for r in runs])
        out[key] = {
            "seeds": sorted(r["seed"] for r in runs),
            "accuracy": acc,
            "rare": rare,
            "balanced": balanced,
            "share": shares[:, 0].mean(),
            "target": shares[:, 1].mean(),
        }
    return out


def markdown_table(summary: dict, lrs: dict[str, float]) -> str:
    """The README table."""
    lines = [
        "| participation | method | lr | seeds | final accuracy | rare-class accuracy | balanced accuracy "
        "| rare-class weight share (target) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(values: np.ndarray) -> str:
        spread = 100 * values.std(ddof=1) if len(values) > 1 else 0.0
        return f"{100 * values.mean():.1f} ± {spread:.1f}"

    for (config, method), s in summary.items():
        lines.append(
            f"| {config.removeprefix('fedau_')} | {LABELS.get(method, method)} | {lrs[method]:g} | {len(s['seeds'])} | "
            f"{cell(s['accuracy'])} | {cell(s['rare'])} | {cell(s['balanced'])} | {s['share']:.2f} ({s['target']:.2f}) |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    """Grouped bars (mean, std error bars, one dot per seed): accuracy and rare-class accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({c for c, _ in summary})
    methods = [m for m in LABELS if any(m == mm for _, mm in summary)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.8 / len(methods)
    for ax, metric, title in zip(
        axes, ["accuracy", "rare"], ["final accuracy", "accuracy on the rare class"], strict=True
    ):
        for j, method in enumerate(methods):
            for i, config in enumerate(configs):
                s = summary.get((config, method))
                if s is None:
                    continue
                x = i + (j - (len(methods) - 1) / 2) * width
                vals = 100 * s[metric]
                err = vals.std(ddof=1) if len(vals) > 1 else 0
                ax.bar(x, vals.mean(), width, yerr=err, color=f"C{j}", label=LABELS[method] if i == 0 else None)
                ax.scatter(np.full(len(vals), x), vals, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(configs)), [c.removeprefix("fedau_") for c in configs])
        ax.set_title(title)
        ax.set_ylabel("% on the held-out set")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("20 clients, label-correlated participation, NF4 MiniLM + LoRA (mean ± std over seeds)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON-lines files from fedau_sweep")
    parser.add_argument("--tune-config", default="fedau_bernoulli")
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--figure", default=None)
    parser.add_argument("--table", default=None)
    parser.add_argument("--curve-figure", default=None, help="accuracy vs round on the tuning config")
    parser.add_argument("--share-configs", nargs="*", default=[], help="fedau_*.toml for the weight-share figure")
    parser.add_argument("--share-seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--share-rounds", type=int, default=1000)
    parser.add_argument("--share-figure", default="docs/figures/fedau_weight_share.png")
    args = parser.parse_args(argv)
    rows = load_rows(args.runs)
    lrs = select_lrs(rows, args.tune_config, args.tune_seed)
    grid = sorted({r["lr"] for r in rows if r["config"] == args.tune_config and r["seed"] == args.tune_seed})
    tuning = "\n".join(
        f"- {LABELS.get(m, m)}: "
        + ", ".join(
            f"lr {r['lr']:g} -> {100 * r['accuracy']:.1f} (rare {100 * r['rare_class_accuracy']:.1f}, "
            f"balanced {100 * balanced_accuracy(r):.1f})"
            for r in sorted(rows, key=lambda r: r["lr"])
            if r["method"] == m and r["config"] == args.tune_config and r["seed"] == args.tune_seed
        )
        for m in lrs
    )
    summary = summarise(rows, lrs)
    text = f"Tuning ({args.tune_config}, seed {args.tune_seed}, grid {grid}):\n{tuning}\n\n{markdown_table(summary, lrs)}\n"
    print(text)
    if args.table:
        Path(args.table).write_text(text)
    if args.figure:
        plot(summary, args.figure)
    if args.curve_figure:
        plot_curves(rows, lrs, args.tune_config, args.curve_figure)
    if args.share_configs:
        curves = share_curves(args.share_configs, args.share_seeds, args.share_rounds)
        trained = max((len(r["participation_trace"]) for r in rows), default=args.share_rounds)
        plot_share(curves, args.share_figure, trained)
        for key, c in sorted(curves.items()):
            at = {t: f"{c[:, t - 1].mean():.2f}" for t in (trained, args.share_rounds)}
            print(f"share {key[0]:9s} {key[1]:15s} " + " ".join(f"round {t}: {v}" for t, v in at.items()))


if __name__ == "__main__":
    main()
