"""The worker side of cohort nodes: a Flower mod that serves a packed cohort client by client.

A cohort worker (``simulation.cohort-size = K``, simulations/cohort.py) receives one message
holding up to K clients' messages. :func:`cohort_mod` sits in front of the rest of the
ClientApp (the fault mod, any test mods, the handlers), which only ever sees one client: it
unpacks the cohort, calls ``call_next`` once per client with that client's own message and
own :class:`~flwr.app.Context` (its partition id in the node config, its own state: DP
accountant, SCAFFOLD ``c_i``, SPSA sync), saves each client's state back under a prefix,
and packs the replies. So every mode and every fault works inside a cohort as it works on a
one-client node: a client's error is its own error reply, the others go on; a client that
gives no reply (:class:`~simulations.cohort.NoReply`, an injected hang) is listed as such.

The one route that does not go through ``call_next``: a cohort of plain first-order clients
trains together in one call (:func:`fedpeft.cohort.train_cohort`: batched LoRA when
``simulation.cohort-batched``). Training together has no per-client failure: the clients
share one forward/backward, so an error there is every client's error reply. Injected faults
act per client, so with faults on (or any per-client mod in the app) a cohort always goes
client by client, where the fault mod sees each client as it would alone.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpeft.config import ConfigError, ExperimentConfig
from simulations.cohort import (
    COHORT_KEY,
    WORKER_KEY,
    NoReply,
    cohort_partitions,
    error_record,
    num_workers,
    pack,
    unpack,
)
from simulations.faults import faults_enabled
from simulations.node import experiment_config, node_data_path
from simulations.reply import delta_reply

log = logging.getLogger(__name__)


def worker_partitions(context: Context, cfg: ExperimentConfig) -> list[int]:
    """The partitions a cohort worker node owns (its node config's partition-id is the worker index)."""
    k, n = cfg.simulation.cohort_size, cfg.partition.num_partitions
    workers = num_workers(n, k)
    if int(context.node_config.get("num-partitions", workers)) != workers:
        raise ConfigError(
            f"simulation.cohort-size={k} puts {n} partitions on {workers} worker nodes, but this node says "
            f"num-partitions={context.node_config.get('num-partitions')}; start {workers} nodes"
        )
    return cohort_partitions(int(context.node_config["partition-id"]), n, k)


def client_context(context: Context, pid: int, num_partitions: int) -> Context:
    """Client ``pid``'s view of the worker's context: its own node config and state."""
    prefix = f"c{pid}:"
    state = RecordDict({k[len(prefix) :]: v for k, v in context.state.items() if k.startswith(prefix)})
    worker = context.node_config.get("partition-id", 0)
    node_config = {**dict(context.node_config), "partition-id": pid, "num-partitions": num_partitions}
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config={**node_config, WORKER_KEY: worker},
        state=state,
        run_config=context.run_config,
    )


def save_client_state(context: Context, pid: int, client: Context) -> None:
    """Write client ``pid``'s state back into the worker's context (prefixed keys)."""
    prefix = f"c{pid}:"
    for key in [k for k in context.state if k.startswith(prefix)]:
        del context.state[key]
    for key, value in client.state.items():
        context.state[prefix + key] = value


def cohort_mod(overrides: dict[str, Any], *, per_client_mods: bool = False):
    """The mod (module docstring); ``per_client_mods``: mods follow it that must see every client."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        from fedpeft.task import set_threads

        cfg = experiment_config(context, overrides)
        content = msg.content
        if COHORT_KEY not in content.config_records:  # one client's message (or the worker handshake)
            if "config" in content.config_records and content["config"].get("query") == "partition-ids":
                partitions = worker_partitions(context, cfg)  # CohortGrid.discover's handshake
                return Message(RecordDict({"config": ConfigRecord({"partition-ids": partitions})}), reply_to=msg)
            set_threads(cfg.simulation.torch_threads)
            return call_next(msg, context)
        set_threads(max(cfg.simulation.torch_threads, int(cfg.simulation.num_cpus_per_client)))  # all its cores
        contents = unpack(content)
        if not per_client_mods and trains_together(msg, contents, context, cfg):
            return Message(pack(train_together(contents, cfg)), reply_to=msg)
        replies, silent = {}, []
        for pid, own in contents.items():
            client = client_context(context, pid, cfg.partition.num_partitions)
            try:  # the packed message's metadata (type, id, reply routing) with this client's content
                reply = call_next(Message(content=own, metadata=copy.copy(msg.metadata)), client)
                replies[pid] = error_record(reply.error.reason) if reply.has_error() else reply.content
            except NoReply:
                silent.append(pid)
            except Exception as err:  # this client's failure, with its own message; the others go on
                replies[pid] = error_record(f"{type(err).__name__}: {err}")
            save_client_state(context, pid, client)
        return Message(pack(replies, no_reply=silent), reply_to=msg)

    return mod


def trains_together(msg: Message, contents: dict[int, RecordDict], context: Context, cfg: ExperimentConfig) -> bool:
    """Whether a cohort takes the one-call route: plain first-order train messages, nothing per client.

    Client by client instead: DP-SGD (per-sample clipping per client), a node's own data file,
    FedProx and SCAFFOLD (their gradient terms and SCAFFOLD's extra arrays are per client), SPSA
    and any mode but first-order, and faults (module docstring).
    """
    if not msg.metadata.message_type.startswith("train") or faults_enabled(cfg):
        return False
    if cfg.dp.mode == "sample" or node_data_path(context):
        return False
    for content in contents.values():
        config = content.config_records.get("config", {})
        if config.get("mode") != "first-order" or config.get("prox-mu") or list(content.array_records) != ["arrays"]:
            return False
    return True


def train_together(contents: dict[int, RecordDict], cfg: ExperimentConfig) -> dict[int, RecordDict]:
    """A first-order cohort in one call (fedpeft/cohort.py); a failure fails every client of it."""
    from fedpeft.cohort import train_cohort
    from fedpeft.records import record_to_state
    from fedpeft.tasks import load_task

    task = load_task(cfg)
    jobs = [(record_to_state(c["arrays"]), pid, int(c["config"]["server-round"])) for pid, c in contents.items()]
    cpu_start = time.process_time()
    try:
        outcomes = train_cohort(task, jobs, batched=None if cfg.simulation.cohort_batched else False)
    except Exception as err:  # each client's failure, with the error's own message
        log.exception("cohort training failed")
        return {pid: error_record(f"{type(err).__name__}: {err}") for pid in contents}
    cpu_s = (time.process_time() - cpu_start) / len(jobs)  # a batched cohort's CPU is not separable: split evenly
    return {
        pid: delta_reply(task, pid, delta, result, cpu_s=cpu_s)
        for pid, (delta, result) in zip(contents, outcomes, strict=True)
    }
