"""List the project modules one default round actually executes, in first-call order.

Runs the tiny default experiment (tests/helpers.py's ``tiny_config`` with one round, in-process:
the same ServerApp and ClientApp code as ``fedpeft simulate``) under a ``sys.setprofile`` hook and
records, for every call into a file of ``fedpeft/``, ``strategies/`` or ``simulations/``, the module
it belongs to and its line count. The list docs/architecture.md gives is this script's output::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python docs/trace_round.py
    ... --all   # also the modules that only run while loading (imports, the handshake)

By default it counts the modules called after the model is loaded and warm, during round 1 (from
the first train message to the round's recorded row): what a reader follows to see one round.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedpeft", "strategies", "simulations")


def module_of(filename: str) -> str | None:
    """The project module a code object's file belongs to, or None outside the project."""
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[0] not in PACKAGES or rel.suffix != ".py":
        return None
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def trace_round(all_calls: bool = False) -> list[tuple[str, int]]:
    """``(module, lines)`` in first-call order for one in-process round of the tiny default config."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from fedpeft.tasks import load_task
    from simulations.inprocess import run_in_process
    from tests.helpers import tiny_config

    torch.set_num_threads(1)
    cfg = tiny_config(**{"num-rounds": 1})
    load_task(cfg)  # warm: the model build is the same in every round and is not part of a round's walk
    seen: dict[str, None] = {}
    recording = {"on": all_calls}

    def hook(frame, event, arg):  # noqa: ARG001 (sys.setprofile's signature)
        if event != "call":
            return
        name = module_of(frame.f_code.co_filename)
        if name is None:
            return
        if not recording["on"] and frame.f_code.co_name in ("configure_train", "configure_fit"):
            recording["on"] = True  # round 1 starts when the strategy configures its train messages
        if recording["on"] and name not in seen:
            seen[name] = None

    sys.setprofile(hook)
    threading.setprofile(hook)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_in_process(cfg, Path(tmp) / "trace")
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    lines = {}
    for name in seen:
        path = ROOT / Path(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        lines[name] = len(path.read_text().splitlines())
    return [(name, lines[name]) for name in seen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="count from the start of the run, not from round 1")
    args = parser.parse_args(argv)
    rows = trace_round(all_calls=args.all)
    for i, (name, n) in enumerate(rows, 1):
        sys.stdout.write(f"{i:3d}  {name:40s} {n:5d} lines\n")
    sys.stdout.write(f"{len(rows)} modules, {sum(n for _, n in rows)} lines\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
