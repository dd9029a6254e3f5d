"""Plots drawn from results files only (nothing here trains)."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpeft.results import load_results, round_metrics  # noqa: E402

log = logging.getLogger(__name__)


def run_label(results: dict) -> str:
    """``name: strategy / peft method / quantization`` for the legend."""
    c = results["config"]
    return f"{c['name']}: {c['strategy.name']} / {c['peft.method']} / {c['model.quantization']}"


def plot_runs(
    paths: list[str | Path],
    out: str | Path,
    title: str | None = None,
    *,
    total_bytes: bool = False,
    target: float | None = None,
) -> Path:
    """Accuracy vs cumulative uplink bytes (log x) and accuracy vs round, one line per run.

    ``total_bytes=True`` adds a panel of accuracy vs cumulative payload bytes in both
    directions (uplink + downlink); ``target`` draws a dashed line at that accuracy.
    """
    if not paths:
        raise ValueError("give at least one run folder or results.json to plot")
    if total_bytes:
        fig, (ax_bytes, ax_total, ax_round) = plt.subplots(1, 3, figsize=(17, 4.5))
    else:
        fig, (ax_bytes, ax_round) = plt.subplots(1, 2, figsize=(12, 4.5))
    for path in paths:
        results = load_results(path)
        rows = [r for r in round_metrics(results) if r.get("accuracy") is not None]
        label = run_label(results)
        seeded = f"{label} (seed {results['config']['seed']})"
        with_bytes = [r for r in rows if r["cum_uplink_payload_bytes"] > 0]
        line = ax_bytes.plot(
            [r["cum_uplink_payload_bytes"] for r in with_bytes],
            [r["accuracy"] for r in with_bytes],
            marker="o",
            label=seeded,
        )[0]
        ax_round.plot(
            [r["round"] for r in rows], [r["accuracy"] for r in rows], marker="o", color=line.get_color(), label=seeded
        )
        if total_bytes:
            both = [r for r in rows if r["cum_total_payload_bytes"] > 0]
            ax_total.plot(
                [r["cum_total_payload_bytes"] for r in both],
                [r["accuracy"] for r in both],
                marker="o",
                color=line.get_color(),
            )
    ax_bytes.set_xscale("log")
    ax_bytes.set_xlabel("cumulative uplink payload bytes (all clients, log scale)")
    ax_bytes.set_ylabel("held-out accuracy")
    ax_bytes.set_title("accuracy vs communication")
    if total_bytes:
        ax_total.set_xscale("log")
        ax_total.set_xlabel("cumulative payload bytes, uplink + downlink (log scale)")
        ax_total.set_ylabel("held-out accuracy")
        ax_total.set_title("accuracy vs total communication")
        ax_total.grid(True, alpha=0.3)
    ax_round.set_xlabel("server round (0 = before training)")
    ax_round.set_ylabel("held-out accuracy")
    ax_round.set_title("accuracy vs round")
    for ax in (ax_bytes, ax_round):
        ax.grid(True, alpha=0.3)
    if target is not None:
        for ax in (ax_bytes, ax_round) + ((ax_total,) if total_bytes else ()):
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax_round.text(0, target, f" target {target:g}", va="bottom", fontsize=8, color="grey")
    ax_round.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    log.info("wrote %s", out)
    return out


def target_table(paths: list[str | Path], target: float) -> str:
    """A text table: per run, the round and payload bytes at which accuracy first reached ``target``."""
    from fedpeft.results import bytes_to_target

    lines = [f"accuracy target {target:g}", "run | round | uplink bytes | uplink+downlink bytes"]
    for path in paths:
        results = load_results(path)
        hit = bytes_to_target(results, target)
        label = run_label(results)
        if hit is None:
            best = max((r["accuracy"] for r in round_metrics(results) if r.get("accuracy") is not None), default=None)
            lines.append(f"{label} | not reached (best {best}) | - | -")
        else:
            lines.append(f"{label} | {hit['round']} | {hit['uplink_payload_bytes']:,} | {hit['total_payload_bytes']:,}")
    return "\n".join(lines)
