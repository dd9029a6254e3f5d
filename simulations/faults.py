"""Fault injection: a Flower mod that makes simulated clients fail, from a seed, at a rate.

Enabled by ``faults.rate > 0`` (fedpeft/config.py FaultsConfig). Which client-round fails,
and how, is a pure function of (run seed, round, partition) (:func:`planned_fault`), so a
test can list every fault it expects and check that the results record each one in its
round: crashes and hangs as failed clients, corrupt deltas and absurd metrics as rejected
replies, slow clients as aggregated replies that carry ``injected-fault`` in their metrics.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from fedpeft.config import FAULT_KINDS, ExperimentConfig
from fedpeft.rng import numpy_rng
from simulations.cohort import COHORT_KEY
from simulations.node import experiment_config, partition_id

log = logging.getLogger(__name__)


def planned_fault(cfg: ExperimentConfig, server_round: int, pid: int) -> str | None:
    """The fault client ``pid`` suffers in ``server_round``, or None."""
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
        if not msg.metadata.message_type.startswith("train") or COHORT_KEY in msg.content.config_records:
            return call_next(msg, context)  # faults are injected per one-client node (the config enforces it)
        cfg = experiment_config(context, overrides)
        if cfg.faults.rate <= 0:
            return call_next(msg, context)
        round_ = int(msg.content["config"].get("server-round", 0))
        pid = partition_id(context, cfg)
        kind = planned_fault(cfg, round_, pid)
        if kind is None:
            return call_next(msg, context)
        log.info("round %d partition %d: injecting fault %r", round_, pid, kind)
        if kind == "crash":
            raise RuntimeError(f"injected fault: crash (round {round_}, partition {pid})")
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
        return reply

    return mod


def _corrupt(record: ArrayRecord, kind: str) -> ArrayRecord:
    arrays = {name: arr.numpy().copy() for name, arr in record.items()}
    first = next(iter(arrays))
    if kind == "shape":
        arrays[first] = np.zeros(arrays[first].size + 1, dtype=np.float32)
    else:
        arrays[first].flat[0] = np.nan if kind == "nan" else np.inf
    return ArrayRecord({name: Array(a) for name, a in arrays.items()})
