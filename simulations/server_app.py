"""Flower ServerApp: config -> participation -> strategy -> rounds -> results file.

Each round the environment's participation model (unknown to the strategy) says which
partitions are online; the strategy configures and aggregates through Flower's Grid;
every message is counted in the byte ledger; the global adapter is evaluated on the
fixed held-out set; ``results.json`` is rewritten. A round with nobody online is
recorded and skipped; failed or rejected client replies are recorded, never applied.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedpeft import participation as participation_lib
from fedpeft.adapters import export_adapter, num_trainable, set_adapter_state
from fedpeft.comm import DOWN, UP, Ledger
from fedpeft.config import ExperimentConfig
from fedpeft.records import record_to_state, state_to_record
from fedpeft.results import default_run_dir, git_revision, package_versions, write_results
from fedpeft.task import Task, load_task, set_threads
from fedpeft.train import evaluate
from simulations.quiet import quiet_libraries
from strategies import StrategyContext, build_strategy

quiet_libraries()


def discover_partitions(grid: Grid, cfg: ExperimentConfig, ledger: Ledger) -> dict[int, int]:
    """Ask every connected node for its partition id: ``{partition id: node id}``.

    Flower node ids are random in simulation, so all per-client state is keyed by
    partition id. Waits up to ``simulation.node-wait-s`` for all partitions' nodes,
    then goes on with those present (a warning names the missing ones).
    """
    want = cfg.partition.num_partitions
    deadline = time.monotonic() + cfg.simulation.node_wait_s
    node_ids: list[int] = []
    while time.monotonic() < deadline:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= want:
            break
        time.sleep(0.5)
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"query": "partition-id"})}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
        )
        for n in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.simulation.node_wait_s):
        if reply.has_error():
            log(WARNING, "node %s failed the partition query: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        pid = int(reply.content["config"]["partition-id"])
        if pid in mapping:
            log(
                WARNING,
                "partition %d claimed by nodes %s and %s; keeping the first",
                pid,
                mapping[pid],
                reply.metadata.src_node_id,
            )
            continue
        mapping[pid] = reply.metadata.src_node_id
        ledger.record_message(0, pid, UP, reply.content, kind="setup")
    missing = sorted(set(range(want)) - set(mapping))
    if missing:
        log(WARNING, "no node holds partitions %s; they never train", missing)
    if not mapping:
        raise RuntimeError("no node answered the partition query; are SuperNodes connected?")
    return mapping


def _evaluate(task: Task, state) -> dict[str, float]:
    set_adapter_state(task.model, state)
    return evaluate(task.model, task.test_loader())


def run_experiment(grid: Grid, cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Run every round of ``cfg`` on ``grid`` and write ``run_dir/results.json``."""
    t_start = time.monotonic()
    set_threads(cfg.simulation.torch_threads)
    task = load_task(cfg)
    ledger = Ledger()
    node_of = discover_partitions(grid, cfg, ledger)
    partition_of = {node: pid for pid, node in node_of.items()}
    env = participation_lib.build_participation(
        cfg.participation, cfg.partition.num_partitions, cfg.seed, label_hist=task.label_histograms()
    )
    online_trace = participation_lib.trace(env, cfg.num_rounds, cfg.partition.num_partitions)
    selected: dict[int, list[int]] = {}

    def selector(server_round: int, _grid: Grid) -> list[int]:
        pids = [p for p in env.online(server_round) if p in node_of]
        selected[server_round] = pids
        return [node_of[p] for p in pids]

    ctx = StrategyContext(
        node_selector=selector,
        partition_of=lambda node: partition_of.get(node, -1),
        num_clients=cfg.partition.num_partitions,
        environment=env,
        extras={"initial_state": dict(task.initial_state)},
    )
    strategy = build_strategy(cfg, ctx)
    state = dict(task.initial_state)
    results: dict[str, Any] = {
        "status": "running",
        "config": cfg.to_flat(),
        "versions": package_versions(),
        "git_revision": git_revision(Path(__file__).resolve().parent),
        "trainable_params": num_trainable(task.model),
        "backbone": vars(task.weight_bytes),
        "partitions": {"sizes": [len(task.partition(p)) for p in range(cfg.partition.num_partitions)]},
        "participation_trace": online_trace.astype(int).tolist(),
        # the environment's p_n, for analysis only (strategies other than oracles never see them)
        "participation_probabilities": [float(p) for p in env.probabilities],
        "rounds": [],
        "adapter_dir": None,
    }
    first = _evaluate(task, state)
    results["rounds"].append(_round_row(0, first, [], {}, ledger, 0.0))
    results["startup_s"] = time.monotonic() - t_start
    log(
        INFO,
        "round 0: accuracy %.4f loss %.4f (start-up %.1f s)",
        first["accuracy"],
        first["loss"],
        results["startup_s"],
    )
    for server_round in range(1, cfg.num_rounds + 1):
        t0 = time.monotonic()
        messages = list(strategy.configure_train(server_round, state_to_record(state), ConfigRecord(), grid))
        for msg in messages:
            ledger.record_message(server_round, partition_of[msg.metadata.dst_node_id], DOWN, msg.content)
        replies = list(grid.send_and_receive(messages, timeout=cfg.simulation.round_timeout_s)) if messages else []
        replies, unavailable = _split_superlink_errors(replies, messages, partition_of)
        for reply in replies:
            if not reply.has_error():
                ledger.record_message(server_round, partition_of.get(reply.metadata.src_node_id, -1), UP, reply.content)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies) if replies else (None, None)
        report = dict(strategy.round_report) if replies else {"failed": [], "rejected": [], "aggregated": []}
        answered = {partition_of.get(r.metadata.src_node_id) for r in replies}
        for pid in selected.get(server_round, []):
            if pid not in answered:
                reason = unavailable.get(pid, "no reply within simulation.round-timeout-s")
                report["failed"].append({"partition_id": pid, "reason": reason})
        if new_arrays is not None:
            state = record_to_state(new_arrays)
        elif not messages:
            log(WARNING, "round %d: no client online; skipped", server_round)
        scores = _evaluate(task, state)
        row = _round_row(server_round, scores, selected.get(server_round, []), report, ledger, time.monotonic() - t0)
        row["train_metrics"] = dict(train_metrics) if train_metrics is not None else {}
        row.update(report.get("extra", {}))
        results["rounds"].append(row)
        if hasattr(strategy, "state_for_results"):
            results["strategy_state"] = strategy.state_for_results()
        write_results(run_dir, results)
        log(
            INFO,
            "round %d/%d: accuracy %.4f loss %.4f | %d online, %d aggregated, %d failed, %d rejected | "
            "cumulative bytes up %s down %s | %.1f s",
            server_round, cfg.num_rounds, scores["accuracy"], scores["loss"], len(row["participants"]),
            len(report["aggregated"]), len(report["failed"]), len(report["rejected"]),
            _mb(sum(r["uplink_payload_bytes"] for r in results["rounds"])),
            _mb(sum(r["downlink_payload_bytes"] for r in results["rounds"])), row["wall_s"],
        )  # fmt: skip
    set_adapter_state(task.model, state)
    results["adapter_dir"] = str(export_adapter(task.model, run_dir / "adapter", cfg.peft, cfg.model).resolve())
    results["ledger"] = ledger.to_json()
    results["wall_s"] = time.monotonic() - t_start
    results["status"] = "completed"
    path = write_results(run_dir, results)
    log(INFO, "wrote %s (final accuracy %.4f)", path, results["rounds"][-1]["accuracy"])
    return results


def _split_superlink_errors(replies: list[Message], sent: list[Message], partition_of: dict[int, int]):
    """Replies from the nodes, and ``{partition id: reason}`` for the SuperLink's own error replies.

    On a SuperLink, a node that stopped heart-beating (crashed, unplugged) is answered for by
    the SuperLink itself (NODE_UNAVAILABLE, from its own node id): attribute it to the node
    the message went to, so it is recorded as that partition's failure.
    """
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    from_nodes, unavailable = [], {}
    for reply in replies:
        if reply.metadata.src_node_id in partition_of or not reply.has_error():
            from_nodes.append(reply)
            continue
        pid = partition_of.get(dst_of.get(reply.metadata.reply_to_message_id, -1), -1)
        unavailable[pid] = f"node unavailable: {reply.error.reason}"[:500]
    return from_nodes, unavailable


def _round_row(server_round, scores, participants, report, ledger: Ledger, wall_s: float) -> dict[str, Any]:
    per_round = ledger.per_round().get(server_round, {})
    return {
        "round": server_round,
        "accuracy": scores["accuracy"],
        "loss": scores["loss"],
        "participants": list(participants),
        "aggregated": list(report.get("aggregated", [])),
        "failed": list(report.get("failed", [])),
        "rejected": list(report.get("rejected", [])),
        "uplink_payload_bytes": per_round.get("uplink_payload_bytes", 0),
        "uplink_message_bytes": per_round.get("uplink_message_bytes", 0),
        "downlink_payload_bytes": per_round.get("downlink_payload_bytes", 0),
        "downlink_message_bytes": per_round.get("downlink_message_bytes", 0),
        "wall_s": wall_s,
    }


def _mb(n: int) -> str:
    """Bytes for the progress line, in a unit that shows them (SPSA rounds move bytes, not MB)."""
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def build_server_app(overrides: dict[str, Any] | None = None, run_dir: str | Path | None = None) -> ServerApp:
    """A ServerApp whose config is ``run_config`` overlaid with ``overrides``."""
    overrides = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = ExperimentConfig.from_flat({**dict(context.run_config), **overrides})
        out = Path(run_dir or cfg.out_dir or default_run_dir(cfg.name, cfg.seed))
        run_experiment(grid, cfg, out)

    return app


app = build_server_app()
