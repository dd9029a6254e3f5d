"""Plots drawn from results files only (nothing here trains); several seeds of one experiment draw a CI band."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedpeft.results import (  # noqa: E402
    experiment_config,
    group_by_experiment,
    group_labels,
    load_results,
    require_metric,
    round_metrics,
)
from fedpeft.rundir import RunDir
from fedpeft.stats import curve_band  # noqa: E402

log = logging.getLogger(__name__)


def run_label(results: dict) -> str:
    """``name: strategy / peft method / quantization`` for the legend."""
    c = results["config"]
    parts = [str(c[k]) for k in ("strategy.name", "peft.method", "model.quantization") if k in c]
    return f"{c.get('name', '?')}: {' / '.join(parts)}" if parts else str(c.get("name", "?"))


def plot_runs(
    paths: list[str | Path],
    out: str | Path,
    title: str | None = None,
    *,
    total_bytes: bool = False,
    target: float | None = None,
    metric: str = "accuracy",
) -> Path:
    """Accuracy vs cumulative uplink bytes (log x) and accuracy vs round, one line per run.

    Runs that differ only in their seed form one group, drawn as its mean with a shaded
    95% Student-t confidence band (see :func:`plot_groups`). ``total_bytes=True`` adds a
    panel of accuracy vs cumulative payload bytes in both directions (uplink + downlink);
    ``target`` draws a dashed line at that accuracy. ``metric`` plots another column of the
    round rows instead (e.g. ``balanced_accuracy``).
    """
    if not paths:
        raise ValueError("give at least one run folder or results.json to plot")
    files = list(dict.fromkeys(RunDir.results_of(p).resolve() for p in paths))
    loaded = [load_results(p) for p in files]  # a run given twice (folder and file) is one run
    for path, results in zip(files, loaded, strict=True):
        require_metric(results, path, metric)  # never an empty figure
    groups = [[loaded[i] for i in idx] for idx in group_by_experiment(loaded)]
    labels = [run_label(g[0]) for g in groups]
    if len(set(labels)) < len(labels):  # same name/strategy/method/quantization: name what differs
        labels = group_labels([experiment_config(g[0]["config"]) for g in groups])
    return plot_groups(
        list(zip(labels, groups, strict=True)), out, title, metric=metric, total_bytes=total_bytes, target=target
    )


def plot_groups(
    groups: list[tuple[str, list[dict]]],
    out: str | Path,
    title: str | None = None,
    *,
    metric: str = "accuracy",
    total_bytes: bool = False,
    target: float | None = None,
    level: float = 0.95,
) -> Path:
    """``metric`` vs cumulative uplink bytes (log x) and vs round, one line or band per group.

    ``groups`` holds ``(label, [results of each seed])``. A group of one run is drawn as
    that run's line; a larger group as the mean over its seeds with a shaded Student-t
    ``level`` confidence band, on the rounds every seed evaluated (the bytes axis places
    each round at the seeds' mean cumulative bytes).
    """
    if total_bytes:
        fig, (ax_bytes, ax_total, ax_round) = plt.subplots(1, 3, figsize=(17, 4.5))
    else:
        fig, (ax_bytes, ax_round) = plt.subplots(1, 2, figsize=(12, 4.5))
        ax_total = None
    ylabel = f"held-out {metric.replace('_', ' ')}"
    for label, runs in groups:
        color = None
        for ax, xkey in (
            (ax_bytes, "cum_uplink_payload_bytes"),
            (ax_total, "cum_total_payload_bytes"),
            (ax_round, "round"),
        ):
            if ax is None:
                continue
            color = _draw(ax, runs, metric, xkey, label, color, level)
    panels = [(ax_bytes, "cumulative uplink payload bytes (all clients, log scale)", "vs communication")]
    if ax_total is not None:
        panels.append((ax_total, "cumulative payload bytes, uplink + downlink (log scale)", "vs total communication"))
    for ax, xlabel, what in panels:
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(f"{metric.replace('_', ' ')} {what}")
    ax_round.set_xlabel("server round (0 = before training)")
    ax_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_round.set_title(f"{metric.replace('_', ' ')} vs round")
    for ax, _, _ in [*panels, (ax_round, None, None)]:
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    if target is not None:
        ax_round.text(0, target, f" target {target:g}", va="bottom", fontsize=8, color="grey")
    # One legend under the panels: long group labels would hide the curves inside an axis.
    handles, labels = ax_round.get_legend_handles_labels()
    ncol = 1 if max((len(x) for x in labels), default=0) > 70 else 2
    rows = -(-len(labels) // ncol)
    height = fig.get_figheight()
    fig.set_figheight(height + 0.22 * rows + 0.3)
    bottom = (0.22 * rows + 0.3) / fig.get_figheight()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if any(len(runs) > 1 for _, runs in groups):
        fig.text(
            0.99,
            0.005,
            f"bands: {level:.0%} CI of the mean, Student-t over seeds",
            fontsize=8,
            color="grey",
            ha="right",
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Write ``fig`` to ``out`` (folders made, 120 dpi), close it, and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    log.info("wrote %s", out)
    return out


def _draw(ax, runs: list[dict], metric: str, xkey: str, label: str, color, level: float):
    """One group on one panel: a line (one run) or a mean line with a CI band; returns its colour."""
    curves = []
    for res in runs:
        rows = [r for r in round_metrics(res) if r.get(metric) is not None]
        curves.append({r["round"]: (r[xkey], r[metric]) for r in rows})
    rounds, x_mean, _, _ = curve_band([{k: v[0] for k, v in c.items()} for c in curves], level)
    _, y_mean, y_half, _ = curve_band([{k: v[1] for k, v in c.items()} for c in curves], level)
    keep = [i for i in range(len(rounds)) if xkey == "round" or x_mean[i] > 0]  # log axes start after round 0
    x = np.array([x_mean[i] for i in keep])
    y = np.array([y_mean[i] for i in keep])
    if len(runs) == 1:
        label = f"{label} (seed {runs[0]['config'].get('seed')})"
    else:
        label = f"{label} ({len(runs)} seeds)"
    line = ax.plot(x, y, marker="o", markersize=3 if len(runs) > 1 else 6, color=color, label=label)[0]
    if len(runs) > 1:
        half = np.array([y_half[i] for i in keep])
        ax.fill_between(x, y - half, y + half, color=line.get_color(), alpha=0.2, linewidth=0)
    return line.get_color()


def target_table(paths: list[str | Path], target: float) -> str:
    """A text table: per run, the round and payload bytes at which accuracy first reached ``target``."""
    from fedpeft.results import bytes_to_target

    lines = [f"accuracy target {target:g}", "run | round | uplink bytes | uplink+downlink bytes"]
    for path in paths:
        results = load_results(path)
        require_metric(results, path)
        hit = bytes_to_target(results, target)
        label = run_label(results)
        if hit is None:
            best = max((r["accuracy"] for r in round_metrics(results) if r.get("accuracy") is not None), default=None)
            lines.append(f"{label} | not reached (best {best}) | - | -")
        else:
            lines.append(f"{label} | {hit['round']} | {hit['uplink_payload_bytes']:,} | {hit['total_payload_bytes']:,}")
    return "\n".join(lines)
