"""Fault injection: a Flower mod that makes simulated clients fail, from a seed, at a rate.

Enabled by ``faults.rate > 0`` (fedpeft/config.py FaultsConfig). The mod sees one client's
message, on a one-client node or inside a cohort worker (simulations/cohort_worker.py calls it
once per client). Which client-round fails,
and how, is a pure function of (run seed, round, partition) (:func:`planned_fault`), so a
test can list every fault it expects and check that the results record each one in its
round: crashes and hangs as failed clients, corrupt deltas and absurd metrics as rejected
replies, slow clients as aggregated replies that carry ``injected-fault`` in their metrics.

Byzantine clients (``faults.byzantine-fraction``): a fixed set of partitions, drawn once from
the run seed (:func:`byzantine_partitions`), corrupts its delta every round it trains, so the
reply passes every check and is aggregated unless a robust aggregator leaves it out:
``scaled`` multiplies the delta by ``byzantine-scale``, ``sign-flip`` by ``-byzantine-scale``,
``noise`` replaces it with Gaussian noise of std ``byzantine-scale`` x the honest delta's RMS
(drawn from ``derive_seed(seed, "byzantine-noise", round, partition)``). Each such reply
carries ``injected-fault`` (the kind's code, :data:`~fedpeft.config.FAULT_KINDS` index + 1) in
its metrics, so every round's ``clients`` list in results.json says who attacked. The same
kinds may also be listed in ``faults.kinds`` for random per-round faults at ``faults.rate``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from fedpeft.config import BYZANTINE_KINDS, FAULT_KINDS, ExperimentConfig
from fedpeft.rng import numpy_rng
from simulations.cohort import WORKER_KEY, NoReply
from simulations.node import experiment_config, partition_id

log = logging.getLogger(__name__)


def byzantine_partitions(cfg: ExperimentConfig) -> frozenset[int]:
    """The ``round(byzantine-fraction x N)`` partitions that attack, drawn once from the run seed."""
    num = cfg.partition.num_partitions
    count = int(round(cfg.faults.byzantine_fraction * num))
    if count == 0:
        return frozenset()
    rng = numpy_rng(cfg.seed, "byzantine")
    return frozenset(int(p) for p in rng.choice(num, size=count, replace=False))


def faults_enabled(cfg: ExperimentConfig) -> bool:
    """Whether any client-round can suffer a fault (random or Byzantine)."""
    return cfg.faults.rate > 0 or cfg.faults.byzantine_fraction > 0


def planned_fault(cfg: ExperimentConfig, server_round: int, pid: int) -> str | None:
    """The fault client ``pid`` suffers in ``server_round``, or None (a Byzantine client: always its kind)."""
    if cfg.faults.byzantine_fraction > 0 and pid in byzantine_partitions(cfg):
        return cfg.faults.byzantine_kind
    if cfg.faults.rate <= 0:
        return None
    rng = numpy_rng(cfg.seed, "fault", server_round, pid)
    if rng.random() >= cfg.faults.rate:
        return None
    kinds = [k.strip() for k in cfg.faults.kinds.split(",")]
    return kinds[int(rng.integers(len(kinds)))]


def fault_mod(overrides: dict):
    """A ClientApp mod injecting :func:`planned_fault` into train messages."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        if not msg.metadata.message_type.startswith("train"):
            return call_next(msg, context)
        cfg = experiment_config(context, overrides)
        if not faults_enabled(cfg):
            return call_next(msg, context)
        round_ = int(msg.content["config"].get("server-round", 0))
        pid = partition_id(context, cfg)
        kind = planned_fault(cfg, round_, pid)
        if kind is None:
            return call_next(msg, context)
        log.info("round %d partition %d: injecting fault %r", round_, pid, kind)
        if kind == "crash":
            raise RuntimeError(f"injected fault: crash (round {round_}, partition {pid})")
        if kind == "hang" and WORKER_KEY in context.node_config:
            # inside a cohort worker, sleeping past the timeout would silence every client of the worker
            raise NoReply(f"injected fault: hang (round {round_}, partition {pid})")
        if kind in ("hang", "slow"):
            time.sleep(cfg.simulation.round_timeout_s + 0.5 if kind == "hang" else cfg.faults.slow_s)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        reply.content["metrics"]["injected-fault"] = FAULT_KINDS.index(kind) + 1
        if kind in ("nan", "inf", "shape") and "arrays" in reply.content.array_records:
            reply.content["arrays"] = _corrupt(reply.content["arrays"], kind)
        elif kind == "metrics":
            reply.content["metrics"]["num-examples"] = float("inf")
        elif kind in BYZANTINE_KINDS and "arrays" in reply.content.array_records:
            rng = numpy_rng(cfg.seed, "byzantine-noise", round_, pid)
            reply.content["arrays"] = byzantine_delta(reply.content["arrays"], kind, cfg.faults.byzantine_scale, rng)
        return reply

    return mod


def byzantine_delta(record: ArrayRecord, kind: str, scale: float, rng: np.random.Generator) -> ArrayRecord:
    """The delta a Byzantine client sends instead of its honest ``record`` (module docstring)."""
    honest = {name: arr.numpy().astype(np.float64) for name, arr in record.items()}
    if kind == "scaled":
        sent = {name: scale * a for name, a in honest.items()}
    elif kind == "sign-flip":
        sent = {name: -scale * a for name, a in honest.items()}
    elif kind == "noise":
        size = sum(a.size for a in honest.values())
        rms = float(np.sqrt(sum(np.sum(a * a) for a in honest.values()) / max(size, 1)))
        sent = {name: rng.normal(0.0, scale * rms, a.shape) for name, a in honest.items()}  # key order: seeded
    else:
        raise ValueError(f"unknown Byzantine kind {kind!r}; choose one of {BYZANTINE_KINDS}")
    return ArrayRecord({name: Array(a.astype(np.float32)) for name, a in sent.items()})


def _corrupt(record: ArrayRecord, kind: str) -> ArrayRecord:
    arrays = {name: arr.numpy().copy() for name, arr in record.items()}
    first = next(iter(arrays))
    if kind == "shape":
        arrays[first] = np.zeros(arrays[first].size + 1, dtype=np.float32)
    else:
        arrays[first].flat[0] = np.nan if kind == "nan" else np.inf
    return ArrayRecord({name: Array(a) for name, a in arrays.items()})
