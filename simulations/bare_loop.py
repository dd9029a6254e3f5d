"""The same federated work as the Flower apps, in one process, for benchmarks.

Not a runtime: it exists to measure Flower's simulation overhead against exactly the
same local training (bench_core.py) and to tune learning rates quickly. It uses the
same participation model, ``Task.local_update`` and FedAvg math as the apps.
"""

from __future__ import annotations

import logging
import time

from fedpeft import participation as participation_lib
from fedpeft.adapters import apply_delta
from fedpeft.config import ExperimentConfig
from fedpeft.task import load_task, set_threads
from fedpeft.train import evaluate
from strategies.fedavg import weighted_average

log = logging.getLogger(__name__)


def run_bare_loop(cfg: ExperimentConfig, *, evaluate_every_round: bool = True) -> dict:
    """FedAvg over deltas for ``cfg`` sequentially in this process; returns timings and accuracies."""
    set_threads(cfg.simulation.torch_threads)
    task = load_task(cfg)
    env = participation_lib.build_participation(
        cfg.participation, cfg.partition.num_partitions, cfg.seed, label_hist=task.label_histograms()
    )
    state = dict(task.initial_state)
    accuracies, train_s, round_s = [], 0.0, []
    for server_round in range(1, cfg.num_rounds + 1):
        t_round = time.perf_counter()
        deltas, weights = [], []
        for pid in env.online(server_round):
            t0 = time.perf_counter()
            delta, result = task.local_update(state, pid, server_round)
            train_s += time.perf_counter() - t0
            deltas.append(delta)
            weights.append(result.num_examples if cfg.strategy.weighting == "examples" else 1.0)
        if deltas:  # a round with nobody online leaves the state alone
            state = apply_delta(state, weighted_average(deltas, weights), cfg.strategy.server_lr)
        if evaluate_every_round or server_round == cfg.num_rounds:
            from fedpeft.adapters import set_adapter_state

            set_adapter_state(task.model, state)
            acc = evaluate(task.model, task.test_loader())["accuracy"]
            accuracies.append(acc)
            log.info("bare loop round %d: accuracy %.4f", server_round, acc)
        round_s.append(time.perf_counter() - t_round)
    return {"train_s": train_s, "accuracies": accuracies, "round_s": round_s}
