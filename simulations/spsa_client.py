"""The ClientApp's ``"spsa"`` train mode: catch up, run K SPSA steps, send K bytes.

A thin Flower shell around :mod:`fedpeft.zo` and :mod:`fedpeft.zo_log`. Between rounds the
client keeps, in Flower's per-node ``context.state``, the global adapter ``theta_t`` of
the last round ``t`` it trained in and its own codes of that round; the server's log
tail (or the full adapter) brings it to ``theta_r``, checked against the server's hash.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from fedpeft import data, onebyte, privacy, zo
from fedpeft.config import ExperimentConfig
from fedpeft.records import record_to_state, state_to_record
from fedpeft.rng import torch_generator
from fedpeft.task import Task, load_task
from fedpeft.train import batch_loss, forward_logits
from fedpeft.zo_log import replay_round, unpack_header, unpack_log
from simulations.node import DP_STATE_KEY, partition_id
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
    model = task.model
    model.eval()  # dropout off: both evaluations of a step must see the same function
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    zo.copy_into_(params, master)
    loader = data.build_loader(
        task.partition(pid),
        task.tokenizer,
        max_seq_len=cfg.data.max_seq_len,
        batch_size=cfg.spsa.batch_size,
        shuffle=True,
        generator=torch_generator(cfg.seed, "spsa-batches", round_, pid),
    )
    rows = len(task.partition(pid))
    dp = _dpzero_plan(cfg, rows, context)
    # Through the frozen-prefix cache when every trainable parameter sits above layer k: SPSA
    # runs forwards only, in eval mode, so the cached prefix is exact and a step costs the top.
    logits_fn = task.logits_fn()
    result = zo.run_local_steps(
        params,
        master,
        loader,
        (lambda batch: per_example_loss(model, batch, logits_fn))
        if dp
        else (lambda batch: batch_loss(model, batch, logits_fn)),
        run_seed=cfg.seed,
        round_=round_,
        partition_id=pid,
        num_steps=cfg.spsa.local_steps,
        eps=cfg.spsa.eps,
        lr=lr,
        scale=scale,
        codec=cfg.spsa.codec,
        distribution=cfg.spsa.distribution,
        dp_clip=cfg.dp.clip_norm if dp else 0.0,
        dp_sigma=dp["sigma"] if dp else 0.0,
    )
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
    if dp:  # DPZero: account this round's steps with Opacus, keep the history across rounds
        history = dp["history"] + [(dp["sigma"], dp["rate"], len(result.codes))]
        context.state[DP_STATE_KEY] = ConfigRecord(privacy.history_to_lists(history))
        metrics["epsilon"] = privacy.epsilon_from_history(history, cfg.dp.delta)
        metrics["dp-delta"] = cfg.dp.delta
        metrics["dp-noise-multiplier"] = dp["sigma"]
        metrics["dp-sample-rate"] = dp["rate"]
    return RecordDict(
        {"spsa": ConfigRecord({"codes": codes}), "metrics": metrics, CONTRACT_KEY: contract_record(KIND_SPSA)}
    )


def per_example_loss(model, batch, logits_fn=None) -> torch.Tensor:
    """Cross-entropy of every example of the batch (DPZero clips per example)."""
    logits = forward_logits(model, batch) if logits_fn is None else logits_fn(batch)
    return F.cross_entropy(logits.float(), batch["labels"].to(logits.device), reduction="none")


def _dpzero_plan(cfg: ExperimentConfig, rows: int, context: Context) -> dict | None:
    """Noise multiplier, sample rate and accountant history for DPZero, or None without DP.

    Sample rate 1/ceil(n/B) as for DP-SGD; batches are shuffled, not Poisson-sampled, so
    (as for fixed-size participation) Opacus' RDP epsilon is an approximation.
    """
    if cfg.dp.mode != "sample":
        return None
    rate = privacy.poisson_rate(rows, cfg.spsa.batch_size)
    sigma = privacy.sample_noise_multiplier(cfg, rows)  # the privacy plan's formula (fedpeft/privacy_plan.py)
    history = privacy.history_from_lists(context.state.config_records.get(DP_STATE_KEY))
    return {"sigma": sigma, "rate": rate, "history": history}
