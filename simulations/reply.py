"""The replies a client sends: a first-order delta with its metrics and contract (kind "delta"), or its scores.

A leaf module (fedpeft, flwr and the strategies' contract only) so the ClientApp's handlers, the
cohort path and tests build replies without importing the ClientApp, which wires mods and
deployment tooling.
"""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict

from strategies.base import CONTRACT_KEY, KIND_DELTA, contract_record


def delta_reply(task, pid: int, delta: dict, result, *, cpu_s: float | None = None) -> RecordDict:
    """A first-order train reply: the delta, the client's metrics, and the contract (kind "delta").

    ``cpu_s`` is the process CPU time (all torch threads) of the local training, reported as
    ``train-cpu-s`` for the parallel-efficiency benchmark (simulations/bench/cohort_engine.py).
    """
    from fedpeft.adapters import num_trainable
    from fedpeft.records import state_to_record

    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.mean_loss,
            "train-loss-first": result.first_loss,
            "train-loss-last": result.last_loss,
            "num-steps": result.num_steps,
            "partition-id": pid,
            "trainable-params": num_trainable(task.model),
        }
    )
    if cpu_s is not None:
        metrics["train-cpu-s"] = float(cpu_s)
    if result.peak_cuda_bytes:  # CUDA only: this client's peak allocation during its local round
        metrics["peak-cuda-bytes"] = int(result.peak_cuda_bytes)
    if result.privacy is not None:  # report epsilon so far
        for key in ("epsilon", "delta", "noise-multiplier", "sample-rate"):
            metrics[key if key == "epsilon" else f"dp-{key}"] = float(result.privacy[key])
    return RecordDict({"arrays": state_to_record(delta), "metrics": metrics, CONTRACT_KEY: contract_record(KIND_DELTA)})


def eval_reply(pid: int, scores: dict) -> RecordDict:
    """An evaluate reply: the client's scores of the global adapter on its own rows (``Task.evaluate``'s dict)."""
    metrics = {
        "num-examples": int(scores["num_examples"]),
        "eval-loss": scores["loss"],
        "eval-accuracy": scores["accuracy"],
        "eval-balanced-accuracy": scores["balanced_accuracy"],
        "partition-id": pid,
    }
    return RecordDict({"metrics": MetricRecord(metrics)})
