"""FedAU vs FedAvg-over-participants vs the known-p oracle, in one process (the sweep).

Not a runtime: like ``bare_loop.py`` it does exactly the apps' work sequentially in one
process, so a learning-rate grid x patterns x seeds fits a 2-core CPU budget. It uses
the same participation model, ``Task.local_update``, the registered strategies'
``aggregation_weights`` (built by ``build_strategy`` from the config) and the same
aggregation functions as the ServerApp; ``fedpeft simulate`` on one of the configs is
the end-to-end check. Each finished run is appended as one JSON line to ``--out``, and
runs already there are skipped, so the sweep can be resumed.

    python -m simulations.fedau_sweep simulations/configs/fedau_bernoulli.toml \\
        --seeds 0 --lrs 0.003 0.01 0.03 --out docs/results/fedau/runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from fedpeft import participation as participation_lib
from fedpeft.adapters import apply_delta, set_adapter_state
from fedpeft.config import ExperimentConfig, load_config
from fedpeft.task import Task, load_task, set_threads
from fedpeft.train import forward_logits
from strategies import StrategyContext, build_strategy
from strategies.fedau import FedAU, scaled_sum
from strategies.fedavg import weighted_average

log = logging.getLogger("fedpeft.fedau_sweep")

#: the compared methods: flat config overrides on top of each fedau_*.toml
METHODS = {
    "fedavg": {"strategy.name": "fedavg", "strategy.weighting": "uniform"},
    "fedavg_examples": {"strategy.name": "fedavg", "strategy.weighting": "examples"},
    "fedau": {"strategy.name": "fedau"},
    "known_p_oracle": {"strategy.name": "known_p_oracle"},
}


@torch.no_grad()
def per_class_accuracy(task: Task, state) -> tuple[float, list[float]]:
    """Overall accuracy and accuracy per true class on the fixed held-out set."""
    set_adapter_state(task.model, state)
    task.model.eval()
    preds, labels = [], []
    for batch in task.test_loader():
        preds.append(forward_logits(task.model, batch).argmax(-1).cpu().numpy())
        labels.append(batch["labels"].numpy())
    pred, label = np.concatenate(preds), np.concatenate(labels)
    classes = range(len(task.splits.train.label_names))
    return float((pred == label).mean()), [float((pred[label == c] == c).mean()) for c in classes]


def class_participation(probabilities: np.ndarray, label_hist: np.ndarray) -> np.ndarray:
    """Per class: the expected share of its training examples online in a round, sum_n p_n h_nc / sum_n h_nc."""
    hist = np.asarray(label_hist, dtype=np.float64)
    return (probabilities @ hist) / np.maximum(hist.sum(axis=0), 1.0)


def run_in_process(cfg: ExperimentConfig, eval_every: int = 0) -> dict:
    """One run of ``cfg``: every round's online clients train, the strategy's weights aggregate.

    ``eval_every`` > 0 also scores the model every that many rounds (the ``curve``).
    """
    t0 = time.monotonic()
    set_threads(cfg.simulation.torch_threads)
    task = load_task(cfg)
    num_clients = cfg.partition.num_partitions
    hist = task.label_histograms()
    env = participation_lib.build_participation(cfg.participation, num_clients, cfg.seed, label_hist=hist)
    ctx = StrategyContext(
        node_selector=lambda rnd, grid: [], partition_of=lambda n: n, num_clients=num_clients, environment=env
    )
    strategy = build_strategy(cfg, ctx)
    state = dict(task.initial_state)
    online_trace = participation_lib.trace(env, cfg.num_rounds, num_clients)
    curve = []
    for server_round in range(1, cfg.num_rounds + 1):
        if eval_every > 0 and server_round > 1 and (server_round - 1) % eval_every == 0:
            curve.append([server_round - 1, *per_class_accuracy(task, state)])
        pids = [int(p) for p in np.flatnonzero(online_trace[server_round - 1])]
        if not pids:
            continue  # nobody online: the round is skipped, as in the ServerApp
        accepted = []
        for pid in pids:
            delta, result = task.local_update(state, pid, server_round)
            accepted.append((pid, delta, {"num-examples": result.num_examples}))
        weights = strategy.aggregation_weights(server_round, accepted)
        deltas = [d for _, d, _ in accepted]
        if isinstance(strategy, FedAU):  # FedAU and the oracle: (1/N) sum omega_n delta_n
            update = scaled_sum(deltas, weights, 1.0 / num_clients)
        else:
            update = weighted_average(deltas, weights)
        state = apply_delta(state, update, cfg.strategy.server_lr)
    accuracy, per_class = per_class_accuracy(task, state)
    share = class_participation(env.probabilities, hist)
    curve.append([cfg.num_rounds, accuracy, per_class])
    return {
        "curve": curve,  # [round, accuracy, per-class accuracy] every eval_every rounds and at the end
        "accuracy": accuracy,
        "per_class_accuracy": per_class,
        "class_participation": share.tolist(),
        "rare_class": int(np.argmin(share)),
        "rare_class_accuracy": per_class[int(np.argmin(share))],
        "probabilities": [float(p) for p in env.probabilities],
        "label_histograms": hist.tolist(),
        "participation_trace": online_trace.astype(int).tolist(),
        "strategy_state": strategy.state_for_results() if hasattr(strategy, "state_for_results") else None,
        "wall_s": time.monotonic() - t0,
    }


def _key(row: dict) -> tuple:
    return (row["config"], row["method"], row["seed"], row["lr"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="fedau_*.toml files")
    parser.add_argument("--methods", nargs="+", default=["fedavg", "fedau", "known_p_oracle"], choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--lrs", nargs="+", type=float, required=True, help="train.lr values")
    parser.add_argument("--lr-for", nargs="*", default=[], metavar="METHOD=LR", help="fix one method's lr")
    parser.add_argument("--out", required=True, help="JSON-lines file, appended to")
    parser.add_argument("--eval-every", type=int, default=0, help="also score every that many rounds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fixed = {m: float(v) for m, v in (item.split("=") for item in args.lr_for)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(json.loads(line)) for line in out.read_text().splitlines()} if out.exists() else set()
    for path in args.configs:
        base = load_config(path)
        for seed in args.seeds:
            for method in args.methods:
                for lr in [fixed[method]] if method in fixed else args.lrs:
                    row = {"config": base.name, "method": method, "seed": seed, "lr": lr}
                    if _key(row) in done:
                        continue
                    cfg = base.replace({**METHODS[method], "seed": seed, "train.lr": lr})
                    row.update(run_in_process(cfg, args.eval_every))
                    row["k_cap"] = cfg.strategy.k_cap
                    with out.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    log.info(
                        "%s %s seed %d lr %g: accuracy %.4f, rare class %d accuracy %.4f (%.0f s)",
                        base.name, method, seed, lr, row["accuracy"], row["rare_class"],
                        row["rare_class_accuracy"], row["wall_s"],
                    )  # fmt: skip


if __name__ == "__main__":
    main()
