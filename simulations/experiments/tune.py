"""``fedpeft tune``: a grid on held-out seeds, chosen on the validation split, written with its table.

    fedpeft tune simulations/configs/quickstart_tune.toml --seeds 100-102 \\
        --grid train.lr=1e-4,3e-4,1e-3 --select val_accuracy --by final --out runs/tune/quickstart

The runs are a ``fedpeft sweep`` (same folders ``OUT/<name>/<label>/seed-<s>/``, same
``sweep.json``, same resume: re-running the command skips completed runs), so a tune is
exactly a sweep plus a choice. The choice reads validation only: every run needs
``data.num-val-examples`` > 0, the metric is a ``val_*`` column of ``results.json``, and
seeds 0-4 (the ones the README's tables report) are refused. A candidate's score is the
mean over seeds of its last evaluated round's value (``--by final``) or of each seed's
best evaluated round (``--by best``); the best mean wins (ties: the first in grid order).
A candidate with a seed not completed takes no part in the choice. ``OUT/tune.json`` and
``OUT/tune.md`` hold every candidate's per-seed values and the choice. Test accuracy,
which each run scores once in its last round, is left out of both on purpose.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError
from fedpeft.results import load_results
from simulations.experiments.plan import PlannedRun, parse_grid, parse_seeds, plan_sweep

#: seeds the README's tables report: never used to choose a setting
RESERVED_SEEDS = frozenset(range(5))
#: validation columns of a round row, and whether larger is better
METRICS = {"val_accuracy": True, "val_balanced_accuracy": True, "val_loss": False}
BY = ("final", "best")
TUNE_JSON, TUNE_MD = "tune.json", "tune.md"


def parse_metric(text: str) -> str:
    """``val-accuracy`` or ``val_accuracy`` -> ``val_accuracy``; anything but a validation column is refused."""
    key = text.strip().replace("-", "_")
    if key not in METRICS:
        raise ConfigError(
            f"--select {text!r} is not a validation metric; choose one of {', '.join(METRICS)} "
            "(settings are chosen on validation, never on test)"
        )
    return key


def check_seeds(seeds: list[int]) -> None:
    """Refuse the seeds the README's tables report, naming the fix."""
    used = sorted(RESERVED_SEEDS & set(seeds))
    if used:
        raise ConfigError(
            f"--seeds includes {used}: seeds 0-4 are the ones results are reported on; "
            "tune on held-out seeds, e.g. --seeds 100-102"
        )


def check_validation(plan: list[PlannedRun]) -> None:
    """Every planned run must score a validation split."""
    missing = sorted({r.source for r in plan if r.cfg.data.num_val_examples <= 0})
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: data.num-val-examples is 0, so there is no validation split to choose on; "
            "set it (e.g. --set data.num-val-examples=500)"
        )


def run_value(rounds: list[dict[str, Any]], metric: str, by: str) -> float | None:
    """One run's score: ``metric`` in its last evaluated round (``final``) or its best one (``best``)."""
    if by not in BY:
        raise ConfigError(f"--by {by!r}: choose final or best")
    values = [float(r[metric]) for r in rounds if r.get(metric) is not None]
    if not values:
        return None
    if by == "final":
        return values[-1]
    return max(values) if METRICS[metric] else min(values)


def choose(scores: dict[str, list[float | None]], *, higher_is_better: bool) -> str | None:
    """The label whose mean over seeds is best; candidates with a missing seed are skipped.

    Parameters
    ----------
    scores : dict[str, list[float | None]]
        Per candidate label (in grid order), its per-seed values; None marks a seed not completed.
    higher_is_better : bool
        True for accuracies, False for losses.

    Returns
    -------
    str | None
        The chosen label (the first one on a tie), or None when no candidate has every seed.
    """
    best_label, best_mean = None, None
    for label, values in scores.items():
        if not values or any(v is None for v in values):
            continue
        mean = sum(values) / len(values)
        better = best_mean is None or (mean > best_mean if higher_is_better else mean < best_mean)
        if better:
            best_label, best_mean = label, mean
    return best_label


def summarise(plan: list[PlannedRun], seeds: list[int], metric: str, by: str) -> dict[str, Any]:
    """Every candidate's per-seed values (from the runs' results files) and the choice."""
    candidates: dict[str, dict[str, Any]] = {}
    for run in plan:
        key = f"{run.cfg.name}/{run.label}" if run.label else run.cfg.name
        cand = candidates.setdefault(
            key, {"candidate": key, "config": run.source, "settings": _settings(run.label), "values": {}}
        )
        value = None
        try:
            results = load_results(run.run_dir)
            if results.get("status") == "completed":
                value = run_value(results["rounds"], metric, by)
        except (OSError, ValueError):
            pass
        cand["values"][str(run.seed)] = value
    scores = {k: [c["values"][str(s)] for s in seeds] for k, c in candidates.items()}
    for key, cand in candidates.items():
        done = [v for v in scores[key] if v is not None]
        cand["n"] = len(done)
        cand["mean"] = sum(done) / len(done) if done else None
    chosen = choose(scores, higher_is_better=METRICS[metric])
    return {
        "select": metric,
        "by": by,
        "seeds": seeds,
        "candidates": list(candidates.values()),
        "choice": candidates[chosen] if chosen else None,
    }


def _settings(label: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in label.split(",")) if label else {}


def markdown(summary: dict[str, Any], command: list[str]) -> str:
    """The tune table: one row per candidate, per-seed values, mean; the choice in bold."""
    seeds, metric, by = summary["seeds"], summary["select"], summary["by"]
    chosen = summary["choice"]["candidate"] if summary["choice"] else None
    lines = [
        "# fedpeft tune",
        "",
        f"Chosen on **{metric}** ({'last evaluated round' if by == 'final' else 'best evaluated round'} of each "
        f"run, mean over held-out seeds {', '.join(map(str, seeds))}); validation rows are carved from the "
        "training pool, and test accuracy takes no part (nor is it shown).",
        "",
        "```bash",
        "fedpeft tune " + " ".join(command),
        "```",
        "",
        "| candidate | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | n |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for cand in summary["candidates"]:
        cells = [_fmt(cand["values"][str(s)]) for s in seeds]
        name = f"**{cand['candidate']}** (chosen)" if cand["candidate"] == chosen else cand["candidate"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(cand['mean'])} | {cand['n']} |")
    lines += ["", f"Choice: {chosen}" if chosen else "Choice: none (no candidate completed every seed)", ""]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def write_tune(out: Path, summary: dict[str, Any], command: list[str]) -> None:
    """``out/tune.json`` and ``out/tune.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / TUNE_JSON).write_text(json.dumps({"command": command, **summary}, indent=2))
    (out / TUNE_MD).write_text(markdown(summary, command))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``fedpeft tune`` arguments (the grid, seeds, --set, --jobs, --engine of ``fedpeft sweep``)."""
    tu = sub.add_parser("tune", help="a grid on held-out seeds, chosen on validation; writes tune.json + tune.md")
    tu.add_argument("configs", nargs="+", help="experiment TOML files (with data.num-val-examples > 0)")
    tu.add_argument("--seeds", required=True, help="held-out seeds, e.g. 100-102 (0-4 are refused)")
    tu.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="sweep a config key")
    tu.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="fix a key")
    tu.add_argument("--select", default="val_accuracy", help=f"validation metric: {', '.join(METRICS)}")
    tu.add_argument("--by", choices=BY, default="final", help="each run's last (final) or best evaluated round")
    tu.add_argument("--jobs", type=int, help="runs at once (default: cores / simulation.torch-threads)")
    tu.add_argument("--out", default="runs/tune", help="tune folder (default runs/tune)")
    tu.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess")


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Check everything, run the grid as a sweep (resumable), choose, write; 1 if some run failed."""
    from simulations.experiments.sweep import run_sweep

    metric = parse_metric(args.select)
    seeds = parse_seeds(args.seeds)
    check_seeds(seeds)
    out = Path(args.out)
    plan = plan_sweep(args.configs, seeds, parse_grid(args.grid), args.overrides, out)
    check_validation(plan)
    if args.jobs is None:
        threads = max(r.cfg.simulation.torch_threads for r in plan)
        args.jobs = 1 if args.engine == "flower" else max(1, (os.cpu_count() or 1) // threads)
    command = list(argv or [])[1:] if argv and argv[0] == "tune" else list(argv or [])
    entries = run_sweep(plan, out, jobs=args.jobs, engine=args.engine, command=argv or [])
    summary = summarise(plan, seeds, metric, args.by)
    write_tune(out, summary, command)
    choice = summary["choice"]
    print(markdown(summary, command))
    print(f"wrote {out / TUNE_JSON} and {out / TUNE_MD}" + ("" if choice else "; no candidate completed every seed"))
    return 1 if any(e["status"] == "failed" for e in entries) else 0
