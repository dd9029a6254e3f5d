"""Ladder Side-Tuning benchmark: a client's training memory and its CPU time per round, LST vs LoRA.

    python -m simulations.bench.lst [--batch 32] [--seq 64] [--steps 3] [--out docs/results/lst/bench.md]

Memory: for each method, a fresh Python process loads the model (NF4 MiniLM), builds the
batches, then records its resident set (the loaded-model baseline), resets the kernel's peak
counter (``/proc/self/clear_refs``), runs ``--steps`` AdamW steps at ``--batch`` x ``--seq``
tokens and reports the peak resident set above the baseline (and torch's CUDA peak above its
baseline where a GPU is used). Methods: LST computing its ladder inputs through the backbone
(a client's first round), LST reading them from a store already in memory (later rounds; the
store's own bytes are reported beside it), LoRA r=8 on query/key/value/dense, the same LoRA
with gradient checkpointing (transformers', non-reentrant), and full fine-tuning (which
cannot train 4-bit weights, so it runs on the fp32 backbone, as ``peft.method = "full"`` must).

CPU time: ``train-cpu-s`` (process CPU seconds of ``Task.local_update``, what the ClientApp
reports) of one client with 200 snippets (peft_lora.toml's client: 8 AdamW steps of 16 x 32
tokens) in rounds 2-4, after a first round that, for LST, fills the client's store.

The machine is shared: the load average is printed with the results; compare ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "lst-recompute": {"peft.method": "lst"},
    "lst-stored": {"peft.method": "lst"},
    "lora": {"peft.method": "lora"},
    "lora-checkpointing": {"peft.method": "lora"},
    "full-fp32": {"peft.method": "full", "model.quantization": "none"},
}
CPU_METHODS = ("lst", "lora")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _config(overrides: dict, out_dir: str, **flat):
    from fedpeft.config import ExperimentConfig

    base = {
        "model.pooling": "mean",
        "partition.num-partitions": 1,
        "partition.scheme": "iid",
        "partition.min-partition-size": 1,
        "participation.model": "always",
        "out-dir": out_dir,
        **flat,
        **overrides,
    }
    return ExperimentConfig.from_flat(base)


def child_memory(method: str, batch: int, seq: int, steps: int) -> dict:
    """Peak training memory above the loaded-model baseline, in this (fresh) process."""
    import torch

    from fedpeft.task import set_threads
    from fedpeft.tasks import load_task
    from fedpeft.train import batch_loss, build_optimizer

    set_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(
            METHODS[method],
            tmp,
            **{"data.num-train-examples": 64, "data.num-test-examples": 32, "data.max-seq-len": seq},
            **{"train.batch-size": batch},
        )
        task = load_task(cfg)
        model = task.model
        gen = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(steps):  # synthetic full-length rows: memory depends on the shape, not the words
            ids = torch.randint(1000, 30000, (batch, seq), generator=gen)
            ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
            batches.append(
                {
                    "input_ids": ids,
                    "attention_mask": torch.ones_like(ids),
                    "token_type_ids": torch.zeros_like(ids),
                    "labels": torch.randint(0, 2, (batch,), generator=gen),
                }
            )
        logits_fn, store_bytes = None, 0
        if method.startswith("lst"):
            from fedpeft.lst_store import ActivationStore

            store = ActivationStore(max_bytes=2**40)
            logits_fn = store.logits_fn(model)
            if method == "lst-stored":
                with torch.no_grad():
                    for b in batches:
                        logits_fn(b)
                store_bytes = store.nbytes
            else:
                store.max_bytes = 0  # every step recomputes (a first round)
        if method == "lora-checkpointing":
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        device = next(model.parameters()).device
        cuda = device.type == "cuda"
        gc.collect()
        baseline_kb = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current RSS
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            cuda_base = torch.cuda.memory_allocated(device)
        optimizer = build_optimizer(model, cfg.train)
        model.train()
        t0 = time.process_time()
        for b in batches:
            optimizer.zero_grad(set_to_none=True)
            batch_loss(model, b, logits_fn).backward()
            optimizer.step()
        cpu_s = (time.process_time() - t0) / steps
        peak_kb = _rss_kb("VmHWM")
        out = {
            "method": method,
            "peak_above_baseline_mb": (peak_kb - baseline_kb) / 1024,
            "baseline_mb": baseline_kb / 1024,
            "store_mb": store_bytes / 2**20,
            "cpu_s_per_step": cpu_s,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        if cuda:
            out["cuda_peak_above_baseline_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_base) / 2**20
        return out


def child_cpu(method: str, rounds: int) -> dict:
    """``train-cpu-s`` of one 200-snippet client in rounds 2..``rounds`` (round 1 fills LST's store)."""
    from fedpeft.task import set_threads
    from fedpeft.tasks import load_task

    set_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(
            METHODS["lst-stored" if method == "lst" else "lora"],
            tmp,
            **{"data.num-train-examples": 200, "data.num-test-examples": 32, "data.max-seq-len": 32},
            **{"train.local-steps": 8, "train.batch-size": 16, "train.lr": 3e-4},
        )
        task = load_task(cfg)
        state = task.initial_state
        cpu = []
        for r in range(1, rounds + 1):
            t0 = time.process_time()
            task.local_update(state, 0, r)
            cpu.append(time.process_time() - t0)
        return {"method": method, "first_round_cpu_s": cpu[0], "later_rounds_cpu_s": cpu[1:]}


def _run_child(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.bench.lst", *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_report(memory: list[dict], cpu: list[dict], meta: dict) -> str:
    """Markdown tables: memory ratios against LoRA, and train-cpu-s per later round."""
    lora = next(m for m in memory if m["method"] == "lora")["peak_above_baseline_mb"]
    cuda = any("cuda_peak_above_baseline_mb" in m for m in memory)
    lines = [
        f"batch {meta['batch']} x {meta['seq']} tokens, {meta['steps']} AdamW steps, NF4 MiniLM (full: fp32), "
        f"1 torch thread; load average {meta['load_before']} before, {meta['load_after']} after; {meta['date']}",
        "",
        "| method | trainable | peak RSS above loaded model (MB) | x LoRA | store (MB) | CPU s / step |"
        + (" CUDA peak above baseline (MB) |" if cuda else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    for m in memory:
        row = (
            f"| {m['method']} | {m['trainable']:,} | {m['peak_above_baseline_mb']:.1f} | "
            f"{m['peak_above_baseline_mb'] / lora:.2f} | {m['store_mb']:.1f} | {m['cpu_s_per_step']:.2f} |"
        )
        if cuda:
            row += f" {m.get('cuda_peak_above_baseline_mb', float('nan')):.1f} |"
        lines.append(row)
    by = {c["method"]: c for c in cpu}
    lst_s = statistics.median(by["lst"]["later_rounds_cpu_s"])
    lora_s = statistics.median(by["lora"]["later_rounds_cpu_s"])
    lines += [
        "",
        "train-cpu-s of one client (200 snippets, 8 steps of 16 x 32 tokens), median of rounds 2+:",
        "",
        "| method | round 1 | later rounds (median) | x LoRA |",
        "|---|---:|---:|---:|",
        f"| lst (stored ladders) | {by['lst']['first_round_cpu_s']:.2f} | {lst_s:.2f} | {lst_s / lora_s:.3f} |",
        f"| lora | {by['lora']['first_round_cpu_s']:.2f} | {lora_s:.2f} | 1.000 |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="docs/results/lst/bench.md")
    parser.add_argument("--child", choices=["memory", "cpu"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from simulations.quiet import quiet_libraries

        quiet_libraries()
        if args.child == "memory":
            result = child_memory(args.method, args.batch, args.seq, args.steps)
        else:
            result = child_cpu(args.method, args.rounds)
        print(json.dumps(result))
        return 0
    meta = {
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    memory = [_run_child(["--child", "memory", "--method", m, *common]) for m in METHODS]
    cpu = [_run_child(["--child", "cpu", "--method", m, "--rounds", str(args.rounds)]) for m in CPU_METHODS]
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    report = format_report(memory, cpu, meta)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m simulations.bench.lst " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(
        f"# LST benchmark\n\n`{command.strip()}`\n\n{report}\n```json\n{json.dumps({'memory': memory, 'cpu': cpu}, indent=1)}\n```\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
