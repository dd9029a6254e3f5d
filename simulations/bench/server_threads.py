"""The server's evaluation threads under Flower's engine: ``simulation.server-threads`` 1 vs 0 (every core).

    python -m simulations.bench.server_threads      # two quickstart runs, ~8 min on an idle 2-core CPU

Each run is its own ``fedpeft simulate`` process (simulations/bench/cohort_engine.py's
``run_variant``), one after the other; prints wall, round walls, final accuracy and the
ratios, and writes docs/results/bench/server_threads.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from simulations.bench.cohort_engine import run_variant

OUT = Path("docs/results/bench/server_threads.json")
VARIANTS = (("server-threads=1", {"simulation.server-threads": 1}), ("server-threads=0 (every core)", {}))


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    out: dict = {"load_avg_at_start": os.getloadavg()}
    for name, sets in VARIANTS:
        run_dir = Path("runs/bench/server_threads") / name.split(" ")[0]
        row = run_variant("simulations/configs/quickstart.toml", sets, run_dir, cores)
        row.pop("pss_samples", None)
        out[name] = row
        print(name, round(row["wall_total_s"], 1), round(row["rounds_s"], 1), row["accuracy"], flush=True)
    one, every = (out[name] for name, _ in VARIANTS)
    out["ratio_wall"] = every["wall_total_s"] / one["wall_total_s"]
    out["ratio_rounds"] = every["rounds_s"] / one["rounds_s"]
    print("ratio wall", round(out["ratio_wall"], 3), "ratio rounds", round(out["ratio_rounds"], 3))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
