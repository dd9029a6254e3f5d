"""Tiny pinned runs of five shipped configs, and the numbers they give (tests/data/same_numbers.json).

Refactors must not move a byte or a metric: ``tests/test_same_numbers.py`` reruns these and compares
against the stored values (bytes exactly, metrics to 1e-6). Regenerate only on purpose (a change of
defaults or numerics), saying so in the commit::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m tests.same_numbers --update
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
STORED = Path(__file__).resolve().parent / "data" / "same_numbers.json"

# Shrinks applied to every config: few clients, 2 rounds, ~100 train / 64 test snippets, few steps.
SHRINK: dict[str, Any] = {
    "num-rounds": 2,
    "data.num-train-examples": 96,
    "data.num-test-examples": 64,
    "data.max-seq-len": 24,
    "partition.min-partition-size": 8,
    "train.local-steps": 2,
    "train.batch-size": 16,
    "train.eval-every": 1,
    "simulation.node-wait-s": 60.0,
}

# config file -> its own extra shrinks (kept small enough that each run takes seconds)
CASES: dict[str, dict[str, Any]] = {
    "quickstart": {"partition.num-partitions": 4},
    "fedau_bernoulli": {"partition.num-partitions": 4, "participation.p-floor": 0.3},
    "spsa_minilm": {"partition.num-partitions": 3, "spsa.local-steps": 3, "spsa.batch-size": 8},
    "dp_client": {"partition.num-partitions": 6, "participation.fraction": 0.5, "dp.target-epsilon": 50.0},
    "hetlora_zeropad_248": {"partition.num-partitions": 3},
}

# what a round row must reproduce: bytes exactly, the rest within 1e-6
BYTE_KEYS = ("uplink_payload_bytes", "uplink_message_bytes", "downlink_payload_bytes", "downlink_message_bytes")


def case_config(name: str):
    """The shrunk ``ExperimentConfig`` of ``simulations/configs/<name>.toml``."""
    from fedpeft.config import load_config

    overrides = {**SHRINK, **CASES[name]}
    return load_config(ROOT / "simulations" / "configs" / f"{name}.toml", overrides)


def run_case(name: str) -> dict[str, Any]:
    """Run one shrunk config in this process; return its rounds with bytes and metrics."""
    from fedpeft.results import load_results
    from simulations.inprocess import run_in_process

    with tempfile.TemporaryDirectory() as tmp:
        results = load_results(run_in_process(case_config(name), Path(tmp) / name))
    assert results["status"] == "completed", results.get("error")
    return {"trainable_params": results["trainable_params"], "rounds": drop_timings(results["rounds"])}


def drop_timings(value: Any) -> Any:
    """``value`` without its wall-clock and CPU-time entries (keys ending in ``_s`` / ``-s``): they differ run to run."""
    if isinstance(value, dict):
        return {k: drop_timings(v) for k, v in value.items() if not (k.endswith("_s") or k.endswith("-s"))}
    if isinstance(value, list):
        return [drop_timings(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite tests/data/same_numbers.json")
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    values = {name: run_case(name) for name in args.cases}
    text = json.dumps(values, indent=1, sort_keys=True)
    if args.update:
        STORED.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
