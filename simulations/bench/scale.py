"""(e) Scale: 1,000 simulated clients with 10 online per round vs 100 with 10 online, on Flower's engine.

    python -m simulations.bench.scale [--clients 100,1000] [--online 10] [--rounds 5]
        [--set KEY=VALUE ...] [--out docs/results/bench/scale.json]

Issue #13's claim to check: clients that are not online cost nothing but their partition
indices, so a round's wall time and the run's memory at 1,000 clients stay within 1.2x of
100 clients when both train 10 a round. Each population is one ``fedpeft simulate`` process
(simulations/bench/cohort_engine.py's ``run_variant``: the process tree's peak PSS sampled
every 0.5 s). The work per round is held equal: every client holds the same number of
snippets (``--per-client``, so the pool grows with the population), trains ``--steps``
steps of one batch, and the server scores the same test set once, at the end. Start-up
(Ray, then one partition query per node, which does grow with the population) is reported
apart from the rounds. Only ratios from one run mean much on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from datetime import UTC, datetime
from pathlib import Path

from fedpeft.config import load_config, parse_override
from simulations.bench.cohort_engine import run_variant

OUT = Path("docs/results/bench/scale.json")
#: the issue's bound on the larger population's round time and memory, as a ratio to the smaller's
BOUND = 1.2


def population_overrides(clients: int, online: int, per_client: int, steps: int, rounds: int) -> dict:
    """``--set`` keys of one population: ``clients`` partitions of ``per_client`` snippets, ``online`` a round."""
    if not 1 <= online <= clients:
        raise ValueError(f"online={online} must be in 1..clients={clients}")
    return {
        "num-rounds": rounds,
        "partition.num-partitions": clients,
        "partition.scheme": "iid",
        "data.num-train-examples": clients * per_client,
        "participation.model": "uniform",
        "participation.fraction": online / clients,
        "train.local-steps": steps,
        "train.batch-size": per_client,
        "train.eval-every": rounds,
    }


def compare(rows: dict[int, dict]) -> dict:
    """Each population's median round wall and peak PSS as a ratio to the smallest population's."""
    base = rows[min(rows)]
    return {
        str(n): {
            "median_round_ratio": row["median_round_s"] / base["median_round_s"],
            "peak_pss_ratio": row["peak_pss_gib"] / base["peak_pss_gib"],
            "within_bound": row["median_round_s"] <= BOUND * base["median_round_s"]
            and row["peak_pss_gib"] <= BOUND * base["peak_pss_gib"],
        }
        for n, row in rows.items()
    }


def bench_scale(
    config: str,
    extra: dict,
    populations: list[int],
    online: int,
    per_client: int,
    steps: int,
    rounds: int,
    run_root: Path,
) -> dict:
    """Every population of ``config`` on Flower's engine, one after another; the report."""
    cores = len(os.sched_getaffinity(0))
    for n in populations:  # a bad key or value fails here, before any run
        load_config(config, {**extra, **population_overrides(n, online, per_client, steps, rounds)})
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "overrides": extra,
        "online_per_round": online,
        "snippets_per_client": per_client,
        "steps_per_client_round": steps,
        "cores": cores,
        "load_avg_at_start": os.getloadavg(),
        "bound": BOUND,
        "populations": {},
    }
    rows = {}
    for n in populations:
        sets = {**extra, **population_overrides(n, online, per_client, steps, rounds)}
        row = run_variant(config, sets, run_root / f"clients-{n}", cores)
        row["median_round_s"] = statistics.median(row["round_s"])
        row.pop("pss_samples", None)
        rows[n] = row
    report["populations"] = {str(n): row for n, row in rows.items()}
    report["ratios"] = compare(rows)
    return report


def format_table(report: dict) -> str:
    """Populations side by side."""
    names = list(report["populations"])
    first = names[0]
    lines = [
        f"(e) scale on Flower's engine, {report['online_per_round']} clients online a round, "
        f"{report['steps_per_client_round']} step(s) of {report['snippets_per_client']} snippets each, "
        f"{report['cores']} cores, load {report['load_avg_at_start'][0]:.2f}"
    ]
    lines.append(f"    {'':28s}" + "".join(f"{n + ' clients':>22s}" for n in names))
    for key, label, fmt in (
        ("median_round_s", "median round wall (s)", "{:.2f}"),
        ("startup_teardown_s", "start-up + teardown (s)", "{:.1f}"),
        ("wall_total_s", "wall total (s)", "{:.1f}"),
        ("peak_pss_gib", "peak PSS, tree (GiB)", "{:.2f}"),
    ):
        cells = []
        for n in names:
            value, base = report["populations"][n][key], report["populations"][first][key]
            text = fmt.format(value) + ("" if n == first else f" (x{value / base:.2f})")
            cells.append(f"{text:>22s}")
        lines.append(f"    {label:28s}" + "".join(cells))
    lines.append(f"    bound: round wall and peak PSS within x{report['bound']} of {first} clients")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/configs/quickstart.toml", help="experiment TOML")
    parser.add_argument("--clients", default="100,1000", help="populations, comma-separated (default 100,1000)")
    parser.add_argument("--online", type=int, default=10, help="clients online a round (default 10)")
    parser.add_argument("--per-client", type=int, default=8, help="snippets per client = batch size (default 8)")
    parser.add_argument("--steps", type=int, default=1, help="local steps per client-round (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", default=str(OUT), help=f"JSON to write (default {OUT})")
    args = parser.parse_args()
    try:
        populations = sorted({int(x) for x in args.clients.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--clients {args.clients!r}: give whole numbers, comma-separated, e.g. 100,1000")
    if len(populations) < 2:
        parser.error(f"--clients {args.clients!r}: give at least two populations to compare")
    extra = dict(parse_override(text) for text in args.set)
    report = bench_scale(
        args.config,
        extra,
        populations,
        args.online,
        args.per_client,
        args.steps,
        args.rounds,
        Path("runs/bench/scale"),
    )
    print(format_table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
