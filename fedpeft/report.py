"""``fedpeft report DIR --out REPORT_DIR``: many runs, one table with confidence intervals.

Every ``results.json`` under ``DIR`` is read; runs that differ only in their seed form a
group (:func:`fedpeft.results.experiment_config`). Per group, each metric is given as
the mean over seeds ± the half-width of a 95% Student-t confidence interval
(:mod:`fedpeft.stats`) with the number of seeds ``n``. Runs whose ``status`` is not
``completed`` (failed, or interrupted while running) are listed and left out, so such a
group shows ``n`` below the seeds it planned. Writes ``report.md``, ``report.json`` (the
same numbers, plus each seed's value) and figures drawn from the results files only.

Metrics that only some results files carry (balanced and per-class accuracy, the rare
class) are reported when every completed run of a group has them and omitted otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.results import (
    RESULTS_FILE,
    bytes_to_target,
    experiment_config,
    group_by_experiment,
    group_labels,
    load_results,
    require_metric,
)
from fedpeft.stats import CI_DESCRIPTION, format_ci, mean_ci

log = logging.getLogger(__name__)

#: (key in run_metrics, table column, number format); a column appears when some group has the metric
COLUMNS = (
    ("final_accuracy", "final accuracy", ".4f"),
    ("accuracy_gain", "gain over round 0", "+.4f"),
    ("balanced_accuracy", "balanced accuracy", ".4f"),
    ("rare_class_accuracy", "rare-class accuracy", ".4f"),
    ("rare_class_weight_share", "rare-class weight share", ".4f"),
    ("rare_class_weight_target", "its target", ".4f"),
    ("uplink_payload_bytes", "uplink bytes", ",.0f"),
    ("total_payload_bytes", "total bytes", ",.0f"),
    ("uplink_bytes_to_target", "uplink bytes to target", ",.0f"),
    ("total_bytes_to_target", "total bytes to target", ",.0f"),
    ("wall_s", "wall s", ".1f"),
)


def load_runs(root: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(run folder, results)`` for every results file under ``root``, in path order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass the --out folder of a sweep or a runs/ folder")
    runs = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        try:
            runs.append((path.parent, load_results(path)))
        except (ValueError, json.JSONDecodeError) as err:
            log.warning("skipping %s: %s", path, err)
    if not runs:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {root}")
    return runs


def rare_class(results: dict[str, Any]) -> int | None:
    """The class the run's environment under-serves, if the results file says.

    In order: a recorded ``rare_class``; the class with the lowest expected participation
    share (``class_participation``, or sum_n p_n h_nc / sum_n h_nc from the recorded
    ``participation_probabilities`` and ``label_histograms`` when they are not
    all equal); the minority class of the test set (``test_label_counts``); else ``None``.
    """
    if results.get("rare_class") is not None:
        return int(results["rare_class"])
    share = results.get("class_participation")
    hist = results.get("label_histograms")
    if share is None and hist is not None and results.get("participation_probabilities") is not None:
        h = np.asarray(hist, dtype=np.float64)
        share = (np.asarray(results["participation_probabilities"]) @ h) / np.maximum(h.sum(axis=0), 1.0)
    if share is not None and np.ptp(np.asarray(share, dtype=np.float64)) > 1e-12:
        return int(np.argmin(share))
    counts = results.get("test_label_counts")
    if counts is not None and np.ptp(np.asarray(counts)) > 0:
        return int(np.argmin(counts))
    return None


def class_weight_shares(results: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """Each class's share of the aggregation weight a run gave its clients, and the target share.

    Client ``n``'s weight mass is the sum over rounds of the coefficient its delta got
    (FedAU and the oracle: ``omega_n / N``, recorded per round; FedAvg: ``n_i / sum n`` or
    ``1 / m`` by ``strategy.weighting``); class ``c``'s share is
    ``sum_n M_n h_nc / sum_n M_n`` with ``h_nc`` client ``n``'s fraction of class ``c``. The
    target is the share under full participation with equal client weights,
    ``(1/N) sum_n h_nc``: the objective FedAU estimates (Wang & Ji, 2024). ``None`` when the
    run has no label histograms or aggregated nothing.
    """
    hist = results.get("label_histograms")
    if not hist:
        return None
    h = np.asarray(hist, dtype=np.float64)
    frac = h / np.maximum(h.sum(axis=1, keepdims=True), 1.0)
    config = results.get("config", {})
    by_examples = config.get("strategy.name") == "fedavg" and config.get("strategy.weighting") == "examples"
    mass = np.zeros(len(h))
    for row in results["rounds"]:
        ids = [int(p) for p in row.get("aggregated") or []]
        if not ids:
            continue
        if row.get("omega"):
            coeff = {i: float(row["omega"][str(i)]) / len(h) for i in ids}
        elif by_examples:
            examples = {int(c["partition_id"]): float(c.get("num-examples", 0)) for c in row.get("clients", [])}
            total = sum(examples.get(i, 0.0) for i in ids)
            coeff = {i: examples.get(i, 0.0) / total if total > 0 else 1.0 / len(ids) for i in ids}
        else:
            coeff = {i: 1.0 / len(ids) for i in ids}
        for i, c in coeff.items():
            mass[i] += c
    if mass.sum() <= 0:
        return None
    return mass @ frac / mass.sum(), frac.mean(axis=0)


def run_metrics(results: dict[str, Any], target: float | None = None) -> dict[str, Any]:
    """One completed run's numbers: final scores of its last evaluated round, bytes, time, target."""
    evaluated = [r for r in results["rounds"] if r.get("accuracy") is not None]
    last = evaluated[-1] if evaluated else {}
    out: dict[str, Any] = {
        "final_accuracy": last.get("accuracy"),
        # what training added to the starting model (a zero-shot head starts well above the prior)
        "accuracy_gain": (
            last["accuracy"] - evaluated[0]["accuracy"]
            if len(evaluated) > 1 and evaluated[0].get("round") == 0
            else None
        ),
        "balanced_accuracy": last.get("balanced_accuracy"),
        "per_class_accuracy": last.get("per_class_accuracy"),
        "uplink_payload_bytes": sum(r.get("uplink_payload_bytes", 0) for r in results["rounds"]),
        "total_payload_bytes": sum(
            r.get("uplink_payload_bytes", 0) + r.get("downlink_payload_bytes", 0) for r in results["rounds"]
        ),
        "wall_s": results.get("wall_s"),
        "rare_class": rare_class(results),
        "rare_class_accuracy": None,
    }
    if out["rare_class"] is not None and out["per_class_accuracy"] is not None:
        out["rare_class_accuracy"] = out["per_class_accuracy"][out["rare_class"]]
    shares = class_weight_shares(results) if out["rare_class"] is not None else None
    out["rare_class_weight_share"] = float(shares[0][out["rare_class"]]) if shares else None
    out["rare_class_weight_target"] = float(shares[1][out["rare_class"]]) if shares else None
    if target is not None:
        hit = bytes_to_target(results, target)
        out["uplink_bytes_to_target"] = hit["uplink_payload_bytes"] if hit else None
        out["total_bytes_to_target"] = hit["total_payload_bytes"] if hit else None
        out["round_to_target"] = hit["round"] if hit else None
    return out


def summarize(runs: list[tuple[Path, dict[str, Any]]], target: float | None = None, level: float = 0.95) -> dict:
    """Group the runs and compute every group's means and CI half-widths (the report.json content)."""
    groups_idx = group_by_experiment([res for _, res in runs])
    configs = [experiment_config(runs[idx[0]][1]["config"]) for idx in groups_idx]
    groups = []
    for idx, config, label in zip(groups_idx, configs, group_labels(configs), strict=True):
        done = [runs[i] for i in idx if runs[i][1].get("status") == "completed"]
        not_done = [runs[i] for i in idx if runs[i][1].get("status") != "completed"]
        per_run = [run_metrics(res, target) for _, res in done]
        metrics = {}
        for key, _, _ in COLUMNS:
            values = [m.get(key) for m in per_run]
            # bytes-to-target averages the seeds that reached it; the others need every seed
            wanted = target is not None if key.endswith("_to_target") else all(v is not None for v in values)
            if per_run and wanted:
                mean, half, n = mean_ci(values, level)
                metrics[key] = {"mean": mean, "half_width": half, "n": n, "values": values}
        per_class = [m["per_class_accuracy"] for m in per_run]
        if per_run and all(p is not None for p in per_class) and len({len(p) for p in per_class}) == 1:
            metrics["per_class_accuracy"] = [
                dict(zip(("mean", "half_width", "n"), mean_ci(col, level), strict=True))
                for col in zip(*per_class, strict=True)
            ]
        rare = [m["rare_class"] for m in per_run if m["rare_class"] is not None]
        groups.append(
            {
                "label": label,
                "config": config,
                "seeds": [res["config"].get("seed") for _, res in done],
                "n": len(done),
                "planned": len(idx),
                "runs": [str(p) for p, _ in done],
                "not_completed": [
                    {"path": str(p), "seed": res["config"].get("seed"), "status": res.get("status"), **_error(res)}
                    for p, res in not_done
                ],
                "rare_class": Counter(rare).most_common(1)[0][0] if rare else None,
                "metrics": metrics,
            }
        )
    return {"ci": CI_DESCRIPTION.replace("95%", f"{level:.0%}"), "level": level, "target": target, "groups": groups}


#: metrics compared seed by seed against a baseline group (``--baseline``)
PAIRED = (
    ("final_accuracy", "final accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("rare_class_accuracy", "rare-class accuracy"),
)


def parse_baseline(items: list[str] | None) -> dict[str, str]:
    """``["strategy.name=fedavg", ...]`` -> ``{key: value}``; a malformed item names the fix."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--baseline {item!r}: expected KEY=VALUE, e.g. --baseline strategy.name=fedavg")
        out[key.strip()] = value.strip()
    return out


def paired_differences(summary: dict, baseline: dict[str, str], level: float = 0.95) -> list[dict]:
    """Each group minus its baseline, seed by seed: mean difference ± t-interval over the shared seeds.

    A group's baseline is the group whose config equals its own with the ``baseline`` keys set
    to their values (``strategy.name=fedavg`` pairs every FedAU group with the FedAvg group of
    the same participation model). Runs with the same seed share partitions, participation
    draws and initial adapter, so the paired difference cancels the seed's own luck and its
    interval is what decides "A beats B" (a paired t-test at ``1 - level``). Groups that are
    a baseline themselves, or have none in the folder, are skipped.
    """
    if not baseline:
        return []
    groups = summary["groups"]

    def matches(cand: dict, config: dict) -> bool:
        # a key only one of them has belongs to a mode the other does not run (dp.clip-norm without DP)
        keys = set(cand) & set(config) | set(baseline)
        for k in keys:
            if k in baseline:
                if str(cand.get(k)) != baseline[k]:
                    return False
            elif json.dumps(cand.get(k), default=str) != json.dumps(config.get(k), default=str):
                return False
        return True

    unknown = [k for k in baseline if not any(k in g["config"] for g in groups)]
    if unknown:
        raise ValueError(f"--baseline: no run has the key(s) {unknown}; use keys of the runs' configs (results.json)")
    rows = []
    for g in groups:
        if all(str(g["config"].get(k)) == v for k, v in baseline.items()):
            continue
        base = next((h for h in groups if h is not g and matches(h["config"], g["config"])), None)
        if base is None:
            continue
        row = {"label": g["label"], "baseline": base["label"], "metrics": {}}
        for key, _ in PAIRED:
            mine, theirs = g["metrics"].get(key), base["metrics"].get(key)
            if not mine or not theirs:
                continue
            a = dict(zip(g["seeds"], mine["values"], strict=True))
            b = dict(zip(base["seeds"], theirs["values"], strict=True))
            shared = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
            diffs = [a[s] - b[s] for s in shared]
            mean, half, n = mean_ci(diffs, level)
            row["metrics"][key] = {"mean": mean, "half_width": half, "n": n, "seeds": shared, "values": diffs}
        rows.append(row)
    return rows


def render_paired(rows: list[dict], level: float) -> str:
    """The paired-differences section of report.md ('' when there is none)."""
    if not rows:
        return ""
    lines = [
        "",
        "## Paired differences against the baseline",
        "",
        f"Each cell: mean over shared seeds of (group - baseline) ± {level:.0%} Student-t half-width (n = pairs); "
        "an interval that excludes 0 is marked *.",
        "",
        "| group | baseline | " + " | ".join(f"Δ {title}" for _, title in PAIRED) + " |",
        "|" + " --- |" * (len(PAIRED) + 2),
    ]
    for row in rows:
        cells = []
        for key, _ in PAIRED:
            m = row["metrics"].get(key)
            if not m:
                cells.append("-")
                continue
            cell = format_ci(m["mean"], m["half_width"], m["n"], ".4f") + f" (n={m['n']})"
            cell = ("+" if m["mean"] >= 0 else "") + cell
            if m["n"] > 1 and not math.isnan(m["half_width"]) and abs(m["mean"]) > m["half_width"]:
                cell += " *"
            cells.append(cell)
        lines.append(f"| {row['label']} | {row['baseline']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _error(results: dict[str, Any]) -> dict[str, str]:
    return {"error": results["error"]} if results.get("error") else {}


def render_markdown(summary: dict) -> str:
    """The report's Markdown: the main table, per-class accuracy, and the runs left out."""
    groups = summary["groups"]
    lines = [
        "# fedpeft report",
        "",
        f"Each cell: {summary['ci']} (two-sided, t with n-1 degrees of freedom); n = completed seeds.",
    ]
    if summary["target"] is not None:
        lines.append(
            f"Bytes to target: cumulative payload bytes until held-out accuracy first reached {summary['target']:g}, "
            "over the seeds that reached it (reached/n in brackets)."
        )
    cols = [c for c in COLUMNS if any(c[0] in g["metrics"] for g in groups)]
    lines += ["", "| group | n | " + " | ".join(title for _, title, _ in cols) + " |"]
    lines.append("|" + " --- |" * (len(cols) + 2))
    for g in groups:
        n = f"{g['n']}" if g["n"] == g["planned"] else f"{g['n']} of {g['planned']} (n < seeds)"
        cells = []
        for key, _, spec in cols:
            m = g["metrics"].get(key)
            cell = format_ci(m["mean"], m["half_width"], m["n"], spec) if m else "-"
            if m and key.endswith("_to_target") and m["n"] < g["n"]:
                cell += f" ({m['n']}/{g['n']} reached)"
            if m and key == "rare_class_accuracy" and g["rare_class"] is not None:
                cell += f" (class {g['rare_class']})"
            cells.append(cell)
        lines.append(f"| {g['label']} | {n} | " + " | ".join(cells) + " |")
    with_classes = [g for g in groups if "per_class_accuracy" in g["metrics"]]
    if with_classes:
        k = max(len(g["metrics"]["per_class_accuracy"]) for g in with_classes)
        lines += ["", "## Per-class accuracy", "", "| group | " + " | ".join(f"class {c}" for c in range(k)) + " |"]
        lines.append("|" + " --- |" * (k + 1))
        for g in with_classes:
            cells = [format_ci(s["mean"], s["half_width"], s["n"]) for s in g["metrics"]["per_class_accuracy"]]
            lines.append(f"| {g['label']} | " + " | ".join(cells) + " |")
    left_out = [(g["label"], r) for g in groups for r in g["not_completed"]]
    if left_out:
        lines += ["", "## Runs left out (not completed)", ""]
        for label, r in left_out:
            error = f": {r['error']}" if r.get("error") else ""
            lines.append(f"- {label}, seed {r['seed']}: {r['status']} ({r['path']}){error}")
    return "\n".join(lines) + "\n"


def write_report(
    root: str | Path,
    out: str | Path,
    target: float | None = None,
    level: float = 0.95,
    baseline: dict[str, str] | None = None,
) -> dict:
    """Write ``report.md``, ``report.json`` and the figures for the runs under ``root``; return the summary.

    ``baseline`` (``{key: value}``): add each group's paired differences against the group
    that has these values and is otherwise identical (:func:`paired_differences`).
    """
    from fedpeft.plot import plot_groups

    runs = load_runs(root)
    completed = [(p, res) for p, res in runs if res.get("status") == "completed"]
    if not completed and not any(res.get("status") == "failed" for _, res in runs):  # failures are worth a report
        states = sorted({str(res.get("status")) for _, res in runs})
        raise ValueError(
            f"none of the {len(runs)} runs under {root} has finished (status: {', '.join(states)}); "
            "finish them first (rerun the sweep command, or fedpeft simulate --resume RUN_DIR)"
        )
    for path, res in completed:
        require_metric(res, path / RESULTS_FILE)
    summary = summarize(runs, target, level)
    summary["paired"] = paired_differences(summary, baseline or {}, level)
    summary["baseline"] = baseline or {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_path = {str(p): res for p, res in runs}
    plotted = [(g["label"], [by_path[p] for p in g["runs"]]) for g in summary["groups"] if g["runs"]]
    figures = []
    if plotted:
        for metric in ("accuracy", "balanced_accuracy"):
            if all(any(r.get(metric) is not None for r in res["rounds"]) for _, rs in plotted for res in rs):
                fig = plot_groups(plotted, out / f"{metric}.png", metric=metric, target=target, level=level)
                figures.append(fig.name)
    summary["figures"] = figures
    markdown = render_markdown(summary) + render_paired(summary["paired"], level)
    (out / "report.md").write_text(markdown + "".join(f"\n![{f}]({f})\n" for f in figures))
    (out / "report.json").write_text(json.dumps(_finite(summary), indent=2))
    return summary


def _finite(obj: Any) -> Any:
    """NaN (no CI for one seed) as JSON null, so report.json stays strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``fedpeft report`` arguments."""
    rep = sub.add_parser("report", help="mean and 95%% CI over seeds for every group of runs under a folder")
    rep.add_argument("dir", help="folder holding run folders (a sweep's --out, or runs/)")
    rep.add_argument("--out", required=True, help="folder for report.md, report.json and the figures")
    rep.add_argument("--target", type=float, help="accuracy target for the bytes-to-target columns")
    rep.add_argument(
        "--baseline",
        action="append",
        metavar="KEY=VALUE",
        help="pair every group with the otherwise identical group that has KEY=VALUE (repeatable), "
        "seed by seed: mean difference and its CI",
    )
