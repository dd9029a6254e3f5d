"""How many Flower nodes a run on Flower's simulation engine registers: one per client, or cohort nodes.

Flower 1.42's simulation engine looks for work by asking its link state, ten times a second,
for each registered node's next message, and each such query scans every message not yet
answered: a sweep costs registered nodes x pending messages. Measured here
(runs/ of issue 24 item 7, on the in-memory link state, machine under load): one sweep over
10,000 nodes takes 0.18 s with nothing pending, 2.4 s with a round's 10 messages pending and
24 s with 100, against 0.03 s for 100 nodes with 10 pending. One node per client therefore
makes every round wait on the sweep, and the handshake's 10,000 queries (all pending at once)
never finish within ``simulation.node-wait-s``.

With ``simulation.cohort-size = 1`` and more partitions than ``simulation.max-nodes``, the
launcher runs the clients on ``ceil(partitions / ceil(partitions / max-nodes))`` cohort nodes
(simulations/cohort.py), each training its online clients one after another: every client
keeps its own state and data, the strategy and the byte ledger see one message per client,
and the numbers equal one client per node bit for bit (tests/test_cohort_nodes.py). The
results file keeps the config as given and records the layout apart (``flower_nodes``).
Deployment (one SuperNode per device) and the in-process runner (no polling) are unaffected.
"""

from __future__ import annotations

import logging
import math

from fedpeft.config import ConfigError, ExperimentConfig

log = logging.getLogger("fedpeft")


def engine_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` as Flower's engine should run it: clients grouped into cohort nodes past ``simulation.max-nodes``.

    Unchanged when the run already uses cohort nodes, when ``max-nodes`` is 0 or not exceeded,
    or when a setting rules cohort nodes out (none does today: faults and causal-LM clients run inside
    cohorts one after another): then a warning
    says that start-up and rounds grow with the number of clients.
    """
    sim, num = cfg.simulation, cfg.partition.num_partitions
    if sim.cohort_size > 1 or sim.max_nodes == 0 or num <= sim.max_nodes:
        return cfg
    size = math.ceil(num / sim.max_nodes)
    try:  # one after another, never batched: batched cohorts draw other dropout masks
        grouped = cfg.replace({"simulation.cohort-size": size, "simulation.cohort-batched": False})
    except ConfigError as err:
        log.warning(
            "%d clients keep one Flower node each, more than simulation.max-nodes=%d, because cohort nodes "
            "are ruled out here (%s): Flower's engine polls every node, so start-up and rounds grow with them",
            num,
            sim.max_nodes,
            err,
        )
        return cfg
    log.info(
        "%d clients on %d Flower nodes of %d clients each, trained one after another (simulation.max-nodes=%d)",
        num,
        math.ceil(num / size),
        size,
        sim.max_nodes,
    )
    return grouped


def flower_nodes(cfg: ExperimentConfig) -> dict[str, int]:
    """The layout a results file records: Flower nodes and clients per node."""
    size = cfg.simulation.cohort_size
    return {"nodes": math.ceil(cfg.partition.num_partitions / size), "clients_per_node": size}
