"""Per-step time of DP-SGD (Opacus) against plain training, on the same fixed batches.

    python -m simulations.bench.dp [--steps 8] [--batch-size 32] [--modes hooks,functorch,ghost]

One process, one torch thread, the embedded NF4 MiniLM + LoRA r=8. Each mode trains the
same batches from the same initial adapter; modes are interleaved run by run so a
shared CPU's load drifts over all of them alike. Prints the median seconds per step and
the ratio to plain training. ``hooks`` and ``functorch`` run through fedpeft's own
:func:`fedpeft.privacy.dp_sgd`; ``ghost`` (Opacus' fast gradient clipping) needs its
own loss wrapper, so it is set up here directly and is only benchmarked, not offered.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import ExitStack

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedpeft import privacy  # noqa: E402
from fedpeft.adapters import set_adapter_state  # noqa: E402
from fedpeft.config import ExperimentConfig  # noqa: E402
from fedpeft.task import set_threads  # noqa: E402
from fedpeft.tasks import load_task
from fedpeft.train import batch_loss, build_optimizer, forward_logits  # noqa: E402


def make_stepper(task, batches, mode: str, stack: ExitStack):
    """``step(batch)`` for ``mode`` on the cached model; Opacus' hooks are removed when ``stack`` closes."""
    cfg = task.cfg
    set_adapter_state(task.model, task.initial_state)
    task.model.train()
    optimizer = build_optimizer(task.model, cfg.train)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # the fixed batches, as they are
    model, loss_fn = task.model, None
    if mode in ("hooks", "functorch"):
        session = stack.enter_context(
            privacy.dp_sgd(
                task.model,
                optimizer,
                loader,
                noise_multiplier=1.0,
                clip_norm=1.0,
                noise_seed=0,
                sampling_seed=0,
                poisson=False,
                grad_sample_mode=mode,
            )
        )
        optimizer = session.optimizer
    elif mode == "ghost":
        from opacus import PrivacyEngine

        model, optimizer, loss_fn, _ = PrivacyEngine(accountant="rdp").make_private(
            module=task.model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=torch.nn.CrossEntropyLoss(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="ghost",
        )
        stack.callback(model._close)
    elif mode != "plain":
        raise ValueError(f"unknown mode {mode!r}; use plain, hooks, functorch or ghost")

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        if loss_fn is None:
            loss = batch_loss(model, batch)
        else:
            loss = loss_fn(forward_logits(model, batch).float(), batch["labels"])
        loss.backward()
        optimizer.step()

    return step


def time_mode(step, batches, warmup: int) -> list[float]:
    """Seconds per step over ``batches`` (after ``warmup`` untimed steps)."""
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all modes, interleaved")
    parser.add_argument("--modes", default="hooks,functorch,ghost")
    args = parser.parse_args(argv)
    modes = ["plain", *[m for m in args.modes.split(",") if m]]
    n = (args.steps + args.warmup) * args.batch_size
    cfg = ExperimentConfig.from_flat(
        {
            "name": "bench-dp",
            "data.num-train-examples": n,
            "partition.num-partitions": 1,
            "partition.min-partition-size": 1,
            "train.batch-size": args.batch_size,
            "train.local-steps": args.steps + args.warmup,
        }
    )
    set_threads(1)
    task = load_task(cfg)
    batches = list(task.train_loader(task.partition(0), 1, 0))
    per_step: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            with ExitStack() as stack:
                per_step[mode] += time_mode(make_stepper(task, batches, mode, stack), batches, args.warmup)
    set_adapter_state(task.model, task.initial_state)
    task.model.eval()
    base = statistics.median(per_step["plain"])
    print(
        f"DP-SGD per-step time, batch {args.batch_size} x <= {cfg.data.max_seq_len} tokens, NF4 MiniLM + LoRA r=8, 1 thread"
    )
    print(f"{'mode':<10} {'s/step':>8} {'vs plain':>9}  (median of {len(per_step['plain'])} steps)")
    medians = {}
    for mode in modes:
        med = statistics.median(per_step[mode])
        medians[mode] = med
        print(f"{mode:<10} {med:8.3f} {med / base - 1:+9.0%}")
    return medians


if __name__ == "__main__":
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
