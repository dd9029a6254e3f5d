"""The ClientApp's ``"spsa"`` train mode: catch up, run K SPSA steps, send K bytes.

A thin Flower shell around :func:`fedpeft.spsa_update.spsa_local_update` (the steps, on the
node's own rows) and :mod:`fedpeft.zo_log` (the catch-up). Between rounds the
client keeps, in Flower's per-node ``context.state``, the global adapter ``theta_t`` of
the last round ``t`` it trained in and its own codes of that round; the server's log
tail (or the full adapter) brings it to ``theta_r``, checked against the server's hash.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from fedpeft import onebyte, privacy, zo
from fedpeft.config import ExperimentConfig
from fedpeft.records import record_to_state, state_to_record
from fedpeft.spsa_update import spsa_local_update
from fedpeft.task import Task
from fedpeft.tasks import load_task
from fedpeft.zo_log import replay_round, unpack_header, unpack_log
from simulations.node import DP_STATE_KEY, node_data_path, partition_id
from strategies.base import CONTRACT_KEY, KIND_SPSA, contract_record

log = logging.getLogger(__name__)

#: ``context.state`` keys: the synced adapter (ArrayRecord) and {"round", "codes"} (ConfigRecord)
THETA_KEY = "spsa-theta"
SYNC_KEY = "spsa-sync"


def catch_up(content: RecordDict, context: Context, cfg: ExperimentConfig, task: Task) -> tuple[zo.Tensors | None, str]:
    """``theta_r`` as CPU fp32 tensors and how it was obtained (``full``/``log``), or None on desync."""
    conf = content["config"]
    if "arrays" in content.array_records:
        return zo.to_master(record_to_state(content["arrays"])), "full"
    if THETA_KEY in context.state:
        master = zo.to_master(record_to_state(context.state[THETA_KEY]))
        synced = int(context.state[SYNC_KEY]["round"])
        own = bytes(context.state[SYNC_KEY]["codes"])
    else:  # never trained: the seeded initial adapter is theta_1
        master, synced, own = zo.to_master(task.initial_state), 1, None
    if synced != int(conf["spsa-base-round"]):
        log.warning("client holds round %d but the server's log starts at %s", synced, conf["spsa-base-round"])
        return None, "log"
    for entry in unpack_log(bytes(conf.get("spsa-log", b""))):
        replay_round(
            master,
            entry,
            run_seed=cfg.seed,
            codec=cfg.spsa.codec,
            distribution=cfg.spsa.distribution,
            own_codes=own if entry.round == synced else None,
        )
    return master, "log"


def spsa_train(content: RecordDict, context: Context, cfg: ExperimentConfig) -> RecordDict:
    """Handle a ``mode="spsa"`` train message (see strategies/spsa.py for the protocol)."""
    pid = partition_id(context, cfg)
    conf = content["config"]
    round_ = int(conf["server-round"])
    scale, lr, want_hash = unpack_header(bytes(conf["spsa-header"]))
    task = load_task(cfg)
    master, source = catch_up(content, context, cfg, task)
    if master is None or zo.state_hash(master) != want_hash:
        log.warning("round %d partition %d: state hash mismatch after %s catch-up", round_, pid, source)
        for key in (THETA_KEY, SYNC_KEY):
            if key in context.state:
                del context.state[key]
        metrics = MetricRecord({"spsa-desync": 1, "partition-id": pid})
        return RecordDict({"metrics": metrics, CONTRACT_KEY: contract_record(KIND_SPSA)})
    start = zo.to_state(master)
    update = spsa_local_update(
        task, master, partition_id=pid, round_=round_, scale=scale, lr=lr, data_path=node_data_path(context)
    )
    result = update.result
    codes = onebyte.to_bytes(result.codes)
    context.state[THETA_KEY] = state_to_record(start)
    context.state[SYNC_KEY] = ConfigRecord({"round": round_, "codes": codes})
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": float(np.mean(result.losses)),
            "train-loss-first": float(result.losses[0]),
            "train-loss-last": float(result.losses[-1]),
            "num-steps": len(result.codes),
            "spsa-skipped": result.skipped,
            "spsa-mean-abs-g": float(np.mean(np.abs(result.g))),
            "spsa-catch-up-full": int(source == "full"),
            "partition-id": pid,
        }
    )
    if update.dp_sigma is not None:  # DPZero: account this round's steps with Opacus, keep the history
        history = privacy.history_from_lists(context.state.config_records.get(DP_STATE_KEY))
        history = history + [(update.dp_sigma, update.dp_rate, len(result.codes))]
        context.state[DP_STATE_KEY] = ConfigRecord(privacy.history_to_lists(history))
        metrics["epsilon"] = privacy.epsilon_from_history(history, cfg.dp.delta)
        metrics["dp-delta"] = cfg.dp.delta
        metrics["dp-noise-multiplier"] = update.dp_sigma
        metrics["dp-sample-rate"] = update.dp_rate
    return RecordDict(
        {"spsa": ConfigRecord({"codes": codes}), "metrics": metrics, CONTRACT_KEY: contract_record(KIND_SPSA)}
    )
