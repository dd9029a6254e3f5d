"""Seconds per local LoRA step and peak process memory of a causal LM: NF4 vs int8 vs fp32, side by side.

    python -m simulations.bench.llm [--model embedded|random-smollm2|tiny] [--steps 4] [--batch-size 8]
                                    [--seq-len 64] [--quantizations nf4,int8,none] [--device cpu|cuda]

Each quantization runs in its own subprocess (so each peak RSS / CUDA peak is its own), with one
torch thread on the CPU, the same random token batch (every token a target) and LoRA r 8 on
q/k/v/o/gate/up/down; the first step is a warm-up and is not timed. ``random-smollm2`` is a
randomly initialised Llama of SmolLM2-135M's shape (no weights needed, e.g. on a GPU machine);
``tiny`` (2 layers, hidden 64) exists to test this script. Prints median seconds per step and the
ratio to fp32, and the peak memory. Not done here: the cohort-size 1/8/32 GPU mode (batched cohorts are
refused for causal LMs so far: only `simulation.cohort-batched = false`, one client after another).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# SmolLM2-135M's shape (its config.json): the random model needs no weights.
SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
}
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
}


def random_llama_folder(shape: dict, out: Path) -> str:
    """Save a seeded random ``LlamaForCausalLM`` of ``shape`` (tied embeddings) to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(out))
    return str(out)


def measure(model_name: str, quantization: str, *, steps: int, batch_size: int, seq_len: int, device: str) -> dict:
    """One quantization, in this process: median seconds per LoRA step and peak memory."""
    import torch

    from fedpeft.causal_lm import build_lm
    from fedpeft.config import ModelConfig, PeftConfig, TrainConfig
    from fedpeft.train import batch_loss, build_optimizer

    torch.set_num_threads(1)
    model = build_lm(ModelConfig(name=model_name, quantization=quantization, device=device), PeftConfig(), 0)
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(100, vocab, (batch_size, seq_len), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4))
    model.train()
    times = []
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        batch_loss(model, batch).backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up kernels and allocators
            times.append(time.perf_counter() - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda_peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return {"quantization": quantization, "s_per_step": statistics.median(times), "peak_rss_bytes": peak_rss,
            "peak_cuda_bytes": int(cuda_peak)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="embedded | random-smollm2 | tiny | an HF id or folder")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--quantizations", default="nf4,int8,none")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this quantization, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.model, args.one, steps=args.steps, batch_size=args.batch_size,
                                 seq_len=args.seq_len, device=args.device)))  # fmt: skip
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model in ("random-smollm2", "tiny"):
            model = random_llama_folder(SMOLLM2_SHAPE if model == "random-smollm2" else TINY_SHAPE, Path(tmp) / "m")
        rows = []
        for quant in args.quantizations.split(","):
            cmd = [sys.executable, "-m", "simulations.bench.llm", "--one", quant.strip(), "--model", model,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len",
                   str(args.seq_len), "--device", args.device]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = next((r["s_per_step"] for r in rows if r["quantization"] == "none"), None)
    print(f"{args.model}, LoRA r 8 q/k/v/o/gate/up/down, batch {args.batch_size} x {args.seq_len}, {args.device}")
    print("quantization | s/step | vs fp32 | peak RSS MB | peak CUDA MB")
    for r in rows:
        ratio = f"{r['s_per_step'] / base:.2f}x" if base else "-"
        print(f"{r['quantization']:>12} | {r['s_per_step']:.3f} | {ratio} | {r['peak_rss_bytes'] / 1e6:.0f} | "
              f"{r['peak_cuda_bytes'] / 1e6:.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
