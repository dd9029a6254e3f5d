"""``fedpeft deploy memory CONFIG``: what one client needs, each variant measured in a fresh process.

A model cached in the measuring process, or one loaded before it, would mix into the peak
resident set, so every (quantization, compute dtype) combination runs in its own child,
``python -m simulations.deploy.memory_probe`` with the flat config as JSON on stdin. The
child loads the client model, trains one local round on partition 0 and prints one JSON
row: the frozen backbone, adapter and gradient + optimizer bytes (fedpeft/memory.py), its
peak RSS, on CUDA torch's peak allocated bytes, and the seconds per step.

    fedpeft deploy memory CONFIG                       # the config's own quantization and dtype
    fedpeft deploy memory CONFIG --quantization nf4,int8,none --compute-dtype float32,bfloat16 --out m.json

Combinations this machine cannot run are rows with a ``skipped`` reason, logged: nf4 / int8
without bitsandbytes, ``model.device=cuda`` without CUDA, and on the CPU a 16-bit compute
dtype that falls back to float32 (skipped when the float32 row is measured anyway, else run
and marked).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.config import ExperimentConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ROW_PREFIX = "memory-probe-row "  # the child's result line on stdout (libraries may print too)
HALF_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class Combination:
    """One variant to measure: ``skip`` says why it is not run, ``note`` what to know about it."""

    quantization: str
    compute_dtype: str
    skip: str | None = None
    note: str | None = None


def plan_combinations(
    cfg: ExperimentConfig,
    quantizations: list[str],
    compute_dtypes: list[str],
    *,
    cuda_available: bool,
    bitsandbytes_available: bool,
    cuda_bf16: bool = True,
) -> list[Combination]:
    """The cross product of ``quantizations`` x ``compute_dtypes`` (empty: the config's own), each checked.

    Pure: what the machine has (CUDA, bitsandbytes, native bf16 on the GPU) comes in as arguments.
    """
    quants = quantizations or [cfg.model.quantization]
    dtypes = compute_dtypes or [cfg.model.compute_dtype]
    on_cuda = cfg.model.device == "cuda" or (cfg.model.device == "auto" and cuda_available)
    plan = []
    for q in quants:
        for d in dtypes:
            skip = note = None
            if cfg.model.device == "cuda" and not cuda_available:
                skip = "model.device='cuda' but CUDA is not available here (use model.device=auto or cpu)"
            elif q != "none" and not bitsandbytes_available:
                skip = f"quantization={q} needs bitsandbytes (pip install bitsandbytes)"
            elif d == "bfloat16" and on_cuda and not cuda_bf16:
                skip = "compute dtype bfloat16 but this GPU has no native bf16 (use float16 or float32)"
            elif d in HALF_DTYPES and not on_cuda:
                if "float32" in dtypes:
                    skip = f"compute dtype {d} falls back to float32 on the CPU: the same as the float32 row"
                else:
                    note = f"compute dtype {d} falls back to float32 on the CPU"
            plan.append(Combination(q, d, skip, note))
    return plan


def probe_config(cfg: ExperimentConfig, combo: Combination) -> ExperimentConfig:
    """``cfg`` with the combination's quantization and compute dtype."""
    return cfg.replace({"model.quantization": combo.quantization, "model.compute-dtype": combo.compute_dtype})


def measure_in_child(cfg: ExperimentConfig, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run :func:`measure_here` for ``cfg`` in a fresh Python process; its row, or ``error``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.deploy.memory_probe"],
        input=json.dumps(cfg.to_flat()),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    rows = [line.removeprefix(ROW_PREFIX) for line in proc.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if proc.returncode != 0 or not rows:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": f"probe exited with {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(rows[-1])


def measure_here(cfg: ExperimentConfig) -> dict[str, Any]:
    """In this process: load the client model, train one local round on partition 0, measure."""
    import torch

    from fedpeft.memory import measure_client_memory
    from fedpeft.task import set_threads
    from fedpeft.tasks import load_task

    set_threads(cfg.simulation.torch_threads)
    task = load_task(cfg)
    device = next(task.model.parameters()).device
    load_peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    _, result = task.local_update(dict(task.initial_state), 0, 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    round_s = time.perf_counter() - t0
    memory = measure_client_memory(task.model, cfg.train.optimizer)
    return {
        "pid": os.getpid(),
        **memory.as_dict(),
        # local_update resets CUDA's peak at the round's start; the load's own peak is kept here
        "peak_cuda_bytes": max(load_peak, memory.peak_cuda_bytes),
        "effective_compute_dtype": str(task.model.fedpeft_compute_dtype).removeprefix("torch."),
        "linear_weight_bytes": task.weight_bytes.weight_bytes,
        "num_steps": result.num_steps,
        "round_s": round_s,
        "s_per_step": round_s / result.num_steps,  # the first step (lazy inits, kernel choice) included
    }


def probe_memory(
    cfg: ExperimentConfig, quantizations: list[str], compute_dtypes: list[str], out: str | Path | None = None
) -> list[dict[str, Any]]:
    """Measure every planned combination in its own process; print the table, write JSON to ``out``."""
    import torch

    cuda = torch.cuda.is_available()
    plan = plan_combinations(
        cfg,
        quantizations,
        compute_dtypes,
        cuda_available=cuda,
        bitsandbytes_available=importlib.util.find_spec("bitsandbytes") is not None,
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(including_emulation=False),
    )
    rows = []
    for combo in plan:
        row: dict[str, Any] = {"quantization": combo.quantization, "compute_dtype": combo.compute_dtype}
        if combo.skip:
            log.warning(
                "skipped quantization=%s compute-dtype=%s: %s", combo.quantization, combo.compute_dtype, combo.skip
            )
            rows.append({**row, "skipped": combo.skip})
            continue
        if combo.note:
            log.warning("quantization=%s: %s", combo.quantization, combo.note)
            row["note"] = combo.note
        log.info(
            "measuring quantization=%s compute-dtype=%s in a fresh process", combo.quantization, combo.compute_dtype
        )
        row.update(measure_in_child(probe_config(cfg, combo)))
        rows.append(row)
    print(format_table(rows))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"config": cfg.to_flat(), "rows": rows}, indent=2))
        print(f"wrote {out}")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per row, sizes in MB (a skipped or failed row says why)."""
    head = ["quant", "compute", "device", "backbone", "adapter", "grad+opt", "peak RSS", "peak CUDA", "s/step"]
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    for r in rows:
        first = [r["quantization"], r["compute_dtype"]]
        if "device" not in r:
            lines.append(" | ".join([*first, f"skipped: {r['skipped']}" if "skipped" in r else r.get("error", "")]))
            continue
        if r["effective_compute_dtype"] != r["compute_dtype"]:
            first[1] += f" ({r['effective_compute_dtype']})"
        cuda = mb(r["peak_cuda_bytes"]) if r["device"].startswith("cuda") else "-"
        sizes = [mb(r[k]) for k in ("backbone_bytes", "adapter_bytes", "training_state_bytes", "peak_rss_bytes")]
        lines.append(" | ".join([*first, r["device"], *sizes, cuda, f"{r['s_per_step']:.3f}"]))
    return "\n".join(lines)


def main() -> int:
    """The child: a flat config as JSON on stdin -> one ``ROW_PREFIX`` JSON line on stdout."""
    from simulations.quiet import quiet_libraries

    quiet_libraries()
    cfg = ExperimentConfig.from_flat(json.loads(sys.stdin.read()))
    print(ROW_PREFIX + json.dumps(measure_here(cfg)), flush=True)
    return 0


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
