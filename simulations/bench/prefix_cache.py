"""Frozen-prefix cache benchmark: client training steps per second with and without the cache.

    python -m simulations.bench.prefix_cache [--steps 12] [--repeats 5] [--out docs/results/bench]

For the FedAU configs' setting (simulations/configs/fedau_bernoulli.toml: NF4 MiniLM, LoRA
r=4 on query/value of layers 4-5, 32 tokens, batches of 16) and for head-only on the same
data, times ``train_local`` with ``train.prefix-cache`` off and on, interleaved, one torch
thread (a simulated client); prints medians side by side. "warm" is the steady state of a
federated run, where a process has seen its clients' snippets in an earlier round; "cold"
includes filling the cache (first visit of every example). Also times the server's test-set
evaluation, and measures the cache's memory per 1,000 snippets at ``max-seq-len = 64``.
Writes ``prefix_cache.json`` under ``--out``. The machine is shared: compare ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from fedpeft import adapters, prefix_cache
from fedpeft.config import ExperimentConfig, load_config
from fedpeft.task import set_threads
from fedpeft.tasks import load_task
from fedpeft.train import evaluate, train_local
from simulations.quiet import quiet_libraries

FEDAU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fedau_bernoulli.toml"
SETTINGS = {
    # LoRA r=4 on query/value of the top two layers (the earlier FedAU setting; the configs now train the head only)
    "fedau-lora-layers-4-5": {
        "peft.method": "lora",
        "peft.lora-rank": 4,
        "peft.target-modules": "query,value",
        "peft.layers": "4,5",
    },
    "head-only": {"peft.method": "head"},
}


def setting_config(overrides: dict, steps: int, prefix: str) -> ExperimentConfig:
    """The FedAU config as one client holding ``steps`` batches, with ``overrides``."""
    base = load_config(FEDAU_CONFIG)
    flat = {
        "partition.num-partitions": 1,
        "partition.scheme": "iid",
        "participation.model": "always",
        "data.num-train-examples": steps * base.train.batch_size,
        "train.prefix-cache": prefix,
        **overrides,
    }
    return base.replace(flat)


def time_steps(task, steps: int) -> float:
    """Seconds per local step for one pass over the client's ``steps`` batches."""
    adapters.set_adapter_state(task.model, task.initial_state)
    loader = task.train_loader(task.partition(0), 1, 0)
    t0 = time.perf_counter()
    cfg = dataclasses.replace(task.cfg.train, local_steps=steps)
    train_local(task.model, loader, cfg, dropout_seed=0, logits_fn=task.logits_fn())
    return (time.perf_counter() - t0) / steps


def time_eval(task) -> float:
    """Seconds for one evaluation of the test set."""
    t0 = time.perf_counter()
    evaluate(task.model, task.test_loader(), task.logits_fn())
    return time.perf_counter() - t0


def bench_setting(overrides: dict, steps: int, repeats: int) -> dict:
    """Steps/s off, cold and warm (medians of ``repeats``, interleaved), and eval seconds."""
    off = load_task(setting_config(overrides, steps, "off"))
    on = load_task(setting_config(overrides, steps, "auto"))
    cache = on.model.fedpeft_prefix_cache
    assert on.logits_fn() is not None, "the cache should be on in this setting"
    times: dict[str, list[float]] = {"off": [], "cold": [], "warm": [], "eval_off": [], "eval_on": []}
    for _ in range(repeats):
        times["off"].append(time_steps(off, steps))
        cache.clear()
        times["cold"].append(time_steps(on, steps))
        times["warm"].append(time_steps(on, steps))
        times["eval_off"].append(time_eval(off))
        cache.clear()
        time_eval(on)  # fill with the test set
        times["eval_on"].append(time_eval(on))
    med = {k: statistics.median(v) for k, v in times.items()}
    adapters.set_adapter_state(on.model, on.initial_state)
    return {
        "k": cache.k,
        "steps_per_s": {k: 1.0 / med[k] for k in ("off", "cold", "warm")},
        "speedup_warm": med["off"] / med["warm"],
        "speedup_cold": med["off"] / med["cold"],
        "eval_s": {"off": med["eval_off"], "warm": med["eval_on"]},
        "eval_speedup": med["eval_off"] / med["eval_on"],
        "seconds_per_step": times,
        "batch_size": on.cfg.train.batch_size,
        "max_seq_len": on.cfg.data.max_seq_len,
        "test_examples": len(on.splits.test),
    }


def bench_memory(num_examples: int) -> dict:
    """Bytes of cached hidden states per 1,000 snippets at 64 tokens (layers 4-5 LoRA, k = 4)."""
    cfg = setting_config({"data.max-seq-len": 64, "data.num-train-examples": num_examples}, 1, "auto")
    task = load_task(cfg)
    cache = prefix_cache.PrefixCache(task.model, task.model.fedpeft_prefix_cache.k)
    for batch in task.train_loader(task.partition(0), 0, 0):
        cache.hidden_states(batch)
    hidden = task.model.config.hidden_size
    return {
        "examples": len(cache),
        "mb_per_1000_examples": cache.nbytes / len(cache) * 1000 / 1e6,
        "mb_per_1000_examples_all_64_tokens": 64 * hidden * 4 * 1000 / 1e6,
        "mean_tokens": cache.nbytes / len(cache) / (hidden * 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-examples", type=int, default=2000)
    parser.add_argument("--out", default="docs/results/bench")
    args = parser.parse_args()
    quiet_libraries()
    set_threads(1)
    report = {
        "settings": {name: bench_setting(o, args.steps, args.repeats) for name, o in SETTINGS.items()},
        "memory_seq_len_64": bench_memory(args.memory_examples),
        "command": f"python -m simulations.bench.prefix_cache --steps {args.steps} --repeats {args.repeats}",
        "threads": 1,
    }
    print(
        f"client steps/s, 1 thread, medians of {args.repeats} x {args.steps} steps (cold = first visit fills the cache)"
    )
    print(f"    {'setting':24s} {'k':>2s} {'off':>7s} {'cold':>7s} {'warm':>7s}  warm/off  eval off/warm (s)")
    for name, r in report["settings"].items():
        s = r["steps_per_s"]
        print(
            f"    {name:24s} {r['k']:2d} {s['off']:7.2f} {s['cold']:7.2f} {s['warm']:7.2f}  {r['speedup_warm']:7.2f}x"
            f"  {r['eval_s']['off']:.2f}/{r['eval_s']['warm']:.2f} ({r['eval_speedup']:.1f}x, {r['test_examples']} snippets)"
        )
    m = report["memory_seq_len_64"]
    print(
        f"cache memory at max-seq-len 64: {m['mb_per_1000_examples']:.1f} MB per 1,000 snippets "
        f"(mean {m['mean_tokens']:.1f} tokens; {m['mb_per_1000_examples_all_64_tokens']:.1f} MB if all were 64 tokens)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'prefix_cache.json'}")


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
